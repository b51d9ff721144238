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
  * Every scan rereads the tree, and the hotplug engine scans on PCI add,
    remove, bind and unbind and on net link events (inotify on a fixture tree):
    VFs created or destroyed with `sriov_numvfs`, a VF rebound from its network
    driver to vfio-pci (so it leaves a `drivers: [iavf]` resource for a
    `drivers: [vfio-pci]` one), a PF unplugged: all seen at once, no restart.
  * Link health: a VF is Unhealthy while its PF's link is up without carrier
    (or its operstate is notpresent/lowerlayerdown) and while its PF is gone;
    Healthy again when the link returns. A PF offered itself follows its own link.
  * A device's interfaces are found from `class/net/<if>/device` up to the PCI
    function, so a virtio NIC's `<pci>/virtio2/net/eth0` counts.

The device-info files are written when a scan finds a device (atomically,
mode 0444, only when their content changes) and removed when a scan no longer
finds it, so Allocate does no I/O. They are left in place when the daemon
stops: a pod being set up across a restart still finds its file, and the next
start removes those of devices that have gone.
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
from nodedev.drivers.sriov import simulate
from nodedev.drivers.sriov.nfd import sriov_labels
from nodedev.drivers.sriov.options import SriovOptions, SriovResource, SriovSelectors

ENV_PREFIX = "PCIDEVICE_"
VFIO_DRIVER = "vfio-pci"
DEVICE_INFO_VERSION = "1.1.0"
PCI_ACTIONS = frozenset({"add", "remove", "bind", "unbind"})
NET_ACTIONS = frozenset({"add", "remove", "move", "link"})
CLASS_GLOBS = {CLASS_NETWORK: "2????", CLASS_PROCESSING_ACCELERATOR: "12????"}
"""uevent PCI_CLASS is the class code in upper-case hex without leading zeros: 0x020000 -> 20000."""
DEVICE_CLASS = {"netDevice": CLASS_NETWORK, "accelerator": CLASS_PROCESSING_ACCELERATOR}


def env_name(resource: str) -> str:
    """`intel.com/sriov_net` -> `PCIDEVICE_INTEL_COM_SRIOV_NET`, as the plugin names it."""
    return ENV_PREFIX + re.sub(r"[./-]", "_", resource.upper())


def device_info_name(resource: str, address: str) -> str:
    """The CNI device-info file name: `<resource with / as ->-<address>-device.json`."""
    return f"{resource.replace('/', '-')}-{address}-device.json"


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
        self._info_dir = Path(options.device_info_dir)
        self._infos: dict[str, dict[str, dict[str, Any]]] = {}
        """Resource -> address -> `_INFO` entry; replaced whole by each scan, read by allocate()."""
        self._written: dict[str, str] = {}
        """Device-info file name -> the content this process last wrote there."""
        self._real: dict[str, Path] = {}
        self._cleaned = False
        self._excluded_said: frozenset[str] = frozenset()
        self._watch: tuple[Path, ...] = ()
        self._devices: dict[str, PciDevice] = {}
        self._stamps: dict[str, tuple[int, int, int]] = {}
        self._made: dict[str, tuple[tuple[Any, ...], Found | None]] = {}
        self._link_types = any(s.link_types for r in self._resources for s in r.selectors)
        self._netdevs: dict[str, list[str]] = {}
        self._net_stamp: tuple[int, int, int] | None = None
        self._listed: frozenset[str] = frozenset()
        self._fixture_sysfs: bool | None = None
        self._fixture_proc: bool | None = None
        self._labels: Mapping[str, str] = {}

    @classmethod
    def declared_resources(cls, options: SriovOptions) -> list[str]:
        return [r.full_name for r in options.resources]

    # -- scanning -----------------------------------------------------------------------

    def scan(self, changed: Collection[str] | None = None) -> Snapshot:
        """Every function of a wanted class, re-reading only what may have changed.

        The device list is read every time. A function is read again when it is new,
        when `changed` names it, and when `changed` is None; on the real /sys PFs
        are read every time too (a VF coming or going changes its PF's `virtfn*`
        and the uevent names the VF). On a fixture tree, where path events name
        nothing, a function is read again only when its directory changed: an
        entry added, removed or replaced, which is what bind, unbind and
        `sriov_numvfs` do; `class/net` is read again only when it changed. The
        links whose state is health (PFs', and those of functions offered whole)
        are read every time. What a device is offered as is then recomputed only
        for devices whose inputs changed.
        """
        tree = PciTree(self.host.sysfs_root)
        if self._fixture_sysfs is None:
            self._fixture_sysfs = netdev.filesystem_type(self.host.sysfs_root) != "sysfs"
            self._fixture_proc = netdev.filesystem_type(self.host.proc_root) != "proc"
        netdevs = self._read_netdevs(tree)
        devices = self._read_devices(tree, changed)
        view = _View(devices, netdevs, {}, tree, self._listed)
        excluded = self._default_route_devices(view)
        vhost = (self.host.dev_root / "vhost-net").exists() and (self.host.dev_root / "net" / "tun").exists()
        found: dict[str, list[Found]] = {r.full_name: [] for r in self._resources}
        made: dict[str, tuple[tuple[Any, ...], Found | None]] = {}
        healths: dict[str | None, tuple[Health, str]] = {}
        for address, device in devices.items():
            if address in excluded or (device.is_pf and device.num_vfs > 0):
                continue
            # Everything a device's resource, health and edits depend on: when none of it
            # changed since the last scan (compared by identity first, so cheaply), the
            # last answer stands. 4,096 unchanged VFs cost a few milliseconds.
            root = device.physfn or address
            health = healths.get(device.physfn) if device.physfn else None
            if health is None:
                health = _health(device, view)
                if device.physfn:
                    healths[device.physfn] = health
            links = tuple(view.link(n) for n in (view.names(address) or view.names(root))[:1]) if self._link_types else ()
            key = (device, devices.get(root), netdevs.get(root), netdevs.get(address), links, health, vhost)
            cached = self._made.get(address)
            item = cached[1] if cached is not None and cached[0] == key else self._claim(device, view, health, vhost)
            made[address] = (key, item)
            if item is not None:
                found[item.resource].append(item)
        self._made = made
        self._infos = {name: {f.device.id: f.info for f in items} for name, items in found.items()}
        self._sync_device_info([f for items in found.values() for f in items])
        self._watch = self._paths_to_watch(tree, devices, view)
        self._labels = sriov_labels(devices.values())
        return {name: [f.device for f in items] for name, items in found.items()}

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

    def _read_netdevs(self, tree: PciTree) -> dict[str, list[str]]:
        """Interfaces by PCI function; on a fixture tree reused while `class/net` is unchanged."""
        stamp = _stamp(tree.class_net) if self._fixture_sysfs else None
        if stamp is None or stamp != self._net_stamp:
            self._netdevs = tree.netdevs_by_address()
            self._net_stamp = stamp
        return self._netdevs

    def _read_devices(self, tree: PciTree, changed: Collection[str] | None) -> dict[str, PciDevice]:
        """The functions of wanted classes, from the cache where nothing says they changed."""
        named = set(changed) if changed is not None else set()
        read_all = changed is None and not self._fixture_sysfs
        devices: dict[str, PciDevice] = {}
        stamps: dict[str, tuple[int, int, int]] = {}
        listed = tree.addresses()
        self._listed = frozenset(listed)
        self._real = {a: p for a, p in self._real.items() if a in self._listed}
        for address in listed:
            old = self._devices.get(address)
            stamp = _stamp(f"{tree.devices_dir}/{address}") if self._fixture_sysfs else None
            fresh = old is None or read_all or address in named or (old.is_pf and not self._fixture_sysfs)
            if not fresh and self._fixture_sysfs and (stamp is None or self._stamps.get(address) != stamp):
                fresh = True
            if not fresh and old is not None:
                device: PciDevice | None = old
            else:
                pci_class = old.pci_class if old is not None else tree.pci_class(address)
                if pci_class is None or pci_class >> 16 not in self._classes:
                    continue
                device = tree.read_device(address)
            if device is not None:
                devices[address] = device
                if stamp is not None:
                    stamps[address] = stamp
        self._devices, self._stamps = devices, stamps
        return devices

    def _default_route_devices(self, view: _View) -> dict[str, list[str]]:
        """Functions owning an interface with a default route (or below one), and which."""
        routed = netdev.with_lower_devices(view.tree.class_net, netdev.default_route_interfaces(self.host.proc_root / "net"))
        excluded = {address: sorted(set(names) & routed) for address, names in view.netdevs.items() if set(names) & routed}
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
        pci_info = {"pci-address": address, "rdma-device": device.rdma_devices[0] if device.rdma_devices else ""}
        content = json.dumps({"type": "pci", "version": DEVICE_INFO_VERSION, "pci": pci_info}, sort_keys=True)
        return Found(
            resource=resource.full_name,
            device=Device(id=address, health=health[0], reason=health[1], numa_nodes=numa, edits=edits),
            info=info,
            info_file=device_info_name(resource.full_name, address),
            info_content=content,
        )

    # -- device-info files --------------------------------------------------------------

    def _sync_device_info(self, found: list[Found]) -> None:
        wanted = {f.info_file: f.info_content for f in found}
        if not wanted and not self._written and not self._info_dir.is_dir():
            return  # nothing offered: do not create the directory on a node without SR-IOV
        try:
            self._info_dir.mkdir(parents=True, exist_ok=True)
            if not self._cleaned:
                self._remove_stale(set(wanted))
                self._cleaned = True
            for path, content in wanted.items():
                if self._written.get(path) != content:
                    _write_read_only(self._info_dir / path, content)
                    self._written[path] = content
            for path in set(self._written) - set(wanted):
                (self._info_dir / path).unlink(missing_ok=True)
                del self._written[path]
        except OSError as err:
            self.host.log.warning("device-info files in %s: %s", self._info_dir, err)

    def _remove_stale(self, wanted: set[str]) -> None:
        """Files of our resources left by an earlier run for devices that are gone."""
        prefixes = tuple(f"{r.full_name.replace('/', '-')}-" for r in self._resources)
        for name in os.listdir(self._info_dir):
            if name.startswith(prefixes) and name.endswith("-device.json") and name not in wanted:
                (self._info_dir / name).unlink(missing_ok=True)

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

    def _paths_to_watch(self, tree: PciTree, devices: dict[str, PciDevice], view: _View) -> tuple[Path, ...]:
        """For a fixture tree only (the real /sys sends uevents): the device list, the
        interface list, each function's directory (its `driver` link, `sriov_numvfs`,
        `virtfn*`) and the directories of the interfaces whose link is health (PFs',
        and those of functions offered whole)."""
        paths: list[Path] = []
        if self._fixture_sysfs:
            paths += [tree.devices_dir, tree.class_net]
            for address, device in devices.items():
                if address not in self._real:
                    self._real[address] = tree.real_path(address)
                paths.append(self._real[address])
                if not device.is_vf:
                    paths += [tree.netdev_path(name) for name in view.names(address)]
        if self._fixture_proc:
            paths.append(self.host.proc_root / "net")
        return tuple(paths)


def _health(device: PciDevice, view: _View) -> tuple[Health, str]:
    """Unhealthy while the PF is gone or its link cannot pass traffic, or the device's own
    link cannot; the reason names the PF or interface, not the device (it is the ID)."""
    checks: list[tuple[str, str]] = []
    if device.physfn is not None:
        if device.physfn not in view.listed:
            return Health.UNHEALTHY, f"its PF {device.physfn} is gone"
        checks += [("PF", name) for name in view.names(device.physfn)]
    else:  # a VF's own link follows its PF's and is down until a pod takes it
        checks += [("its interface", "") for _ in view.names(device.address)[:1]]
    own = view.names(device.address)[:1]
    said: list[str] = []
    for what, name in checks:
        link = view.link(name or own[0])
        if link is None:
            continue
        state, reason = netdev.health(link)
        label = f"{what} {name}".strip()
        if state is Health.UNHEALTHY:
            return state, f"{label}: {reason}"
        said.append(f"{label}: {reason}")
    return Health.HEALTHY, "; ".join(said) or "no interface to check"


def _stamp(path: Path | str) -> tuple[int, int, int] | None:
    """What changes when a fixture directory gains, loses or replaces an entry."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _write_read_only(path: Path, content: str) -> None:
    """Writes `path` whole or not at all (a reader never sees half a file), mode 0444."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o444)
    try:
        try:
            os.write(fd, content.encode())
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
