"""SR-IOV VFs (and PFs without VFs) as resources, a drop-in for the SR-IOV network device plugin.

What the plugin does, kept: its config (see `options`), its choice of devices
(network functions, class 0x02, or accelerators, class 0x12; entries tried in
order, a device claimed by an earlier entry not matched again; a PF that has
VFs not offered; the function carrying the default route never offered), and
its Allocate answer: `PCIDEVICE_<PREFIX>_<NAME>` with the comma-joined PCI
addresses and `PCIDEVICE_<PREFIX>_<NAME>_INFO` with what each one brings
(vfio group nodes, RDMA char devices, vhost-net/tun), plus the CNI device-info
file per device.

What it lacks, added:
  * The hotplug engine scans on PCI add, remove, bind and unbind, on net link
    events and RDMA devices coming or going (inotify on a fixture tree): VFs
    created or destroyed with `sriov_numvfs`, a VF rebound from its network
    driver to vfio-pci (so it leaves a `drivers: [iavf]` resource for a
    `drivers: [vfio-pci]` one), a PF unplugged: all seen at once, no restart.
    Each scan reads only what its events name (`reading.py`), so one rebind
    among 4,096 VFs costs a few milliseconds.
  * Link health: a VF is Unhealthy while its PF's link is up without carrier
    (or its operstate is notpresent/lowerlayerdown) and while its PF is gone;
    Healthy again when the link returns. A PF offered itself follows its own link.
  * A device's interfaces are found from `class/net/<if>/device` up to the PCI
    function, so a virtio NIC's `<pci>/virtio2/net/eth0` counts.

The device-info files are kept by `devinfo`, from what each scan offers, so
Allocate does no I/O.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from nodedev.driver import (
    ContainerEdits,
    Device,
    DeviceNode,
    Driver,
    DriverOptions,
    Health,
    HostContext,
    Snapshot,
    UdevMatch,
)
from nodedev.drivers import netdev
from nodedev.drivers.pci import CLASS_NETWORK, CLASS_PROCESSING_ACCELERATOR, NOIOMMU_GROUP_NAME, PciDevice, PciTree
from nodedev.drivers.sriov import devinfo, simulate
from nodedev.drivers.sriov.nfd import sriov_labels
from nodedev.drivers.sriov.options import SriovOptions, SriovResource, SriovSelectors
from nodedev.drivers.sriov.reading import NodeReader, Reading

ENV_PREFIX = "PCIDEVICE_"
VFIO_DRIVER = "vfio-pci"
PCI_ACTIONS = frozenset({"add", "remove", "bind", "unbind"})
NET_ACTIONS = frozenset({"add", "remove", "move", "link"})
CLASS_GLOBS = {CLASS_NETWORK: "2????", CLASS_PROCESSING_ACCELERATOR: "12????"}
"""uevent PCI_CLASS is the class code in upper-case hex without leading zeros: 0x020000 -> 20000."""
DEVICE_CLASS = {"netDevice": CLASS_NETWORK, "accelerator": CLASS_PROCESSING_ACCELERATOR}


def env_name(resource: str) -> str:
    """`intel.com/sriov_net` -> `PCIDEVICE_INTEL_COM_SRIOV_NET`, as the plugin names it."""
    return ENV_PREFIX + re.sub(r"[./-]", "_", resource.upper())


@dataclass(frozen=True, slots=True)
class _View:
    """One scan's reading of the node, shared by the selectors and the health rule."""

    devices: dict[str, PciDevice]
    netdevs: dict[str, list[str]]
    links: dict[str, netdev.Interface | None]
    tree: PciTree
    listed: frozenset[str]
    """Every PCI address present, of any class."""

    def names(self, address: str) -> list[str]:
        return self.netdevs.get(address, [])

    def link(self, name: str) -> netdev.Interface | None:
        if name not in self.links:
            self.links[name] = netdev.read_interface(self.tree.class_net, name)
        return self.links[name]

    def vf_index(self, device: PciDevice) -> int | None:
        pf = self.devices.get(device.physfn or "")
        if pf is None or device.address not in pf.virtfns:
            return None
        return pf.virtfns.index(device.address)


@dataclass(frozen=True, slots=True)
class Found:
    """A device offered under a resource: the Device, its `_INFO` entry, its device-info file."""

    resource: str
    device: Device
    info: dict[str, Any]
    info_file: str
    info_content: str


def selects(selector: SriovSelectors, device: PciDevice, view: _View) -> bool:
    """The plugin's filters, in its order: vendors, devices, drivers, pciAddresses,
    acpiIndexes, pfNames, rootDevices, linkTypes, isRdma."""
    if selector.vendors and device.vendor not in selector.vendors:
        return False
    if selector.devices and device.device not in selector.devices:
        return False
    if selector.drivers and device.driver not in selector.drivers:
        return False
    if selector.pci_addresses and device.address not in selector.pci_addresses:
        return False
    if selector.acpi_indexes and device.acpi_index not in selector.acpi_indexes:
        return False
    root = device.physfn or device.address
    index = view.vf_index(device) if device.is_vf else None
    if selector.pf_names and not _item_matches(selector.pf_items(), view.names(root), device.is_vf, index):
        return False
    if selector.root_devices and not _item_matches(selector.root_items(), [root], device.is_vf, index):
        return False
    if selector.link_types and not _link_type_matches(selector.link_types, device, view):
        return False
    return not (selector.is_rdma and not device.rdma_devices)


def _item_matches(items: list[tuple[str, frozenset[int] | None]], names: list[str], is_vf: bool, index: int | None) -> bool:
    """A bare PF name or address takes all its VFs (or the PF itself); `name#ranges` only those VFs."""
    for name, ranges in items:
        if name in names and (ranges is None or (is_vf and index is not None and index in ranges)):
            return True
    return False


def _link_type_matches(wanted: list[str], device: PciDevice, view: _View) -> bool:
    """The link type of the device's own interface, or of its PF's when it has none (vfio)."""
    names = view.names(device.address) or (view.names(device.physfn) if device.physfn else [])
    for name in names[:1]:
        link = view.link(name)
        if link is not None and (link.link_type in wanted or str(link.arphrd) in wanted):
            return True
    return False


class SriovDriver(Driver[SriovOptions]):
    """SR-IOV functions under `<sysfsRoot>/bus/pci/devices`; default routes from `<procRoot>/net`."""

    name = "sriov"
    Options: ClassVar[type[DriverOptions]] = SriovOptions

    def __init__(self, options: SriovOptions, host: HostContext) -> None:
        super().__init__(options, host)
        self._resources = options.resources
        self._env = {r.full_name: env_name(r.full_name) for r in self._resources}
        self._classes = frozenset(DEVICE_CLASS[r.device_type] for r in self._resources)
        self._files = devinfo.DeviceInfoFiles(Path(options.device_info_dir), [r.full_name for r in self._resources], host.log)
        self._infos: dict[str, dict[str, dict[str, Any]]] = {}
        """Resource -> address -> `_INFO` entry; replaced whole by each scan, read by allocate()."""
        self._real: dict[str, Path] = {}
        self._excluded_said: frozenset[str] = frozenset()
        self._watch: tuple[Path, ...] = ()
        self._reader = NodeReader(PciTree(host.sysfs_root), self._classes)
        self._made: dict[str, tuple[tuple[Any, ...], Found | None]] = {}
        """Address -> (what decided it, what it is offered as) from the last scan."""
        self._pf_healths: dict[str, tuple[Health, str]] = {}
        self._excluded: Mapping[str, list[str]] = {}
        self._driver_names: frozenset[str] = frozenset()
        """`bus/pci/drivers/*` as the last scan watched them (fixture trees only)."""
        self._vhost = False
        self._snapshot: Snapshot = {}
        self._link_types = any(s.link_types for r in self._resources for s in r.selectors)
        self._fixture_sysfs: bool | None = None
        self._fixture_proc: bool | None = None
        self._labels: Mapping[str, str] = {}

    @classmethod
    def declared_resources(cls, options: SriovOptions) -> list[str]:
        return [r.full_name for r in options.resources]

    # -- scanning -----------------------------------------------------------------------

    def scan(self, changed: Collection[str] | None = None) -> Snapshot:
        """Every function of a wanted class, re-deciding only what may have changed.

        `NodeReader` reads again what `changed` names (see reading.py) and says
        which functions differ. What a function is offered as is decided again
        for those, for the VFs of a PF that differs or whose link health changed
        (the links that are health, PFs' and those of functions offered whole,
        are read every scan), for functions that gained or lost the default
        route, for functions that are not VFs (a handful), and for everything on
        a full scan, when the `vhost-net` nodes come or go, or when `linkTypes`
        selectors read every interface's link. So one rebind among 4,096 VFs
        costs about what it costs among 16.
        """
        if self._fixture_sysfs is None:
            self._fixture_sysfs = netdev.filesystem_type(self.host.sysfs_root) != "sysfs"
            self._fixture_proc = netdev.filesystem_type(self.host.proc_root) != "proc"
        reading = self._reader.read(self._new_drivers_named(changed))
        tree = self._reader.tree
        view = _View(reading.devices, reading.netdevs, {}, tree, reading.listed)
        excluded = self._default_route_devices(reading.netdev_of, tree)
        vhost = (self.host.dev_root / "vhost-net").exists() and (self.host.dev_root / "net" / "tun").exists()
        healths = {a: _health_under(a, view) for a, d in reading.wholes.items() if d.num_vfs > 0}
        everything = reading.dirty is None or self._link_types or vhost != self._vhost
        candidates = reading.devices.keys() if everything else self._candidates(reading, healths, excluded)
        made, touched = self._decide(candidates, view, excluded, healths, vhost, everything)
        if touched or everything:
            found: dict[str, list[Found]] = {r.full_name: [] for r in self._resources}
            for address in reading.devices:
                if (item := made.get(address, (None, None))[1]) is not None:
                    found[item.resource].append(item)
            self._infos = {name: {f.device.id: f.info for f in items} for name, items in found.items()}
            self._sync_device_info(made, None if everything else touched)
            self._snapshot = {name: [f.device for f in items] for name, items in found.items()}
        self._made, self._pf_healths, self._excluded, self._vhost = made, healths, excluded, vhost
        self._watch = self._paths_to_watch(tree, reading.wholes, view)
        self._labels = sriov_labels(reading.wholes.values())
        return self._snapshot

    def _new_drivers_named(self, changed: Collection[str] | None) -> Collection[str] | None:
        """On a fixture tree a rebind is heard in `bus/pci/drivers/<name>/`; a function bound
        to a driver whose directory is new (not watched yet) is named by nothing but that
        directory, so the functions in it are named too."""
        if changed is None or not self._fixture_sysfs:
            return changed
        tree = self._reader.tree
        new = [n for n in changed if n not in self._driver_names and os.path.isdir(f"{tree.drivers_dir}/{n}")]
        if not new:
            return changed
        return {*changed, *(a for n in new for a in tree.bound_to(n))}

    def _candidates(self, reading: Reading, healths: Mapping[str, tuple[Health, str]], excluded: Mapping[str, list[str]]) -> set[str]:
        """The functions whose answer may differ from the last scan's (see `scan`)."""
        assert reading.dirty is not None
        candidates = set(reading.dirty) | reading.wholes.keys() | (excluded.keys() ^ self._excluded.keys())
        changed_pfs = reading.dirty | {pf for pf, health in healths.items() if self._pf_healths.get(pf) != health}
        for pf in changed_pfs:
            for devices in (reading.devices, reading.before):
                if (device := devices.get(pf)) is not None:
                    candidates.update(device.virtfns)
        return candidates

    def _decide(
        self,
        candidates: Collection[str],
        view: _View,
        excluded: Mapping[str, list[str]],
        healths: Mapping[str, tuple[Health, str]],
        vhost: bool,
        everything: bool,
    ) -> tuple[dict[str, tuple[tuple[Any, ...], Found | None]], set[str]]:
        """What each candidate is offered as (None: nothing) with the inputs that decided it,
        over the last scan's answers for the rest; and the functions whose answer is new. A
        candidate all of whose inputs are what they were (compared by identity first, so
        cheaply) keeps its last answer."""
        last = self._made
        made = {} if everything else dict(last)
        touched: set[str] = set()
        for address in candidates:
            made.pop(address, None)
            device = view.devices.get(address)
            if device is None or address in excluded or (device.total_vfs is not None and device.num_vfs > 0):
                if address in last:
                    touched.add(address)
                continue
            pf = device.physfn
            health = healths.get(pf) if pf is not None else None
            if health is None:
                health = _health(device, view)
            root = pf or address
            links = tuple(view.link(n) for n in (view.names(address) or view.names(root))[:1]) if self._link_types else ()
            key = (device, view.devices.get(root), view.netdevs.get(root), view.netdevs.get(address), links, health, vhost)
            cached = last.get(address)
            if cached is not None and cached[0] == key:
                made[address] = cached
                continue
            made[address] = (key, self._claim(device, view, health, vhost))
            touched.add(address)
        if everything:
            touched |= last.keys() - made.keys()
        return made, touched

    def labels(self) -> Mapping[str, str]:
        """NFD's network-sriov labels, as the last scan found the PFs (nfd.py)."""
        return self._labels

    def _claim(self, device: PciDevice, view: _View, health: tuple[Health, str], vhost: bool) -> Found | None:
        """The first entry with a selector taking the device, and what it offers; None if none."""
        for resource in self._resources:
            if device.base_class != DEVICE_CLASS[resource.device_type]:
                continue
            selector = next((s for s in resource.selectors if selects(s, device, view)), None)
            if selector is not None:
                return self._found(resource, selector, device, health, vhost)
        return None

    def _default_route_devices(self, netdev_of: Mapping[str, str | None], tree: PciTree) -> dict[str, list[str]]:
        """Functions owning an interface with a default route (or below one), and which."""
        routed = netdev.with_lower_devices(tree.class_net, netdev.default_route_interfaces(self.host.proc_root / "net"))
        excluded: dict[str, list[str]] = {}
        for name in sorted(routed):
            if (address := netdev_of.get(name)) is not None:
                excluded.setdefault(address, []).append(name)
        said = frozenset(excluded)
        if said != self._excluded_said:
            for address in sorted(said - self._excluded_said):
                self.host.log.warning("%s not offered: it carries the default route (%s)", address, ", ".join(excluded[address]))
            self._excluded_said = said
        return excluded

    def _found(self, resource: SriovResource, selector: SriovSelectors, device: PciDevice, health: tuple[Health, str], vhost: bool) -> Found:
        address = device.address
        dev = self.host.dev_root
        nodes: list[DeviceNode] = []
        info: dict[str, Any] = {"generic": {"deviceID": address}}
        if device.driver == VFIO_DRIVER and device.iommu_group is not None:
            group = str(device.iommu_group)
            host_group = f"noiommu-{group}" if device.iommu_group_name == NOIOMMU_GROUP_NAME else group
            nodes += [
                DeviceNode(str(dev / "vfio" / "vfio"), "/dev/vfio/vfio"),
                DeviceNode(str(dev / "vfio" / host_group), f"/dev/vfio/{group}"),
            ]
            info["vfio"] = {"mount": "/dev/vfio/vfio", "dev-mount": f"/dev/vfio/{group}"}
        if device.rdma_devices:
            rdma: dict[str, str] = {"rdma_dev": device.rdma_devices[0]}
            for char in (*device.uverbs, *device.mad, "rdma_cm"):
                nodes.append(DeviceNode(str(dev / "infiniband" / char), f"/dev/infiniband/{char}"))
                rdma.setdefault(char.rstrip("0123456789"), f"/dev/infiniband/{char}")
            info["rdma"] = rdma
        if selector.need_vhost_net and vhost:
            nodes += [DeviceNode(str(dev / "vhost-net"), "/dev/vhost-net"), DeviceNode(str(dev / "net" / "tun"), "/dev/net/tun")]
            info["vhost"] = {"net-mount": "/dev/vhost-net", "tun-mount": "/dev/net/tun"}
        extra = {**resource.additional_info.get("*", {}), **resource.additional_info.get(address, {})}
        if extra:
            info["extra"] = extra
        numa = () if resource.exclude_topology or device.numa_node is None else (device.numa_node,)
        edits = ContainerEdits(devices=tuple(nodes), envs={self._env[resource.full_name]: address})
        content = devinfo.content(address, device.rdma_devices[0] if device.rdma_devices else "")
        return Found(
            resource=resource.full_name,
            device=Device(id=address, health=health[0], reason=health[1], numa_nodes=numa, edits=edits),
            info=info,
            info_file=devinfo.file_name(resource.full_name, address),
            info_content=content,
        )

    # -- device-info files --------------------------------------------------------------

    def _sync_device_info(self, made: Mapping[str, tuple[Any, Found | None]], touched: set[str] | None) -> None:
        """The files of the devices whose answer is new are written, those of devices gone or
        moved to another resource removed; every file is checked when `touched` is None or the
        last sync failed. Runs before `self._made` takes `made`, so the old answers are there."""
        if touched is None or self._files.failed:
            wanted = {f.info_file: f.info_content for _, f in made.values() if f is not None}
            stale = self._files.written.keys() - wanted.keys()
        else:
            wanted, stale = {}, set()
            for address in touched:
                old, new = self._made.get(address, (None, None))[1], made.get(address, (None, None))[1]
                if new is not None:
                    wanted[new.info_file] = new.info_content
                if old is not None and (new is None or new.info_file != old.info_file):
                    stale.add(old.info_file)
        self._files.sync(wanted, stale)

    # -- allocation ---------------------------------------------------------------------

    def allocate(self, resource: str, devices: Sequence[Device]) -> ContainerEdits:
        """Adds `_INFO`, which describes the whole request; no I/O (the entries are from the scan)."""
        infos = self._infos.get(resource, {})
        merged = {d.id: infos.get(d.id, {"generic": {"deviceID": d.id}}) for d in devices}
        return ContainerEdits(envs={env_name(resource) + "_INFO": json.dumps(merged, separators=(",", ":"))})

    # -- simulation ---------------------------------------------------------------------

    @classmethod
    def simulations(cls) -> Sequence[str]:
        return (simulate.NAME,)

    @classmethod
    def simulate(cls, fixture: str, workdir: Path) -> dict[str, Any] | None:
        return simulate.simulate(fixture, workdir)

    # -- events -------------------------------------------------------------------------

    def udev_matches(self) -> Sequence[UdevMatch]:
        matches = [UdevMatch("pci", actions=PCI_ACTIONS, properties={"PCI_CLASS": CLASS_GLOBS[c]}) for c in sorted(self._classes)]
        if CLASS_NETWORK in self._classes:
            matches += [UdevMatch("net", actions=NET_ACTIONS), UdevMatch("infiniband", actions=frozenset({"add", "remove"}))]
        return tuple(matches)

    def watch_paths(self) -> Sequence[Path]:
        return self._watch

    def _paths_to_watch(self, tree: PciTree, wholes: dict[str, PciDevice], view: _View) -> tuple[Path, ...]:
        """For a fixture tree only (the real /sys sends uevents): the device list, the
        interface list, each driver's directory (binding adds `<driver>/<address>`, so
        the event names the function rebound), each PF's directory (`sriov_numvfs`,
        `virtfn*`) and the directories of the interfaces whose link is health (PFs',
        and those of functions offered whole). Not every VF's directory: 4,096 watches
        cost more to place than all else a scan does."""
        paths: list[Path] = []
        if self._fixture_sysfs:
            driver_dirs = tree.driver_dirs()
            self._driver_names = frozenset(d.name for d in driver_dirs)
            paths += [tree.devices_dir, tree.class_net, tree.drivers_dir, *driver_dirs]
            self._real = {a: self._real.get(a) or tree.real_path(a) for a, d in wholes.items() if d.is_pf}
            for device in wholes.values():
                if device.is_pf:
                    paths.append(self._real[device.address])
                paths += [tree.netdev_path(name) for name in view.names(device.address)]
        if self._fixture_proc:
            paths.append(self.host.proc_root / "net")
        return tuple(paths)


def _health(device: PciDevice, view: _View) -> tuple[Health, str]:
    """Unhealthy while the PF is gone or its link cannot pass traffic, or the device's own
    link cannot; the reason names the PF or interface, not the device (it is the ID)."""
    if device.physfn is not None:  # a VF's own link follows its PF's and is down until a pod takes it
        return _health_under(device.physfn, view)
    return _links_health([("its interface", name) for name in view.names(device.address)[:1]], view)


def _health_under(pf: str, view: _View) -> tuple[Health, str]:
    """The health all VFs of `pf` share."""
    if pf not in view.listed:
        return Health.UNHEALTHY, f"its PF {pf} is gone"
    return _links_health([(f"PF {name}", name) for name in view.names(pf)], view)


def _links_health(checks: list[tuple[str, str]], view: _View) -> tuple[Health, str]:
    """(label, interface) pairs: the first link that cannot pass traffic, else what each said."""
    said: list[str] = []
    for label, name in checks:
        link = view.link(name)
        if link is None:
            continue
        state, reason = netdev.health(link)
        if state is Health.UNHEALTHY:
            return state, f"{label}: {reason}"
        said.append(f"{label}: {reason}")
    return Health.HEALTHY, "; ".join(said) or "no interface to check"
