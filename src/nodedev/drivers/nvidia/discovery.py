"""What NVML says about the GPUs, turned into plain frozen dataclasses.

Everything downstream (resource naming, Allocate, topology scoring, health
attribution) works on these values only, so it can be tested without NVML and
never calls into the library on the event loop.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NVML_LIBRARY = "libnvidia-ml.so.1"
"""The name pynvml dlopen()s; error messages name it so people know what was looked for."""

_MIG_NAME = re.compile(r"\bMIG\s+(\S+)\s*$")


@dataclass(frozen=True, slots=True)
class MigDevice:
    uuid: str
    index: str
    """`<gpu index>:<mig index>`, the form nvidia-smi and NVIDIA's index ID strategy use."""
    gpu_instance: int
    compute_instance: int
    profile: str
    """`1g.5gb`, `1c.2g.10gb`, `1g.10gb+me`: NVIDIA's profile name."""
    memory_mib: int
    cap_nodes: tuple[str, ...] = ()
    """Capability device nodes relative to the dev root (`nvidia-caps/nvidia-cap12`)."""

    @property
    def whole_instance(self) -> bool:
        """Compute slices equal GPU slices: the only profiles NVIDIA's mixed strategy offers."""
        return not re.match(r"^\d+c\.", self.profile)


@dataclass(frozen=True, slots=True)
class GPU:
    uuid: str
    index: int
    minor: int
    bus_id: str
    """Normalised like sysfs: `0000:07:00.0`."""
    numa_node: int | None
    name: str
    memory_mib: int
    mig_enabled: bool = False
    migs: tuple[MigDevice, ...] = ()

    @property
    def node(self) -> str:
        """The GPU's device node relative to the dev root."""
        return f"nvidia{self.minor}"


def normalize_bus_id(bus_id: str | bytes) -> str:
    """NVML says `00000000:07:00.0`, sysfs says `0000:07:00.0`; compare in the sysfs form."""
    text = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
    text = text.strip().rstrip("\x00").lower()
    match = re.fullmatch(r"(?:([0-9a-f]+):)?([0-9a-f]+):([0-9a-f]+)\.([0-9a-f])", text)
    if not match:
        return text
    domain, bus, device, function = match.groups()
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{function}"


def read_numa_node(sysfs_root: Path, bus_id: str) -> int | None:
    """-1 (or no file, as on single-socket machines without NUMA info) means no node."""
    path = sysfs_root / "bus" / "pci" / "devices" / bus_id / "numa_node"
    try:
        value = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return value if value >= 0 else None


def mig_cap_nodes(proc_root: Path, gpu_minor: int, gi: int, ci: int, log: logging.Logger) -> tuple[str, ...]:
    """The nvidia-caps nodes a container needs to open one MIG device.

    The driver publishes each capability's device minor in a proc file
    (`DeviceFileMinor: N`); the node is /dev/nvidia-caps/nvidia-cap<N>.
    """
    base = proc_root / "driver" / "nvidia" / "capabilities" / f"gpu{gpu_minor}" / "mig" / f"gi{gi}"
    nodes: list[str] = []
    for path in (base / "access", base / f"ci{ci}" / "access"):
        try:
            text = path.read_text()
        except OSError as err:
            log.warning("MIG capability file %s unreadable: %s", path, err.strerror or err)
            continue
        match = re.search(r"DeviceFileMinor:\s*(\d+)", text)
        if match is None:
            log.warning("MIG capability file %s has no DeviceFileMinor line", path)
            continue
        nodes.append(f"nvidia-caps/nvidia-cap{int(match.group(1))}")
    return tuple(nodes)


def mig_memory_gb(total_gpu_bytes: int, mig_memory_mib: int) -> int:
    """NVIDIA's rounding: the MIG's share of the GPU in eighths, times the GPU's size in whole GB."""
    if total_gpu_bytes <= 0:
        return round(mig_memory_mib / 1024)
    share = mig_memory_mib * 1024 * 1024 / total_gpu_bytes
    share = math.ceil(share * 8) / 8
    total_gb = (total_gpu_bytes + (1 << 30) - 1) >> 30
    return round(share * total_gb)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _mig_profile(nvml: Any, mig_handle: Any, gpu_memory_bytes: int) -> tuple[str, int]:
    """(profile name, memory MiB). The MIG device's name ends in its profile on real NVML;
    the slice counts are the fallback, the way go-nvlib derives the name."""
    memory_mib = 0
    try:
        memory_mib = int(nvml.nvmlDeviceGetMemoryInfo(mig_handle).total) >> 20
    except nvml.NVMLError:
        pass
    try:
        match = _MIG_NAME.search(_text(nvml.nvmlDeviceGetName(mig_handle)))
    except nvml.NVMLError:
        match = None
    if match:
        return match.group(1), memory_mib
    attrs = nvml.nvmlDeviceGetAttributes(mig_handle)
    memory_mib = memory_mib or int(attrs.memorySizeMB)
    gb = mig_memory_gb(gpu_memory_bytes, int(attrs.memorySizeMB))
    g, c = int(attrs.gpuInstanceSliceCount), int(attrs.computeInstanceSliceCount)
    name = f"{g}g.{gb}gb" if c == g else f"{c}c.{g}g.{gb}gb"
    return name, memory_mib


def read_migs(
    nvml: Any, handle: Any, gpu_index: int, gpu_minor: int, gpu_memory_bytes: int, proc_root: Path, log: logging.Logger
) -> tuple[tuple[MigDevice, ...], dict[str, Any]]:
    """Every MIG device on one MIG-enabled GPU, with its handle by UUID."""
    migs: list[MigDevice] = []
    handles: dict[str, Any] = {}
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig_handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError_NotFound:
            continue
        try:
            uuid = _text(nvml.nvmlDeviceGetUUID(mig_handle))
            gi = int(nvml.nvmlDeviceGetGpuInstanceId(mig_handle))
            ci = int(nvml.nvmlDeviceGetComputeInstanceId(mig_handle))
            profile, memory_mib = _mig_profile(nvml, mig_handle, gpu_memory_bytes)
        except nvml.NVMLError as err:
            log.warning("GPU %d: MIG device %d unreadable, left out: %s", gpu_index, slot, err)
            continue
        migs.append(
            MigDevice(
                uuid=uuid,
                index=f"{gpu_index}:{slot}",
                gpu_instance=gi,
                compute_instance=ci,
                profile=profile,
                memory_mib=memory_mib,
                cap_nodes=mig_cap_nodes(proc_root, gpu_minor, gi, ci, log),
            )
        )
        handles[uuid] = mig_handle
    return tuple(migs), handles


def read_gpu(nvml: Any, index: int, sysfs_root: Path, proc_root: Path, log: logging.Logger) -> tuple[GPU, Any]:
    """One GPU by NVML index, with its handle. Raises NVMLError when NVML cannot answer."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    minor = int(nvml.nvmlDeviceGetMinorNumber(handle))
    bus_id = normalize_bus_id(nvml.nvmlDeviceGetPciInfo(handle).busId)
    name = _text(nvml.nvmlDeviceGetName(handle))
    memory_bytes = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    mig_enabled = False
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        mig_enabled = current == nvml.NVML_DEVICE_MIG_ENABLE
    except nvml.NVMLError_NotSupported:
        pass
    migs: tuple[MigDevice, ...] = ()
    if mig_enabled:
        migs, _ = read_migs(nvml, handle, index, minor, memory_bytes, proc_root, log)
    gpu = GPU(
        uuid=uuid,
        index=index,
        minor=minor,
        bus_id=bus_id,
        numa_node=read_numa_node(sysfs_root, bus_id),
        name=name,
        memory_mib=memory_bytes >> 20,
        mig_enabled=mig_enabled,
        migs=migs,
    )
    return gpu, handle


@dataclass(frozen=True, slots=True)
class Discovery:
    gpus: tuple[GPU, ...]
    handles: dict[str, Any]
    """GPU UUID -> NVML handle, for the event thread and topology reads."""
    unreadable: dict[str, str]
    """GPU UUID -> NVML error, for GPUs kept from an earlier discovery because NVML failed now."""


def discover(
    nvml: Any,
    sysfs_root: Path,
    proc_root: Path,
    log: logging.Logger,
    previous: Discovery | None = None,
) -> Discovery:
    """Every GPU NVML lists. A GPU NVML cannot query now (lost, fallen off the bus) keeps
    its earlier description and is listed in `unreadable`, so it stays advertised as
    Unhealthy instead of vanishing; one never seen before is left out with a warning."""
    count = nvml.nvmlDeviceGetCount()
    before = {gpu.index: gpu for gpu in previous.gpus} if previous else {}
    gpus: list[GPU] = []
    handles: dict[str, Any] = {}
    unreadable: dict[str, str] = {}
    for index in range(count):
        try:
            gpu, handle = read_gpu(nvml, index, sysfs_root, proc_root, log)
        except nvml.NVMLError as err:
            known = before.get(index)
            if known is None:
                log.warning("GPU %d: NVML cannot describe it (%s); not advertised", index, err)
                continue
            gpu, handle = known, previous.handles.get(known.uuid) if previous else None
            unreadable[gpu.uuid] = str(err)
        gpus.append(gpu)
        if handle is not None:
            handles[gpu.uuid] = handle
    return Discovery(gpus=tuple(gpus), handles=handles, unreadable=unreadable)
