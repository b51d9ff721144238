"""Resource names and device IDs, the way NVIDIA's plugin names them.

IDs the kubelet sees are always UUIDs (GPU or MIG), or `<uuid>::<n>` for a
time-sliced replica; `deviceIDStrategy` only changes what goes into the
container's device list at Allocate, exactly as in NVIDIA's plugin. Keeping the
same IDs means pods and checkpoints written by NVIDIA's plugin still line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nodedev.drivers.nvidia.discovery import GPU, MigDevice
from nodedev.drivers.nvidia.options import GPU_RESOURCE, MIG_RESOURCE_PREFIX, NvidiaOptions

REPLICA_SEPARATOR = "::"


class ResourceError(Exception):
    """The hardware does not fit the configured MIG strategy (NVIDIA's plugin refuses to start too)."""


@dataclass(frozen=True, slots=True)
class Unit:
    """One device ID the kubelet sees, and the GPU or MIG device behind it."""

    id: str
    gpu: GPU
    mig: MigDevice | None = None
    replica: int | None = None

    @property
    def target_uuid(self) -> str:
        """The physical device's UUID: replicas collapse to it."""
        return self.mig.uuid if self.mig else self.gpu.uuid

    def visible_id(self, id_strategy: str) -> str:
        if id_strategy == "index":
            return self.mig.index if self.mig else str(self.gpu.index)
        return self.target_uuid

    @property
    def nodes(self) -> tuple[str, ...]:
        """Device nodes (relative to the dev root) a container needs for this device."""
        return (self.gpu.node, *self.mig.cap_nodes) if self.mig else (self.gpu.node,)

    @property
    def numa_nodes(self) -> tuple[int, ...]:
        return (self.gpu.numa_node,) if self.gpu.numa_node is not None else ()


def mig_resource(profile: str) -> str:
    """`1g.10gb+me` -> `nvidia.com/mig-1g.10gb.me`: `+` is not allowed in resource names."""
    return MIG_RESOURCE_PREFIX + profile.replace("+", ".")


def replica_id(uuid: str, n: int) -> str:
    return f"{uuid}{REPLICA_SEPARATOR}{n}"


def physical_id(device_id: str) -> str:
    """The GPU or MIG UUID of an ID, whether or not it names a replica."""
    return device_id.partition(REPLICA_SEPARATOR)[0]


Target = tuple[GPU, MigDevice | None]


def _single_targets(gpus: Sequence[GPU]) -> list[Target]:
    enabled = {gpu.mig_enabled for gpu in gpus}
    if enabled == {False} or not gpus:
        return [(gpu, None) for gpu in gpus]
    if len(enabled) > 1:
        on = ", ".join(str(g.index) for g in gpus if g.mig_enabled)
        off = ", ".join(str(g.index) for g in gpus if not g.mig_enabled)
        raise ResourceError(
            f"flags.migStrategy single needs the same MIG mode on every GPU: MIG is on for GPU {on} and off for GPU {off}"
        )
    targets: list[Target] = []
    for gpu in gpus:
        if not gpu.migs:
            raise ResourceError(f"flags.migStrategy single: GPU {gpu.index} ({gpu.uuid}) has MIG enabled but no MIG devices")
        targets += [(gpu, mig) for mig in gpu.migs]
    profiles = sorted({mig.profile for _, mig in targets if mig})
    if len(profiles) > 1:
        raise ResourceError(
            f"flags.migStrategy single: more than one MIG device type present on node ({', '.join(profiles)}); use mixed"
        )
    return targets


def _grouped_targets(gpus: Sequence[GPU], strategy: str, warn: list[str]) -> dict[str, list[Target]]:
    if strategy == "none":
        return {GPU_RESOURCE: [(gpu, None) for gpu in gpus]}
    if strategy == "single":
        return {GPU_RESOURCE: _single_targets(gpus)}
    groups: dict[str, list[Target]] = {GPU_RESOURCE: []}
    for gpu in gpus:
        if not gpu.mig_enabled:
            groups[GPU_RESOURCE].append((gpu, None))
            continue
        if not gpu.migs:
            warn.append(f"GPU {gpu.index} ({gpu.uuid}) has MIG enabled but no MIG devices")
        for mig in gpu.migs:
            if not mig.whole_instance:
                warn.append(f"MIG device {mig.index} ({mig.uuid}): profile {mig.profile} has fewer compute than "
                            "GPU slices; mixed strategy does not offer it")
                continue
            groups.setdefault(mig_resource(mig.profile), []).append((gpu, mig))
    return groups


def build_units(gpus: Sequence[GPU], options: NvidiaOptions, warn: list[str] | None = None) -> dict[str, list[Unit]]:
    """Resource name (after any `.shared` rename) -> its device IDs, in GPU then MIG order.

    Raises ResourceError when the MIG layout contradicts migStrategy single;
    `warn` collects what NVIDIA's plugin only warns about.
    """
    warnings = warn if warn is not None else []
    replicas = options.replicas
    result: dict[str, list[Unit]] = {}
    for resource, targets in _grouped_targets(gpus, options.flags.mig_strategy, warnings).items():
        count = replicas.get(resource)
        if count is not None and options.sharing.mps is not None and any(mig for _, mig in targets):
            raise ResourceError("sharing.mps: sharing using MPS is not supported for MIG devices (nor by NVIDIA's plugin)")
        units: list[Unit] = []
        for gpu, mig in targets:
            uuid = mig.uuid if mig else gpu.uuid
            if count is None:
                units.append(Unit(id=uuid, gpu=gpu, mig=mig))
            else:
                units += [Unit(id=replica_id(uuid, n), gpu=gpu, mig=mig, replica=n) for n in range(count)]
        result[options.shared_name(resource)] = units
    return result


def declared_resources(options: NvidiaOptions) -> list[str]:
    """What the config alone fixes; mixed-strategy MIG names beyond those in sharing come at scan."""
    names = [options.shared_name(GPU_RESOURCE)]
    if options.flags.mig_strategy == "mixed":
        names += [options.shared_name(name) for name in options.replicas if name != GPU_RESOURCE]
    return names
