"""What the kernel shows of VFIO under a sysfs root: vfio-pci functions, IOMMU groups, mdevs.

Built on `pci.PciTree`; the layout it adds (relative to the sysfs root):

    bus/pci/drivers/vfio-pci/<addr>                 every function bound to vfio-pci
    kernel/iommu_groups/<N>/devices/<member>        every member of group N (PCI or mdev)
    bus/mdev/devices/<uuid> -> ../../../devices/.../<parent>/<uuid>
    <mdev>/mdev_type -> ../mdev_supported_types/<type id>   with `name` ("GRID T4-1Q") inside
    <mdev>/iommu_group -> .../kernel/iommu_groups/<N>       each mdev has a group of its own
    <dev or mdev>/vfio-dev/vfio<X>                  the iommufd cdev, /dev/vfio/devices/vfio<X>

Nothing here opens a device node: the kernel lets one process at a time hold a
group's /dev/vfio/<N>, and a probe while a VM holds it would fail (or make the VM's
own open fail). Viability is judged from each member's `driver` link instead, by
the kernel's rule: a member may be bound to vfio-pci (or a vfio-pci variant) or
pci-stub, or to no driver at all; PCI-to-PCI bridges (class 0x0604, 0x0609) do not
count, whatever drives them. Anything else holds the group for the host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nodedev.drivers.pci import PciDevice, PciTree, is_pci_address, link_name, read_int, read_text

VFIO_PCI = "vfio-pci"
STUB_DRIVERS = frozenset({VFIO_PCI, "pci-stub"})
BRIDGE_CLASSES = frozenset({0x0604, 0x0609})
"""PCI-to-PCI bridges (normal and subtractive decode): the kernel lets pcieport keep them."""


def _listdir(path: Path | str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def driver_allowed(driver: str | None) -> bool:
    """Whether a group member bound to `driver` leaves the group usable by VFIO."""
    return driver is None or driver in STUB_DRIVERS or driver.endswith("_vfio_pci") or driver.endswith("-vfio-pci")


@dataclass(frozen=True, slots=True)
class Member:
    """One entry of `kernel/iommu_groups/N/devices`, as it is bound right now."""

    name: str
    """A PCI address, or an mdev's UUID."""
    driver: str | None
    pci_class: int | None
    ids: str
    """"10de:1eb8" for a PCI function; "" otherwise."""

    @property
    def is_bridge(self) -> bool:
        return self.pci_class is not None and self.pci_class >> 8 in BRIDGE_CLASSES

    def problem(self) -> str | None:
        """Why this member keeps the group from being viable, or None."""
        if not is_pci_address(self.name) or self.is_bridge or driver_allowed(self.driver):
            return None  # an mdev's group is its own and always viable
        ids = f" ({self.ids})" if self.ids else ""
        return f"{self.name}{ids} is bound to {self.driver}, not vfio-pci"


@dataclass(frozen=True, slots=True)
class Mdev:
    uuid: str
    type_id: str
    """The `mdev_supported_types` entry: "nvidia-222"."""
    type_name: str
    """Its `name` ("GRID T4-1Q"), or the type id when the type has no name file."""
    parent: str
    """The parent device's kernel name (a PCI address for a vGPU)."""
    group: int | None
    numa_node: int | None
    cdevs: tuple[str, ...]


class VfioTree:
    """The VFIO view of one sysfs root."""

    def __init__(self, sysfs_root: Path) -> None:
        self.root = Path(sysfs_root)
        self.pci = PciTree(self.root)
        self.pci_drivers = self.root / "bus" / "pci" / "drivers"
        self.vfio_pci = self.pci_drivers / VFIO_PCI
        self.groups = self.root / "kernel" / "iommu_groups"
        self.mdevs = self.root / "bus" / "mdev" / "devices"

    def vfio_bound(self) -> list[str]:
        """Addresses bound to vfio-pci: the driver's own directory lists them, so the other
        functions of the node are never read."""
        return [name for name in _listdir(self.vfio_pci) if is_pci_address(name)]

    def device(self, address: str) -> PciDevice | None:
        return self.pci.read_device(address)

    def group_dir(self, group: int) -> Path:
        return self.groups / str(group) / "devices"

    def members(self, group: int) -> list[Member]:
        """The group's members as bound now; empty when the group is gone."""
        found = []
        base = self.group_dir(group)
        for name in _listdir(base):
            path = base / name
            if is_pci_address(name):
                vendor, device = read_text(path / "vendor"), read_text(path / "device")
                ids = f"{vendor[2:]}:{device[2:]}" if vendor and device else ""
                found.append(Member(name, link_name(path / "driver"), read_int(path / "class"), ids.lower()))
            else:
                found.append(Member(name, link_name(path / "driver"), None, ""))
        return found

    def member_dirs(self, group: int) -> list[Path]:
        """Where each member really is (its `driver` link is replaced there on a rebind)."""
        base = self.group_dir(group)
        return [Path(os.path.realpath(base / name)) for name in _listdir(base)]

    def mdev_uuids(self) -> list[str]:
        return _listdir(self.mdevs)

    def mdev(self, uuid: str) -> Mdev | None:
        """One mediated device; None if it is gone (or goes while it is read)."""
        link = self.mdevs / uuid
        real = Path(os.path.realpath(link))
        type_id = link_name(link / "mdev_type")
        if not real.is_dir() or type_id is None:
            return None
        group = link_name(link / "iommu_group")
        numa = read_int(real.parent / "numa_node")
        return Mdev(
            uuid=uuid,
            type_id=type_id,
            type_name=read_text(link / "mdev_type" / "name") or type_id,
            parent=real.parent.name,
            group=int(group) if group is not None and group.isdigit() else None,
            numa_node=numa if numa is not None and numa >= 0 else None,
            cdevs=tuple(n for n in _listdir(link / "vfio-dev") if n.startswith("vfio")),
        )
