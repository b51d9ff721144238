"""NVIDIA GPUs on the PCI bus, as sysfs shows them: how the driver notices GPUs that
arrive or leave after start. NVML lists GPUs only as of its initialisation, so a
GPU on the bus that NVML does not list means NVML must be initialised again."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

NVIDIA_VENDOR = "0x10de"
NVIDIA_DRIVER = "nvidia"
DISPLAY_CLASS_PREFIX = "0x03"
"""VGA (0x0300) and 3D (0x0302) controllers; NVIDIA's audio functions and NVSwitches are other classes."""


def devices_dir(sysfs_root: Path) -> Path:
    return sysfs_root / "bus" / "pci" / "devices"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip().lower()
    except OSError:
        return ""


def is_gpu(sysfs_root: Path, bus_id: str) -> bool:
    """An NVIDIA display controller bound to the nvidia kernel driver: one NVML can list
    (a GPU bound to vfio-pci for a VM is not NVML's, and is left alone)."""
    device = devices_dir(sysfs_root) / bus_id
    if _read(device / "vendor") != NVIDIA_VENDOR or not _read(device / "class").startswith(DISPLAY_CLASS_PREFIX):
        return False
    try:
        return os.path.basename(os.readlink(device / "driver")) == NVIDIA_DRIVER
    except OSError:
        return False


def present(sysfs_root: Path, bus_id: str) -> bool:
    return os.path.isdir(devices_dir(sysfs_root) / bus_id)


def gpus_on_bus(sysfs_root: Path, among: Iterable[str] | None = None) -> set[str]:
    """Bus IDs (sysfs form) of the NVIDIA GPUs on the bus: all of them, or those of `among`."""
    if among is None:
        try:
            among = [entry.name for entry in os.scandir(devices_dir(sysfs_root))]
        except OSError:
            return set()
    return {bus_id for bus_id in among if is_gpu(sysfs_root, bus_id)}
