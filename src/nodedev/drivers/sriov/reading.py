"""What a scan of the sriov driver reads of the node, and what it reuses from the scan before.

A node with 16 PFs of 256 VFs lists 4,096 functions and 4,096 interfaces.
Reading them all takes a third of a second; one rebind changes one VF, its
PF and one interface. So the reader keeps what it read and, when a scan is
told what changed (`changed`: kernel names from uevents, or the same names
from a fixture tree's inotify events), reads again only those, the new ones
and the PFs of the VFs named, and says which functions differ (`dirty`) so
the driver re-decides only those. The two listings (`bus/pci/devices`,
`class/net`) are read every time: they are how a function or interface that
left without being named is noticed.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from nodedev.drivers.pci import PciDevice, PciTree, group_by_address, is_pci_address


@dataclass(frozen=True, slots=True)
class Reading:
    devices: dict[str, PciDevice]
    """Functions of the wanted classes, by address, in address order."""
    netdevs: dict[str, list[str]]
    """PCI address -> its interfaces, sorted."""
    listed: frozenset[str]
    """Every PCI address present, of any class."""
    dirty: frozenset[str] | None
    """Addresses whose function or interfaces differ from the last reading (or left); None: all may."""


class NodeReader:
    """Reads `bus/pci/devices` and `class/net` under one sysfs root, keeping what it read."""

    def __init__(self, tree: PciTree, classes: frozenset[int]) -> None:
        self.tree = tree
        self._classes = classes
        self._raw: frozenset[str] = frozenset()
        """The last listing of `bus/pci/devices`, as read."""
        self._listed: list[str] = []
        """Its PCI addresses, sorted."""
        self._listed_set: frozenset[str] = frozenset()
        self._devices: dict[str, PciDevice] = {}
        self._others: set[str] = set()
        """Functions of classes no resource takes: listed, not read again unless named."""
        self._netdev_of: dict[str, str | None] = {}
        """Interface -> its PCI function (None: virtual)."""
        self._netdevs: dict[str, list[str]] = {}

    def read(self, changed: Collection[str] | None) -> Reading:
        """Everything when `changed` is None; else what `changed` names, and what is new or gone."""
        moved = self._read_netdevs(changed)
        reread = self._read_devices(changed)
        dirty = None if moved is None or reread is None else frozenset(moved | reread)
        return Reading(self._devices, self._netdevs, self._listed_set, dirty)

    # -- interfaces ---------------------------------------------------------------------

    def _read_netdevs(self, changed: Collection[str] | None) -> set[str] | None:
        """Reads `class/net`; returns the functions whose interface list changed (None: all)."""
        names = set(self.tree.netdev_names())
        known = self._netdev_of
        if changed is None:
            self._netdev_of = {name: self.tree.netdev_address(name) for name in names}
            self._netdevs = group_by_address(self._netdev_of)
            return None
        look = names.intersection(changed) | (names - known.keys())
        gone = known.keys() - names
        if not look and not gone:
            return set()
        of = dict(known)
        for name in gone:
            del of[name]
        for name in look:
            of[name] = self.tree.netdev_address(name)
        moved = {a for n in look | gone for a in (known.get(n), of.get(n)) if a is not None}
        netdevs = dict(self._netdevs)
        for address in moved:
            kept = [n for n in netdevs.pop(address, []) if of.get(n) == address]
            came = [n for n in look if of[n] == address and n not in kept]
            if kept or came:
                netdevs[address] = sorted(kept + came)
        moved = {a for a in moved if netdevs.get(a) != self._netdevs.get(a)}
        self._netdev_of, self._netdevs = of, netdevs
        return moved

    # -- functions ----------------------------------------------------------------------

    def _read_devices(self, changed: Collection[str] | None) -> set[str] | None:
        """Reads `bus/pci/devices`; returns the functions that differ or left (None: all may)."""
        raw = frozenset(self.tree.listing())
        relisted = raw != self._raw
        if relisted:
            self._raw = raw
            self._listed = sorted(a for a in raw if is_pci_address(a))
            self._listed_set = frozenset(self._listed)
        fresh = self._listed_set if changed is None else self._to_read(changed)
        old = self._devices
        devices = dict(old) if not relisted else {a: d for a, d in old.items() if a in self._listed_set}
        for address in fresh:
            self._read_one(address, devices)
        # A VF that came or was rebound changed its PF's `virtfn*` too.
        pfs = {d.physfn for a in fresh if (d := devices.get(a)) is not None and d.physfn} - fresh
        for pf in pfs & devices.keys():
            self._read_one(pf, devices)
        if relisted or devices.keys() != old.keys():
            devices = {a: devices[a] for a in self._listed if a in devices}
        self._others &= self._listed_set
        self._devices = devices
        if changed is None:
            return None
        return {a for a in fresh | pfs | (old.keys() - devices.keys()) if devices.get(a) is not old.get(a)}

    def _read_one(self, address: str, devices: dict[str, PciDevice]) -> None:
        """Reads one function into `devices`, keeping the old object when nothing in it changed
        (identity is how the driver knows cheaply that a function's answer still stands)."""
        device = self.tree.read_device(address)
        if device is None or device.base_class not in self._classes:
            devices.pop(address, None)
            if device is not None:
                self._others.add(address)
            return
        self._others.discard(address)
        if devices.get(address) != device:
            devices[address] = device

    def _to_read(self, changed: Collection[str]) -> frozenset[str]:
        """The new functions, those named, and the PFs of the VFs named (a VF that went is no
        longer there to say whose it was)."""
        named = self._listed_set.intersection(changed)
        pfs = {d.physfn for a in changed if (d := self._devices.get(a)) is not None and d.physfn}
        new = self._listed_set - self._devices.keys() - self._others
        return frozenset(named | (pfs & self._listed_set) | new)

