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
from collections.abc import Iterable, Mapping
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
    """The group's `name` file, read under vfio-pci only: "vfio-noiommu" for a no-IOMMU group, else usually None."""
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


def link_name(path: Path | str, dir_fd: int | None = None) -> str | None:
    """The basename of a symlink's target (`driver`, `physfn`, `iommu_group`); None if no link."""
    try:
        return os.path.basename(os.readlink(path, dir_fd=dir_fd))
    except OSError:
        return None


def _listdir(path: Path | str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _hex_id(name: str, dir_fd: int) -> str | None:
    text = read_text(name, dir_fd)
    if text is None:
        return None
    text = text.lower().removeprefix("0x")
    return text if re.fullmatch(r"[0-9a-f]{1,4}", text) else None


def _int(name: str, dir_fd: int) -> int | None:
    return parse_int(read_text(name, dir_fd))


def _names(dir_fd: int, entries: set[str], directory: str, prefixes: tuple[str, ...] = ("",)) -> tuple[str, ...]:
    """Sorted entries of an optional subdirectory, listed only when the device has it."""
    if directory not in entries:
        return ()
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return ()
    try:
        return tuple(sorted(n for n in os.listdir(fd) if n.startswith(prefixes)))
    finally:
        os.close(fd)


class PciTree:
    """The PCI functions under one sysfs root."""

    def __init__(self, sysfs_root: Path) -> None:
        self.sysfs_root = Path(sysfs_root)
        self.devices_dir = self.sysfs_root / "bus" / "pci" / "devices"
        self.class_net = self.sysfs_root / "class" / "net"
        self.drivers_dir = self.sysfs_root / "bus" / "pci" / "drivers"

    def path(self, address: str) -> Path:
        """`bus/pci/devices/<address>`: the link; the kernel resolves it to `devices/...`."""
        return self.devices_dir / address

    def addresses(self) -> list[str]:
        """Every PCI function present, sorted."""
        return sorted(name for name in _listdir(self.devices_dir) if is_pci_address(name))

    def driver_dirs(self) -> list[Path]:
        """`bus/pci/drivers/<name>`, sorted: binding links `<name>/<address>` there."""
        return [self.drivers_dir / name for name in sorted(_listdir(self.drivers_dir))]

    def bound_to(self, driver: str) -> list[str]:
        """The functions `bus/pci/drivers/<driver>` links to; none if there is no such driver."""
        return [name for name in _listdir(f"{self.drivers_dir}/{driver}") if is_pci_address(name)]

    def real_path(self, address: str) -> Path:
        """Where the device directory really is (`devices/pci0000:00/.../<address>`)."""
        link = f"{self.devices_dir}/{address}"
        try:
            target = os.readlink(link)
        except OSError:
            return Path(os.path.realpath(link))
        return Path(os.path.normpath(os.path.join(link, "..", target)))

    def netdev_path(self, name: str) -> Path:
        """Where an interface's directory really is (`devices/.../net/<name>`)."""
        try:
            target = os.readlink(self.class_net / name)
        except OSError:
            return Path(os.path.realpath(self.class_net / name))
        return Path(os.path.normpath(os.path.join(self.class_net, target)))

    def read_device(self, address: str) -> PciDevice | None:
        """Everything the drivers use about one function; None if it is not (or no longer) there.

        Every file is read through one handle on the device's directory, so the
        kernel resolves the long `devices/pci0000:00/...` path once, not once a
        file, and a device removed mid-read is noticed. The directory is listed
        first and optional files are read only when listed: a VF costs about
        eight system calls. The group's `name` is read only under vfio-pci, the
        one driver it matters to (vfio-noiommu names its groups; others do not)."""
        try:
            fd = os.open(f"{self.devices_dir}/{address}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return _read_device(address, fd)
        finally:
            os.close(fd)

    def netdev_names(self) -> list[str]:
        """Every interface in `class/net`, in no particular order."""
        return _listdir(self.class_net)

    def netdev_address(self, name: str) -> str | None:
        """The PCI function an interface belongs to (see `netdevs_by_address`); None if virtual or gone."""
        address = _pci_in_link(f"{self.class_net}/{name}")
        return address if address is not None else pci_parent(self.class_net / name / "device")

    def infiniband_address(self, name: str) -> str | None:
        """The PCI function of an RDMA device (`class/infiniband/mlx5_0 -> ../../devices/.../<pci>/infiniband/mlx5_0`)."""
        return _pci_in_link(f"{self.sysfs_root}/class/infiniband/{name}", "/infiniband/")

    def netdevs_by_address(self, names: Iterable[str] | None = None) -> dict[str, list[str]]:
        """PCI address -> its network interfaces (sorted), from `class/net/<if>`.

        `class/net/<if>` links to `devices/.../<pci>[/virtio2]/net/<if>`, and the
        interface's `device` link is the directory above `net`: the nearest PCI
        address in that path is the function. It is read from the one link (one
        readlink per interface), falling back to resolving `<if>/device` for a
        link of another shape. `names` limits the walk to those interfaces
        (default: all). Virtual interfaces (under `devices/virtual`) are left out.
        """
        return group_by_address({name: self.netdev_address(name) for name in (self.netdev_names() if names is None else names)})


def group_by_address(addresses: Mapping[str, str | None]) -> dict[str, list[str]]:
    """Interface -> PCI address (None: not on PCI) turned into PCI address -> sorted interfaces."""
    found: dict[str, list[str]] = {}
    for name in sorted(addresses):
        address = addresses[name]
        if address is not None:
            found.setdefault(address, []).append(name)
    return found


def _pci_in_link(path: str, marker: str = "/net/") -> str | None:
    """The last PCI address before `marker` in a `class/...` link's target, if it has one."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    above, sep, _ = target.rpartition(marker)
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


def _read_device(address: str, fd: int) -> PciDevice | None:
    try:
        entries = set(os.listdir(fd))
    except OSError:
        return None
    pci_class = _int("class", fd)
    vendor = _hex_id("vendor", fd)
    device = _hex_id("device", fd)
    if pci_class is None or vendor is None or device is None:
        return None
    numa = _int("numa_node", fd)
    driver = link_name("driver", fd) if "driver" in entries else None
    group = link_name("iommu_group", fd) if "iommu_group" in entries else None
    total_vfs = _int("sriov_totalvfs", fd) if "sriov_totalvfs" in entries else None
    virtfns = sorted((int(name[6:]), target) for name in entries if name.startswith("virtfn") and name[6:].isdigit() and (target := link_name(name, fd)))
    found = PciDevice(
        address=address,
        vendor=vendor,
        device=device,
        pci_class=pci_class,
        driver=driver,
        numa_node=numa if numa is not None and numa >= 0 else None,
        iommu_group=int(group) if group is not None and group.isdigit() else None,
        iommu_group_name=read_text("iommu_group/name", fd) if group is not None and driver == "vfio-pci" else None,
        physfn=link_name("physfn", fd) if "physfn" in entries else None,
        total_vfs=total_vfs,
        num_vfs=(_int("sriov_numvfs", fd) or 0) if total_vfs is not None else 0,
        virtfns=tuple(target for _, target in virtfns),
        acpi_index=read_text("acpi_index", fd) if "acpi_index" in entries else None,
        rdma_devices=_names(fd, entries, "infiniband"),
        uverbs=_names(fd, entries, "infiniband_verbs", ("uverbs",)),
        mad=_names(fd, entries, "infiniband_mad", ("umad", "issm")),
        vfio_cdevs=_names(fd, entries, "vfio-dev", ("vfio",)),
    )
    try:
        os.stat("class", dir_fd=fd)
    except OSError:  # removed while being read: its files may be a mix
        return None
    return found
