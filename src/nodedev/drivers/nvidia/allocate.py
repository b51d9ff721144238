"""Allocate responses and the CDI spec behind the cdi-* strategies.

The response is computed from values gathered at scan time only (no I/O):
Allocate runs on the host's event loop. The CDI spec is written by scan() when
its content changes, so a kubelet asking for `k8s.device-plugin.nvidia.com/gpu=<id>`
finds the spec already on disk.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid as uuidlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodedev.driver import Allocation, AllocationError, DeviceNode, Mount
from nodedev.drivers.nvidia.discovery import GPU
from nodedev.drivers.nvidia.options import CDI_STRATEGIES, NvidiaOptions
from nodedev.drivers.nvidia.resources import Unit

VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
VOLUME_MOUNT_ROOT = "/var/run/nvidia-container-devices"
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
"""Shared nodes NVIDIA passes with passDeviceSpecs when they exist."""
CDI_KIND = "k8s.device-plugin.nvidia.com/gpu"
CDI_SPEC_FILE = "k8s.device-plugin.nvidia.com-gpu.json"
"""NVIDIA's file name for this kind, so a stale spec of theirs is replaced, not duplicated
(two specs defining the same device names make CDI refuse both)."""
CDI_VERSION = "0.5.0"
"""The first CDI version with `hostPath` on device nodes."""


@dataclass(frozen=True, slots=True)
class AllocateSettings:
    strategies: tuple[str, ...]
    id_strategy: str
    pass_device_specs: bool
    annotation_prefix: str
    extra_envs: tuple[tuple[str, str], ...]
    fail_requests_greater_than_one: bool

    @classmethod
    def from_options(cls, options: NvidiaOptions) -> AllocateSettings:
        flags = options.flags
        envs = [
            (name, "enabled")
            for name, on in (
                ("NVIDIA_GDRCOPY", flags.gdrcopy_enabled),
                ("NVIDIA_GDS", flags.gds_enabled),
                ("NVIDIA_MOFED", flags.mofed_enabled),
            )
            if on
        ]
        slicing = options.sharing.time_slicing
        return cls(
            strategies=flags.plugin.device_list_strategies,
            id_strategy=flags.plugin.device_id_strategy,
            pass_device_specs=flags.plugin.pass_device_specs,
            annotation_prefix=flags.plugin.cdi_annotation_prefix,
            extra_envs=tuple(envs),
            fail_requests_greater_than_one=bool(slicing and slicing.fail_requests_greater_than_one),
        )

    @property
    def all_cdi(self) -> bool:
        return all(s in CDI_STRATEGIES for s in self.strategies)

    @property
    def any_cdi(self) -> bool:
        return any(s in CDI_STRATEGIES for s in self.strategies)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def device_node(dev_dir: Path, name: str) -> DeviceNode:
    return DeviceNode(host_path=str(dev_dir / name), container_path=f"/dev/{name}", permissions="rw")


def build_allocation(
    resource: str,
    units: Sequence[Unit],
    *,
    replicated: bool,
    settings: AllocateSettings,
    dev_dir: Path,
    control_nodes: Sequence[str],
) -> Allocation:
    """One container's response. Replicas of one GPU collapse to that GPU, once."""
    if replicated and settings.fail_requests_greater_than_one and len(units) > 1:
        raise AllocationError(
            f"{resource}: {len(units)} shared devices requested, but "
            "sharing.timeSlicing.failRequestsGreaterThanOne allows one per container"
        )
    ids = _unique(unit.visible_id(settings.id_strategy) for unit in units)
    allocation = Allocation()
    if not settings.all_cdi:
        allocation.envs.update(settings.extra_envs)
        if "envvar" in settings.strategies:
            allocation.envs[VISIBLE_DEVICES] = ",".join(ids)
        if "volume-mounts" in settings.strategies:
            allocation.envs[VISIBLE_DEVICES] = VOLUME_MOUNT_ROOT
            allocation.mounts = [Mount(host_path="/dev/null", container_path=f"{VOLUME_MOUNT_ROOT}/{i}") for i in ids]
        if settings.pass_device_specs:
            nodes = _unique([*control_nodes, *(node for unit in units for node in unit.nodes)])
            allocation.devices = [device_node(dev_dir, node) for node in nodes]
    qualified = [f"{CDI_KIND}={i}" for i in ids]
    if "cdi-annotations" in settings.strategies:
        key = f"{settings.annotation_prefix}nodedev-nvidia_{uuidlib.uuid4()}"
        allocation.annotations[key] = ",".join(qualified)
    if "cdi-cri" in settings.strategies:
        allocation.cdi_devices = qualified
    return allocation


def _cdi_nodes(dev_dir: Path, names: Iterable[str]) -> list[dict[str, str]]:
    return [{"path": f"/dev/{n}", "hostPath": str(dev_dir / n), "permissions": "rw"} for n in names]


def cdi_spec(gpus: Sequence[GPU], dev_dir: Path, control_nodes: Sequence[str]) -> dict[str, Any]:
    """Every GPU and MIG device under both its UUID and its index, so either ID strategy resolves.

    Only device nodes: driver libraries are left to the image or the NVIDIA container toolkit.
    """
    devices: list[dict[str, Any]] = []
    for gpu in gpus:
        edits = {"deviceNodes": _cdi_nodes(dev_dir, [gpu.node])}
        devices += [{"name": name, "containerEdits": edits} for name in (gpu.uuid, str(gpu.index))]
        for mig in gpu.migs:
            mig_edits = {"deviceNodes": _cdi_nodes(dev_dir, [gpu.node, *mig.cap_nodes])}
            devices += [{"name": name, "containerEdits": mig_edits} for name in (mig.uuid, mig.index)]
    spec: dict[str, Any] = {"cdiVersion": CDI_VERSION, "kind": CDI_KIND, "devices": devices}
    if control_nodes:
        spec["containerEdits"] = {"deviceNodes": _cdi_nodes(dev_dir, control_nodes)}
    return spec


def write_cdi_spec(root: Path, spec: dict[str, Any]) -> Path:
    """tmp file + rename in the same directory, so a runtime never reads half a spec."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / CDI_SPEC_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{CDI_SPEC_FILE}.", dir=root)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(spec, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target
