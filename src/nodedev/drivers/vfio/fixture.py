"""VFIO fixture trees on top of `sysfs_tree.SysfsTree`: shared IOMMU groups, iommufd cdevs,
mediated devices, and group nodes that come and go as the kernel makes them.

`SysfsTree` gives every function a group of its own; here the groups are made by
this class instead (`add_pci(..., group=N)` joins an existing one), with the
kernel's links:

    kernel/iommu_groups/N/devices/X  -> ../../../../devices/pci0000:00/X
    devices/pci0000:00/X/iommu_group -> ../../../kernel/iommu_groups/N
    bus/mdev/devices/U               -> ../../../devices/pci0000:00/P/U
    devices/pci0000:00/P/U/mdev_type -> ../mdev_supported_types/T   (T/name: "GRID T4-1Q")
    devices/pci0000:00/P/U/iommu_group -> ../../../../kernel/iommu_groups/N

and `<dev>/vfio/N` exists exactly while a member of group N is bound to vfio-pci
(or the group is an mdev's), as the kernel's vfio module keeps it. Build with
this class only (not `SysfsTree.add_pci`/`set_numvfs` directly), so the group
numbers it hands out cannot collide.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nodedev.drivers.sysfs_tree import VFIO_GROUP_MAJOR, SysfsTree

VFIO_PCI = "vfio-pci"
VFIO_CDEV_MAJOR = 506
IOMMU_MISC_MINOR = 122
MDEV_DRIVER = "vfio_mdev"
CLASS_BRIDGE = 0x060400


class VfioFixture:
    """A SysfsTree (at `root/sys`, `root/dev`) with VFIO's groups, cdevs and mdevs."""

    def __init__(self, root: Path, *, char_devices: bool = True) -> None:
        self.tree = SysfsTree(root, char_devices=char_devices)
        self.sys = self.tree.sys
        self.dev = self.tree.dev
        self._groups: dict[str, int] = {}
        self._mdev_parents: dict[str, str] = {}
        self._next = 0

    def group_of(self, name: str) -> int:
        return self._groups[name]

    def group_node(self, group: int) -> Path:
        return self.dev / "vfio" / str(group)

    def new_group(self) -> int:
        self._next += 1
        return self._next - 1

    # -- PCI functions -------------------------------------------------------------------

    def add_pci(
        self,
        address: str,
        *,
        vendor: int,
        device: int,
        pci_class: int = 0x030200,
        driver: str | None = VFIO_PCI,
        numa_node: int = -1,
        group: int | None = None,
        cdev: int | None = None,
    ) -> int:
        """A function in `group` (a new one by default), bound to `driver`; returns the group.
        `cdev` gives it the iommufd node `vfio-dev/vfio<cdev>` (and /dev/iommu)."""
        self.tree.add_pci(address, vendor=vendor, device=device, pci_class=pci_class, numa_node=numa_node, iommu=False)
        number = self.new_group() if group is None else group
        group_dir = self.sys / "kernel" / "iommu_groups" / str(number) / "devices"
        group_dir.mkdir(parents=True, exist_ok=True)
        os.symlink(f"../../../../devices/pci0000:00/{address}", group_dir / address)
        os.symlink(f"../../../kernel/iommu_groups/{number}", self.tree.device_dir(address) / "iommu_group")
        self._groups[address] = number
        if cdev is not None:
            (self.tree.device_dir(address) / "vfio-dev" / f"vfio{cdev}").mkdir(parents=True)
            self.tree.add_char(f"vfio/devices/vfio{cdev}", VFIO_CDEV_MAJOR, cdev)
            self.tree.add_char("iommu", 10, IOMMU_MISC_MINOR)
        if driver is not None:
            self.bind(address, driver)
        return number

    def bind(self, address: str, driver: str) -> None:
        """Rebinds (the `driver` link replaced in one rename); the group node follows."""
        self.tree.bind(address, driver)
        self._sync_node(self._groups[address])

    def unbind(self, address: str) -> None:
        self.tree.unbind(address)
        self._sync_node(self._groups[address])

    def remove(self, address: str) -> None:
        """Hot-unplug of one function; the rest of its group stays."""
        number = self._groups.pop(address)
        group_dir = self.sys / "kernel" / "iommu_groups" / str(number)
        (group_dir / "devices" / address).unlink()
        (self.tree.device_dir(address) / "iommu_group").unlink()
        self.tree.remove(address)
        if not os.listdir(group_dir / "devices"):
            shutil.rmtree(group_dir)
        self._sync_node(number)

    # -- mediated devices ------------------------------------------------------------------

    def add_mdev(self, parent: str, uuid: str, type_id: str, type_name: str | None, *, cdev: int | None = None) -> int:
        """An mdev of type `type_id` (with `name` = `type_name`, or no name file) on `parent`,
        in a new group of its own, linked into `bus/mdev/devices` last; returns the group."""
        parent_dir = self.tree.device_dir(parent)
        type_dir = parent_dir / "mdev_supported_types" / type_id
        if not type_dir.is_dir():
            (type_dir / "devices").mkdir(parents=True)
            (type_dir / "device_api").write_text("vfio-pci\n")
            (type_dir / "available_instances").write_text("4\n")
            if type_name is not None:
                (type_dir / "name").write_text(type_name + "\n")
        number = self.new_group()
        base = parent_dir / uuid
        base.mkdir()
        (base / "uevent").write_text(f"MDEV_TYPE={type_id}\n")
        os.symlink(f"../mdev_supported_types/{type_id}", base / "mdev_type")
        os.symlink(f"../../../../kernel/iommu_groups/{number}", base / "iommu_group")
        os.symlink("../../../../bus/mdev", base / "subsystem")
        drivers = self.sys / "bus" / "mdev" / "drivers" / MDEV_DRIVER
        drivers.mkdir(parents=True, exist_ok=True)
        os.symlink(f"../../../../devices/pci0000:00/{parent}/{uuid}", drivers / uuid)
        os.symlink(f"../../../../bus/mdev/drivers/{MDEV_DRIVER}", base / "driver")
        os.symlink(f"../../../{parent}/{uuid}", type_dir / "devices" / uuid)
        group_dir = self.sys / "kernel" / "iommu_groups" / str(number) / "devices"
        group_dir.mkdir(parents=True)
        os.symlink(f"../../../../devices/pci0000:00/{parent}/{uuid}", group_dir / uuid)
        if cdev is not None:
            (base / "vfio-dev" / f"vfio{cdev}").mkdir(parents=True)
            self.tree.add_char(f"vfio/devices/vfio{cdev}", VFIO_CDEV_MAJOR, cdev)
            self.tree.add_char("iommu", 10, IOMMU_MISC_MINOR)
        self._groups[uuid] = number
        self._mdev_parents[uuid] = parent
        self.tree.add_char("vfio/vfio")
        self.tree.add_char(f"vfio/{number}", VFIO_GROUP_MAJOR, number)
        bus = self.sys / "bus" / "mdev" / "devices"
        bus.mkdir(parents=True, exist_ok=True)
        os.symlink(f"../../../devices/pci0000:00/{parent}/{uuid}", bus / uuid)
        return number

    def remove_mdev(self, uuid: str) -> None:
        """`echo 1 > remove`: the bus link first, then the rest."""
        parent = self._mdev_parents.pop(uuid)
        number = self._groups.pop(uuid)
        (self.sys / "bus" / "mdev" / "devices" / uuid).unlink()
        (self.sys / "bus" / "mdev" / "drivers" / MDEV_DRIVER / uuid).unlink()
        base = self.tree.device_dir(parent) / uuid
        type_id = os.path.basename(os.readlink(base / "mdev_type"))
        (self.tree.device_dir(parent) / "mdev_supported_types" / type_id / "devices" / uuid).unlink()
        shutil.rmtree(base)
        shutil.rmtree(self.sys / "kernel" / "iommu_groups" / str(number))
        self.group_node(number).unlink(missing_ok=True)

    # -- internals -------------------------------------------------------------------------

    def _sync_node(self, group: int) -> None:
        """`/dev/vfio/<group>` while some member is bound to vfio-pci, and only then."""
        members = [name for name, number in self._groups.items() if number == group]
        links = [self.tree.device_dir(m) / "driver" for m in members]
        bound = any(os.path.basename(os.readlink(link)) == VFIO_PCI for link in links if link.is_symlink())
        if bound:
            self.tree.add_char("vfio/vfio")
            self.tree.add_char(f"vfio/{group}", VFIO_GROUP_MAJOR, group)
        else:
            self.group_node(group).unlink(missing_ok=True)
