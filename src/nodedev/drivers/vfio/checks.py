"""The VFIO checks, each answering "what is wrong" in one line, or None.

The ioctls go through the cffi shim (`nodedev.native`), whose request numbers come
from linux/vfio.h at build time. They run only where opening a node is harmless:
`/dev/vfio/vfio` (any number of openers) at start, and a group node in
PreStartContainer, just before the VM opens it. Scans use `viability_problem`,
which reads sysfs only.
"""

from __future__ import annotations

from pathlib import Path

from nodedev import native
from nodedev.drivers.vfio.discovery import VfioTree


def _failed(what: str, err: OSError, path: Path) -> str:
    return f"{what} on {path} failed: [Errno {err.errno}] {err.strerror}"


def api_problem(path: Path) -> str | None:
    """The container node answers this kernel's VFIO API and offers a type-1 IOMMU."""
    try:
        version = native.vfio_api_version(path)
    except OSError as err:
        return _failed("VFIO_GET_API_VERSION", err, path)
    if version != native.VFIO_API_VERSION:
        return f"{path} answers VFIO API {version}, expected {native.VFIO_API_VERSION}"
    for extension in (native.VFIO_TYPE1v2_IOMMU, native.VFIO_TYPE1_IOMMU):
        try:
            if native.query(path, native.VFIO_CHECK_EXTENSION, extension) > 0:
                return None
        except OSError as err:
            return _failed("VFIO_CHECK_EXTENSION", err, path)
    return f"{path} offers no type-1 IOMMU (VFIO_CHECK_EXTENSION): is the IOMMU enabled (intel_iommu=on, amd_iommu)?"


def viability_problem(tree: VfioTree, group: int) -> str | None:
    """The first member that keeps the group from being viable, from sysfs alone."""
    members = tree.members(group)
    if not members:
        return f"IOMMU group {group} has no members in {tree.group_dir(group)}"
    for member in members:
        problem = member.problem()
        if problem is not None:
            return f"IOMMU group {group} is not viable: {problem}"
    return None


def group_status_problem(node: Path, group: int, named: str | None = None) -> str | None:
    """VFIO_GROUP_GET_STATUS on the group node (opened, asked, closed at once); `named`
    is what sysfs says is wrong, used to name the member when the kernel says not viable."""
    try:
        viable = native.vfio_group_viable(node)
    except OSError as err:
        return f"IOMMU group {group}: " + _failed("VFIO_GROUP_GET_STATUS", err, node)
    if viable:
        return None
    return (named or f"IOMMU group {group} is not viable, though sysfs shows no member held by a host driver") + f" (VFIO_GROUP_GET_STATUS on {node})"


def pre_start_problem(tree: VfioTree, group: int, node: Path, *, ioctl: bool) -> str | None:
    """The kernel's answer when `ioctl` (sysfs naming the member at fault); else sysfs alone."""
    from_sysfs = viability_problem(tree, group)
    return group_status_problem(node, group, from_sysfs) if ioctl else from_sysfs
