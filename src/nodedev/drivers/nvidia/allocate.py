"""What a container gets for NVIDIA devices, and the CDI spec behind the cdi-* strategies.

Each device's part of the answer (its NVIDIA_VISIBLE_DEVICES value, device nodes,
volume mount, CDI name) is computed at scan time into its `Device.edits`; the host
joins the parts of the requested devices in request order, which gives exactly
NVIDIA's response: visible IDs comma-joined with replicas of one GPU once, control
nodes then each device's nodes, one mount per device. What depends on the whole
request (refusing more than one shared device, the cdi-annotations key that is new
for every response) is `request_edits`, called from allocate() on the event loop
with no I/O. The CDI spec is written by scan() when its content changes, so a
kubelet asking for `k8s.device-plugin.nvidia.com/gpu=<id>` finds it already on disk.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodedev.driver import NO_EDITS, AllocationError, ContainerEdits, Device, DeviceNode, Mount
from nodedev.drivers.nvidia.discovery import GPU
from nodedev.drivers.nvidia.options import CDI_STRATEGIES, GPU_RESOURCE, NvidiaOptions
from nodedev.drivers.nvidia.resources import Unit
from nodedev.files import write_atomically

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
ANNOTATION_NAME = "nodedev-nvidia"
"""Middle of the cdi-annotations key: `<prefix>nodedev-nvidia_<uuid4>`, NVIDIA's shape."""


@dataclass(frozen=True, slots=True)
class AllocateSettings:
    strategies: tuple[str, ...]
    id_strategy: str
    pass_device_specs: bool
    annotation_prefix: str
    extra_envs: tuple[tuple[str, str], ...]
    fail_requests_greater_than_one: bool
    sharing_key: str = "sharing.timeSlicing"
    mps: ContainerEdits = NO_EDITS
    """What every MPS-shared device adds: the control daemon's pipe and log directories, and /dev/shm."""

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
        slicing = options.sharing.replicated
        return cls(
            strategies=flags.plugin.device_list_strategies,
            id_strategy=flags.plugin.device_id_strategy,
            pass_device_specs=flags.plugin.pass_device_specs,
            annotation_prefix=flags.plugin.cdi_annotation_prefix,
            extra_envs=tuple(envs),
            fail_requests_greater_than_one=options.sharing.mps is not None or bool(slicing and slicing.fail_requests_greater_than_one),
            sharing_key="sharing.mps" if options.sharing.mps is not None else "sharing.timeSlicing",
            mps=mps_edits(options),
        )

    @property
    def all_cdi(self) -> bool:
        return all(s in CDI_STRATEGIES for s in self.strategies)

    @property
    def any_cdi(self) -> bool:
        return any(s in CDI_STRATEGIES for s in self.strategies)

    @property
    def annotates(self) -> bool:
        return "cdi-annotations" in self.strategies


def device_node(dev_dir: Path, name: str) -> DeviceNode:
    return DeviceNode(host_path=str(dev_dir / name), container_path=f"/dev/{name}", permissions="rw")


def cdi_name(unit: Unit, settings: AllocateSettings) -> str:
    """The fully qualified CDI device name the spec defines for this unit."""
    return f"{CDI_KIND}={unit.visible_id(settings.id_strategy)}"


def device_edits(unit: Unit, settings: AllocateSettings, dev_dir: Path, control_nodes: Sequence[str]) -> ContainerEdits:
    """One device's part of a container's answer, as the host will join it with the others'.

    With only cdi-* strategies NVIDIA sets no env, mount or device node at all. The
    control nodes come with every device so a request of any size gets them, once.
    """
    visible = unit.visible_id(settings.id_strategy)
    envs: dict[str, str] = {}
    mounts: tuple[Mount, ...] = ()
    nodes: tuple[DeviceNode, ...] = ()
    if not settings.all_cdi:
        envs.update(settings.extra_envs)
        if "envvar" in settings.strategies:
            envs[VISIBLE_DEVICES] = visible
        if "volume-mounts" in settings.strategies:
            envs[VISIBLE_DEVICES] = VOLUME_MOUNT_ROOT
            mounts = (Mount(host_path="/dev/null", container_path=f"{VOLUME_MOUNT_ROOT}/{visible}"),)
        if settings.pass_device_specs:
            nodes = tuple(device_node(dev_dir, name) for name in (*control_nodes, *unit.nodes))
    cdi = (cdi_name(unit, settings),) if "cdi-cri" in settings.strategies else ()
    if unit.replica is not None and settings.mps is not NO_EDITS:
        envs.update(settings.mps.envs)
        mounts = (*settings.mps.mounts, *mounts)
    return ContainerEdits(devices=nodes, mounts=mounts, envs=envs, cdi_devices=cdi)


MPS_CONTAINER_ROOT = "/mps"
"""Where a container sees the MPS root, as in NVIDIA's plugin."""


def mps_dirs(root: str, resource: str) -> tuple[str, str]:
    """(pipe, log) directories of one resource's control daemon under an MPS root."""
    return f"{root}/{resource}/pipe", f"{root}/{resource}/log"


def mps_edits(options: NvidiaOptions) -> ContainerEdits:
    """NVIDIA's MPS answer (with or without CDI): the pipe and log directories of the
    nvidia.com/gpu control daemon, and the daemon's shared memory as the container's /dev/shm."""
    root = options.flags.mps_root
    if options.sharing.mps is None or root is None:
        return NO_EDITS
    resource = options.shared_name(GPU_RESOURCE)
    host_pipe, host_log = mps_dirs(root, resource)
    pipe, log = mps_dirs(MPS_CONTAINER_ROOT, resource)
    return ContainerEdits(
        envs={"CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": log},
        mounts=(Mount(host_pipe, pipe), Mount(host_log, log), Mount(f"{root}/shm", "/dev/shm")),
    )


def request_edits(
    devices: Sequence[Device],
    *,
    replicated: bool,
    settings: AllocateSettings,
    cdi_names: Mapping[str, str],
) -> ContainerEdits:
    """What depends on the whole request: the failRequestsGreaterThanOne refusal and the
    cdi-annotations entry, whose key NVIDIA makes new for every response."""
    if replicated and settings.fail_requests_greater_than_one and len(devices) > 1:
        raise AllocationError(
            f"{len(devices)} shared devices requested, but "
            f"{settings.sharing_key}.failRequestsGreaterThanOne allows one per container"
        )
    if not settings.annotates:
        return NO_EDITS
    names: dict[str, None] = {}
    for device in devices:
        name = cdi_names.get(device.id)
        if name is None:
            raise AllocationError(f"device {device.id!r} is no longer present (the latest scan dropped it)")
        names[name] = None
    key = f"{settings.annotation_prefix}{ANNOTATION_NAME}_{uuidlib.uuid4()}"
    return ContainerEdits(annotations={key: ",".join(names)})


def _cdi_nodes(dev_dir: Path, names: Iterable[str]) -> list[dict[str, str]]:
    return [{"path": f"/dev/{n}", "hostPath": str(dev_dir / n), "permissions": "rw"} for n in names]


def cdi_spec(
    gpus: Sequence[GPU],
    dev_dir: Path,
    control_nodes: Sequence[str],
    common_mounts: Sequence[dict[str, Any]] = (),
    hooks: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Every GPU and MIG device under both its UUID and its index, so either ID strategy resolves.

    Device nodes per device; what every device shares (the control nodes, the
    driver's libraries, binaries and firmware as `common_mounts`, the ld cache hook)
    once, in the spec's own containerEdits, as NVIDIA's generator writes it.
    """
    devices: list[dict[str, Any]] = []
    for gpu in gpus:
        edits = {"deviceNodes": _cdi_nodes(dev_dir, [gpu.node])}
        devices += [{"name": name, "containerEdits": edits} for name in (gpu.uuid, str(gpu.index))]
        for mig in gpu.migs:
            mig_edits = {"deviceNodes": _cdi_nodes(dev_dir, [gpu.node, *mig.cap_nodes])}
            devices += [{"name": name, "containerEdits": mig_edits} for name in (mig.uuid, mig.index)]
    spec: dict[str, Any] = {"cdiVersion": CDI_VERSION, "kind": CDI_KIND, "devices": devices}
    common: dict[str, Any] = {}
    if control_nodes:
        common["deviceNodes"] = _cdi_nodes(dev_dir, control_nodes)
    if common_mounts:
        common["mounts"] = list(common_mounts)
    if hooks:
        common["hooks"] = list(hooks)
    if common:
        spec["containerEdits"] = common
    return spec


def write_cdi_spec(root: Path, spec: dict[str, Any]) -> Path:
    """Written whole or not at all, so a runtime never reads half a spec."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / CDI_SPEC_FILE
    write_atomically(target, json.dumps(spec, indent=2) + "\n")
    return target
