"""Typed access to the few ioctls nodedev needs, through the cffi shim `nodedev._native`.

Request numbers come from the kernel headers at build time (see build.py), never
from Python arithmetic, so they stay right on every architecture. Every failure is
an `OSError` carrying both the errno and the device path, because "ENOTTY" alone
does not tell an operator which of a dozen nodes is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

from nodedev._native import ffi, lib

KVM_API_VERSION: int = lib.KVM_API_VERSION
KVM_GET_API_VERSION: int = lib.KVM_GET_API_VERSION
KVM_CHECK_EXTENSION: int = lib.KVM_CHECK_EXTENSION
VFIO_API_VERSION: int = lib.VFIO_API_VERSION
VFIO_GET_API_VERSION: int = lib.VFIO_GET_API_VERSION
VFIO_CHECK_EXTENSION: int = lib.VFIO_CHECK_EXTENSION
VFIO_GROUP_GET_STATUS: int = lib.VFIO_GROUP_GET_STATUS
VFIO_GROUP_FLAGS_VIABLE: int = lib.VFIO_GROUP_FLAGS_VIABLE
VFIO_GROUP_FLAGS_CONTAINER_SET: int = lib.VFIO_GROUP_FLAGS_CONTAINER_SET
VFIO_TYPE1_IOMMU: int = lib.VFIO_TYPE1_IOMMU
VFIO_TYPE1v2_IOMMU: int = lib.VFIO_TYPE1v2_IOMMU


def _error(path: Path | str) -> OSError:
    """Builds the OSError from the errno cffi saved right after the C call returned."""
    code = ffi.errno
    return OSError(code, os.strerror(code), str(path))


def ioctl(fd: int, request: int, arg: int = 0, *, path: Path | str) -> int:
    """Runs ioctl(fd, request, arg) with an integer argument; `path` names fd in errors."""
    result = lib.nodedev_ioctl(fd, request, arg)
    if result == -1:
        raise _error(path)
    return int(result)


def query(path: Path, request: int, arg: int = 0) -> int:
    """Opens `path` read-write, runs one integer ioctl on it and closes it again.

    Opening per query keeps no descriptor alive between scans, so a node that is
    removed and recreated is always seen as it is now.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # its OSError already names path
    try:
        return ioctl(fd, request, arg, path=path)
    finally:
        os.close(fd)


def kvm_api_version(path: Path) -> int:
    """KVM_GET_API_VERSION on the node at `path` (/dev/kvm): 12 on every sane kernel."""
    return query(path, KVM_GET_API_VERSION)


def vfio_api_version(path: Path) -> int:
    """VFIO_GET_API_VERSION on a VFIO container node (/dev/vfio/vfio)."""
    return query(path, VFIO_GET_API_VERSION)


def vfio_group_viable(path: Path) -> bool:
    """Whether every device of the IOMMU group at `path` (/dev/vfio/N) is bound to vfio.

    A group that is not viable cannot be attached to a container: QEMU would fail
    at VM start, so the device should not be offered as Healthy.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = ffi.new("unsigned int *")
        if lib.nodedev_vfio_group_status(fd, flags) == -1:
            raise _error(path)
        return bool(flags[0] & VFIO_GROUP_FLAGS_VIABLE)
    finally:
        os.close(fd)
