"""What a scan of the sriov driver reads of the node, and what it reuses from the scan before.

A node with 16 PFs of 256 VFs lists 4,096 functions and 4,096 interfaces.
Reading them all takes a quarter of a second; one rebind changes one VF. So
the reader keeps what it read, and a scan told what changed (`changed`: the
kernel names of uevents, or the same names from a fixture tree's inotify
events) reads only that: each PCI address named (present, gone or new), each
interface named, the function of each RDMA device named (an `infiniband`
event names `mlx5_3`, not its function), and the PF of a VF that came or went
(its `virtfn*` changed, and no event names it). Nothing is listed then: every
function or interface that comes or goes is named by an event, and a full
scan (at start, at the periodic resync, after lost events) lists both
directories again. The reading says which functions differ (`dirty`), so the
driver re-decides only those.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from nodedev.drivers.pci import PciDevice, PciTree, group_by_address, is_pci_address


@dataclass(frozen=True, slots=True)
class Reading:
    devices: dict[str, PciDevice]
    """Functions of the wanted classes, by address, in address order."""
    wholes: dict[str, PciDevice]
    """Those that are not VFs (PFs, NICs without SR-IOV): a handful, even among 4,096 VFs."""
    before: dict[str, PciDevice]
    """`devices` as the last reading had them (a PF that left still names its VFs there)."""
    netdevs: dict[str, list[str]]
    """PCI address -> its interfaces, sorted."""
    netdev_of: dict[str, str | None]
    """Interface -> its PCI address (None: not on PCI)."""
    listed: frozenset[str]
    """Every PCI address present, of any class."""
    dirty: frozenset[str] | None
    """Addresses whose function or interfaces differ from the last reading (or left); None: all may."""


class NodeReader:
    """Reads `bus/pci/devices` and `class/net` under one sysfs root, keeping what it read."""

    def __init__(self, tree: PciTree, classes: frozenset[int]) -> None:
        self.tree = tree
        self._classes = classes
        self._listed: list[str] = []
        """Every PCI address present, sorted."""
        self._listed_set: frozenset[str] = frozenset()
        self._devices: dict[str, PciDevice] = {}
        self._others: set[str] = set()
        """Functions of classes no resource takes: listed, not read again unless named."""
        self._wholes: dict[str, PciDevice] = {}
        self._netdev_of: dict[str, str | None] = {}
        """Interface -> its PCI function (None: virtual)."""
        self._netdevs: dict[str, list[str]] = {}
        self._rdma_of: dict[str, str] = {}
        """RDMA device -> its function, as the functions read say."""
        self._unread: set[str] = set()
        """Listed but not readable yet (a function half made): tried again at every scan."""

    def read(self, changed: Collection[str] | None) -> Reading:
        """Everything when `changed` is None; else what `changed` names (see the module docstring)."""
        before = self._devices
        if changed is None:
            self._read_all()
            dirty = None
        else:
            names = frozenset(changed)
            moved = self._read_netdevs(names)
            reread = self._read_devices({n for n in names if is_pci_address(n)} | self._rdma_functions(names) | self._unread)
            dirty = frozenset(moved | reread)
        if dirty is None or dirty:
            touched = self._devices.keys() if dirty is None else self._wholes.keys() | dirty
            self._wholes = {a: d for a in sorted(touched) if (d := self._devices.get(a)) is not None and not d.is_vf}
        return Reading(self._devices, self._wholes, before, self._netdevs, self._netdev_of, self._listed_set, dirty)

    def _read_all(self) -> None:
        self._set_listed(self.tree.addresses())
        self._netdev_of = {name: self.tree.netdev_address(name) for name in self.tree.netdev_names()}
        self._netdevs = group_by_address(self._netdev_of)
        devices: dict[str, PciDevice] = {}
        self._others, self._unread = set(), set()
        for address in self._listed:
            self._read_one(address, devices)
        self._devices = devices
        self._rdma_of = {rdma: a for a, d in devices.items() for rdma in d.rdma_devices}

    def _set_listed(self, addresses: Iterable[str]) -> None:
        self._listed = sorted(addresses)
        self._listed_set = frozenset(self._listed)

    # -- interfaces ---------------------------------------------------------------------

    def _read_netdevs(self, names: frozenset[str]) -> set[str]:
        """Reads the interfaces named; returns the functions whose interface list changed."""
        known = self._netdev_of
        of: dict[str, str | None] | None = None
        for name in names:
            present = os.path.lexists(f"{self.tree.class_net}/{name}")
            if not present and name not in known:
                continue  # not an interface: a PCI address, `driver`, `net`, ...
            address = self.tree.netdev_address(name) if present else None
            if present == (name in known) and address == known.get(name):
                continue
            of = dict(known) if of is None else of
            if present:
                of[name] = address
            else:
                del of[name]
        if of is None:
            return set()
        moved = {a for n in names for a in (known.get(n), of.get(n)) if a is not None}
        before = self._netdevs
        netdevs = dict(before)
        for address in moved:
            there = sorted(n for n in {*netdevs.pop(address, []), *names} if of.get(n) == address)
            if there:
                netdevs[address] = there
        self._netdev_of, self._netdevs = of, netdevs
        return {a for a in moved if netdevs.get(a) != before.get(a)}

    # -- functions ----------------------------------------------------------------------

    def _rdma_functions(self, names: frozenset[str]) -> set[str]:
        """The functions of the RDMA devices named, whether they came (their `class/infiniband`
        link says where) or went (the function read last said it had them)."""
        found: set[str] = set()
        for name in names:
            if is_pci_address(name):
                continue
            if (address := self._rdma_of.get(name)) is not None:
                found.add(address)
            if (address := self.tree.infiniband_address(name)) is not None:
                found.add(address)
        return found

    def _read_devices(self, named: set[str]) -> set[str]:
        """Reads the functions named; returns those that differ or left."""
        old = self._devices
        present = {a for a in named if os.path.lexists(f"{self.tree.devices_dir}/{a}")}
        gone = (named - present) & self._listed_set
        came = present - self._listed_set
        if gone or came:
            self._set_listed((self._listed_set - gone) | came)
        devices = dict(old)
        for address in gone:
            devices.pop(address, None)
            self._others.discard(address)
            self._unread.discard(address)
        for address in present:
            self._read_one(address, devices)
        # A VF that came or went changed its PF's `virtfn*` and `sriov_numvfs` too.
        vfs = [d for a in came if (d := devices.get(a)) is not None] + [d for a in gone if (d := old.get(a)) is not None]
        pfs = {d.physfn for d in vfs if d.physfn is not None and d.physfn in devices} - present
        for pf in pfs:
            self._read_one(pf, devices)
        if came:
            devices = {a: devices[a] for a in self._listed if a in devices}
        self._devices = devices
        differ = {a for a in present | gone | pfs if devices.get(a) is not old.get(a)}
        for address in differ:
            for rdma in old[address].rdma_devices if address in old else ():
                self._rdma_of.pop(rdma, None)
            for rdma in devices[address].rdma_devices if address in devices else ():
                self._rdma_of[rdma] = address
        return differ

    def _read_one(self, address: str, devices: dict[str, PciDevice]) -> None:
        """Reads one function into `devices`, keeping the old object when nothing in it changed
        (identity is how the driver knows cheaply that a function's answer still stands)."""
        device = self.tree.read_device(address)
        if device is None and address in self._listed_set:
            self._unread.add(address)
        else:
            self._unread.discard(address)
        if device is None or device.base_class not in self._classes:
            devices.pop(address, None)
            if device is not None:
                self._others.add(address)
            return
        self._others.discard(address)
        if devices.get(address) != device:
            devices[address] = device
