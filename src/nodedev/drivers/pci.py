"""Reading PCI devices from sysfs: what the SR-IOV, RDMA and VFIO drivers share.

Everything here is read under a sysfs root (`/sys`, or a fixture tree laid out as
the kernel lays it out, see `sysfs_tree`), never through absolute paths, and
nothing here knows about resources, selectors or health: it answers "what is
this PCI function" and leaves policy to the drivers.

The kernel's layout, relative to the sysfs root, that this module relies on:

    bus/pci/devices/<addr> -> ../../../devices/pci0000:00/.../<addr>
    <dev>/vendor, device, class      "0x15b3", "0x101e", "0x020000"
    <dev>/numa_node                  "-1" when the platform says nothing
    <dev>/driver -> .../bus/pci/drivers/<name>            absent when unbound
    <dev>/iommu_group -> .../kernel/iommu_groups/<N>      absent without an IOMMU
    <dev>/iommu_group/name           "vfio-noiommu" for a no-IOMMU group (rare)
    <dev>/sriov_totalvfs, sriov_numvfs                    only on SR-IOV PFs
    <dev>/virtfn<i> -> ../<vf addr>                       one per enabled VF
    <dev>/physfn -> ../<pf addr>                          only on VFs
    <dev>/acpi_index                                      only with firmware naming
    <dev>/infiniband/<hca>                                RDMA-capable functions
    <dev>/infiniband_verbs/uverbs<N>, infiniband_mad/umad<N>, issm<N>
    <dev>/vfio-dev/vfio<N>                                the iommufd cdev, if any
    class/net/<if> -> ../../devices/.../<if>             every network interface

A device's network interfaces are found from `class/net/<if>/device`, walked
up to the nearest PCI function, not by listing `<dev>/net`: a virtio NIC keeps
its interface at `<dev>/virtio2/net/eth0`, one level further down (the SR-IOV
device plugin misses it). `netdevs_by_address()` does the walk once for all
interfaces, so a scan pays one readlink per interface, not one listing per
device.

A device that vanishes while it is read (a VF removed when `sriov_numvfs` is
rewritten, a PF hot-unplugged) makes `read_device` return None: callers drop it
rather than report a half-read device.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
"""A full PCI address as sysfs spells it: domain:bus:device.function, lower-case hex."""

CLASS_NETWORK = 0x02
CLASS_PROCESSING_ACCELERATOR = 0x12
NOIOMMU_GROUP_NAME = "vfio-noiommu"


def is_pci_address(name: str) -> bool:
    return PCI_ADDRESS.match(name) is not None


@dataclass(frozen=True, slots=True)
class PciDevice:
    """One PCI function as sysfs shows it right now. IDs are lower-case hex without `0x`."""

    address: str
    vendor: str
    """"8086", "15b3": the form SR-IOV selectors and `lspci -n` use."""
    device: str
    pci_class: int
    """The 24-bit class code: 0x020000 is an Ethernet controller."""
    driver: str | None
    """Basename of the `driver` link (`iavf`, `vfio-pci`); None when nothing is bound."""
    numa_node: int | None
    """None when sysfs says -1 or nothing."""
    iommu_group: int | None
    iommu_group_name: str | None
    """The group's `name` file: "vfio-noiommu" for a no-IOMMU group, else usually None."""
    physfn: str | None
    """The PF's address when this is a VF; also set when the PF has vanished (dangling link)."""
    total_vfs: int | None
    """`sriov_totalvfs`: None when the function is not an SR-IOV PF."""
    num_vfs: int
    """`sriov_numvfs`: VFs currently enabled (0 for anything but a PF with VFs)."""
    virtfns: tuple[str, ...]
    """VF addresses in VF-index order (`virtfn0`, `virtfn1`, ...)."""
    acpi_index: str | None
    rdma_devices: tuple[str, ...]
    """Names under `infiniband/` (`mlx5_0`): the function is RDMA-capable."""
    uverbs: tuple[str, ...]
    """`uverbsN` names under `infiniband_verbs/`."""
    mad: tuple[str, ...]
    """`umadN` and `issmN` names under `infiniband_mad/`."""
    vfio_cdevs: tuple[str, ...]
    """`vfioN` names under `vfio-dev/` (the iommufd per-device nodes)."""

    @property
    def base_class(self) -> int:
        """The top byte of the class code: 0x02 network, 0x12 processing accelerator."""
        return self.pci_class >> 16

    @property
    def is_vf(self) -> bool:
        return self.physfn is not None

    @property
    def is_pf(self) -> bool:
        return self.total_vfs is not None


def read_text(path: Path | str, dir_fd: int | None = None) -> str | None:
    """A small sysfs file, stripped; None if it is absent or cannot be read.

    With `dir_fd`, `path` is relative to that open directory: every file of one
    device read through one handle, so a device renamed or removed mid-read is seen."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode(errors="replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def read_int(path: Path | str) -> int | None:
    """A decimal or 0x-hex sysfs number; None if absent or garbled."""
    return parse_int(read_text(path))


def parse_int(text: str | None) -> int | None:
    """Decimal or 0x-hex sysfs numbers; None for a missing or garbled file."""
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def link_name(path: Path | str) -> str | None:
    """The basename of a symlink's target (`driver`, `physfn`, `iommu_group`); None if no link."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _listdir(path: Path | str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _hex_id(path: str) -> str | None:
    text = read_text(path)
    if text is None:
        return None
    text = text.lower().removeprefix("0x")
    return text if re.fullmatch(r"[0-9a-f]{1,4}", text) else None


def _names(base: str, entries: set[str], directory: str, prefixes: tuple[str, ...] = ("",)) -> tuple[str, ...]:
    """Sorted entries of an optional subdirectory, listed only when the device has it."""
    if directory not in entries:
        return ()
    return tuple(sorted(n for n in _listdir(f"{base}/{directory}") if n.startswith(prefixes)))


class PciTree:
    """The PCI functions under one sysfs root."""

    def __init__(self, sysfs_root: Path) -> None:
        self.sysfs_root = Path(sysfs_root)
        self.devices_dir = self.sysfs_root / "bus" / "pci" / "devices"
        self.class_net = self.sysfs_root / "class" / "net"

    def path(self, address: str) -> Path:
        """`bus/pci/devices/<address>`: the link; the kernel resolves it to `devices/...`."""
        return self.devices_dir / address

    def addresses(self) -> list[str]:
        """Every PCI function present, sorted."""
        return sorted(name for name in _listdir(self.devices_dir) if is_pci_address(name))

    def real_path(self, address: str) -> Path:
        """Where the device directory really is (`devices/pci0000:00/.../<address>`)."""
        try:
            target = os.readlink(self.path(address))
        except OSError:
            return Path(os.path.realpath(self.path(address)))
        return Path(os.path.normpath(os.path.join(self.devices_dir, target)))

    def netdev_path(self, name: str) -> Path:
        """Where an interface's directory really is (`devices/.../net/<name>`)."""
        try:
            target = os.readlink(self.class_net / name)
        except OSError:
            return Path(os.path.realpath(self.class_net / name))
        return Path(os.path.normpath(os.path.join(self.class_net, target)))

    def pci_class(self, address: str) -> int | None:
        """Only the class code: cheap enough to filter thousands of functions before reading them."""
        return read_int(f"{self.devices_dir}/{address}/class")

    def read_device(self, address: str) -> PciDevice | None:
        """Everything the drivers use about one function; None if it is not (or no longer) there.

        The directory is listed first and optional files are read only when listed, so
        a VF costs about eight system calls."""
        base = f"{self.devices_dir}/{address}"
        try:
            entries = set(os.listdir(base))
        except OSError:
            return None
        pci_class = read_int(f"{base}/class")
        vendor = _hex_id(f"{base}/vendor")
        device = _hex_id(f"{base}/device")
        if pci_class is None or vendor is None or device is None:
            return None
        numa = read_int(f"{base}/numa_node")
        group = link_name(f"{base}/iommu_group") if "iommu_group" in entries else None
        total_vfs = read_int(f"{base}/sriov_totalvfs") if "sriov_totalvfs" in entries else None
        virtfns = sorted(
            (int(name[6:]), target) for name in entries if name.startswith("virtfn") and name[6:].isdigit() and (target := link_name(f"{base}/{name}"))
        )
        found = PciDevice(
            address=address,
            vendor=vendor,
            device=device,
            pci_class=pci_class,
            driver=link_name(f"{base}/driver") if "driver" in entries else None,
            numa_node=numa if numa is not None and numa >= 0 else None,
            iommu_group=int(group) if group is not None and group.isdigit() else None,
            iommu_group_name=read_text(f"{base}/iommu_group/name") if group is not None else None,
            physfn=link_name(f"{base}/physfn") if "physfn" in entries else None,
            total_vfs=total_vfs,
            num_vfs=(read_int(f"{base}/sriov_numvfs") or 0) if total_vfs is not None else 0,
            virtfns=tuple(target for _, target in virtfns),
            acpi_index=read_text(f"{base}/acpi_index") if "acpi_index" in entries else None,
            rdma_devices=_names(base, entries, "infiniband"),
            uverbs=_names(base, entries, "infiniband_verbs", ("uverbs",)),
            mad=_names(base, entries, "infiniband_mad", ("umad", "issm")),
            vfio_cdevs=_names(base, entries, "vfio-dev", ("vfio",)),
        )
        if not os.path.isdir(base):  # removed while being read: its files may be a mix
            return None
        return found

    def pf_present(self, address: str) -> bool:
        return os.path.isdir(self.path(address))

    def netdevs_by_address(self, names: Iterable[str] | None = None) -> dict[str, list[str]]:
        """PCI address -> its network interfaces (sorted), from `class/net/<if>`.

        `class/net/<if>` links to `devices/.../<pci>[/virtio2]/net/<if>`, and the
        interface's `device` link is the directory above `net`: the nearest PCI
        address in that path is the function. It is read from the one link (one
        readlink per interface), falling back to resolving `<if>/device` for a
        link of another shape. `names` limits the walk to those interfaces
        (default: all). Virtual interfaces (under `devices/virtual`) are left out.
        """
        found: dict[str, list[str]] = {}
        for name in sorted(_listdir(self.class_net) if names is None else names):
            address = _pci_in_link(f"{self.class_net}/{name}")
            if address is None:
                address = pci_parent(self.class_net / name / "device")
            if address is not None:
                found.setdefault(address, []).append(name)
        return found


def _pci_in_link(path: str) -> str | None:
    """The last PCI address before `/net/` in a `class/net` link's target, if it has one."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    above, sep, _ = target.rpartition("/net/")
    if not sep:
        return None
    for part in reversed(above.split("/")):
        if is_pci_address(part):
            return part
    return None


def pci_parent(path: Path) -> str | None:
    """The nearest PCI function at or above where `path` leads (a netdev's `device`,
    which is `virtio2` for a virtio NIC); None if the path is missing or not under one."""
    try:
        real = os.path.realpath(path, strict=True)
    except OSError:
        return None
    for part in reversed(Path(real).parts):
        if is_pci_address(part):
            return part
    return None
