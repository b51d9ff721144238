"""Whole network interfaces as resources: one device per interface, ID = its name.

For pods that take a host interface for themselves (host-device CNI, DPDK on a
dedicated port, a test NIC). Resources are configured like the SR-IOV device
plugin's `resourceList`: entries are tried in order and an interface claimed by
an earlier entry is not offered again, so a narrow entry placed first carves
interfaces out of a broad one after it.

Selectors: values are ORed within a key and keys are ANDed; an empty or
missing key matches every interface.
  * `ifNames`: fnmatch globs on the interface name (`ens*f1`, `eth[23]`).
  * `drivers`: the kernel driver bound to the interface's parent device, the
    basename of `device/driver` (`mlx5_core`, `ixgbe`). Virtual interfaces
    (veth, tap, macvlan, bridges) have no parent device, so no `drivers`
    entry ever matches them.
  * `linkTypes`: the ARPHRD link type, by the name iproute2 prints after
    `link/` (`ether`, `infiniband`, `none` for tun and wireguard, `loopback`,
    `ipip`, `sit`, `gre`, ...), or its decimal number for any other type.

Never offered: `lo`, and by default (`excludeDefaultRoute`) the interfaces that
carry a default route together with their lower devices (bond and bridge
members, a VLAN's or macvlan's parent, transitively): handing one to a pod would
cut the node off. Routes come from `<procRoot>/net/route` and `ipv6_route`, read
at every scan, because a default route moving sends no link event.

Health, chosen for what a pod taking the interface needs:
  * Unhealthy when operstate is `notpresent` (the driver says the hardware is
    missing) or `lowerlayerdown` (a macvlan or VLAN whose parent is down, a
    veth whose peer is down: no traffic can pass whatever the pod does), or
    when the link is administratively up and still has no carrier (cable
    pulled, switch port down; what SR-IOV DP users ask for in #362/#363).
  * Healthy otherwise, notably when the interface is administratively down:
    interfaces waiting for a pod are commonly left down, the CNI brings them
    up inside the pod, and their carrier is unknown until then.
Carrier and up/down changes send no uevent; the hotplug engine hears them on
rtnetlink, so health follows the link within one rescan.

A known limit: when a CNI moves an interface into a pod's network namespace it
leaves the node's /sys/class/net, so its ID drops out of the list while the pod
runs and comes back when the pod ends (physical interfaces return to the host
namespace; virtual ones are destroyed with the pod).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import field_validator, model_validator

from nodedev.driver import (
    ConfigSection,
    ContainerEdits,
    Device,
    Driver,
    DriverOptions,
    Health,
    HostContext,
    Snapshot,
    UdevMatch,
)
from nodedev.drivers.pci import parse_int, read_text
from nodedev.drivers.peerconfig import nonblank

DEFAULT_PREFIX = "nodedev.io"
ENV_PREFIX = "NETDEV_"
_RESOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
IFF_UP = 0x1
NET_ACTIONS = frozenset({"add", "remove", "move", "link"})
"""What changes an interface's presence, name or health: `move` is a rename, `link`
an rtnetlink message (carrier, up/down). A net `change` uevent carries neither."""

LINK_TYPES: dict[int, str] = {
    0: "netrom",
    1: "ether",
    2: "eether",
    3: "ax25",
    6: "ieee802",
    7: "arcnet",
    19: "atm",
    24: "ieee1394",
    32: "infiniband",
    256: "slip",
    280: "can",
    512: "ppp",
    513: "hdlc",
    519: "rawip",
    768: "ipip",
    769: "tunnel6",
    772: "loopback",
    774: "fddi",
    776: "sit",
    778: "gre",
    779: "pimreg",
    801: "ieee802.11",
    803: "ieee802.11/radiotap",
    804: "ieee802.15.4",
    820: "phonet",
    823: "gre6",
    824: "netlink",
    825: "6lowpan",
    826: "vsockmon",
    65534: "none",
    65535: "void",
}
"""ARPHRD numbers (linux/if_arp.h) to the names `ip link` prints after `link/`."""
_LINK_TYPE_NAMES = frozenset(LINK_TYPES.values())


def link_type_name(number: int) -> str:
    return LINK_TYPES.get(number, str(number))


class NetdevSelectors(ConfigSection):
    if_names: list[str] = []
    drivers: list[str] = []
    link_types: list[str] = []

    @field_validator("if_names", "drivers")
    @classmethod
    def _not_blank(cls, values: list[str]) -> list[str]:
        return nonblank(values)

    @field_validator("link_types")
    @classmethod
    def _known_link_type(cls, values: list[str]) -> list[str]:
        for value in values:
            if value not in _LINK_TYPE_NAMES and not value.isdigit():
                known = ", ".join(sorted(_LINK_TYPE_NAMES))
                raise ValueError(f"unknown link type {value!r} (use an ARPHRD number or one of: {known})")
        return values


class NetdevResource(ConfigSection):
    resource_name: str
    resource_prefix: str = DEFAULT_PREFIX
    selectors: NetdevSelectors = NetdevSelectors()

    @field_validator("resource_name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _RESOURCE_NAME.match(value):
            raise ValueError(f"resourceName {value!r} may contain only letters, digits, '_' and '-'")
        return value

    @property
    def full_name(self) -> str:
        return f"{self.resource_prefix}/{self.resource_name}"


class NetdevOptions(DriverOptions):
    resource_list: list[NetdevResource] = []
    exclude_default_route: bool = True
    """Never offer the interfaces that carry a default route, nor their lower devices."""

    @model_validator(mode="after")
    def _unique_names(self) -> NetdevOptions:
        seen: set[str] = set()
        for resource in self.resource_list:
            if resource.full_name in seen:
                raise ValueError(f"resource {resource.full_name!r} is listed twice in resourceList")
            seen.add(resource.full_name)
        return self


@dataclass(frozen=True, slots=True)
class Interface:
    """What the selectors and the health rule need of one interface, read from sysfs."""

    name: str
    arphrd: int
    driver: str | None
    numa_node: int | None
    operstate: str
    admin_up: bool
    carrier: bool | None  # None when it cannot be read (link administratively down)

    @property
    def link_type(self) -> str:
        return link_type_name(self.arphrd)


def env_name(resource: str) -> str:
    """`nodedev.io/fast-nic` -> `NETDEV_NODEDEV_IO_FAST_NIC`, like SR-IOV DP's PCIDEVICE_ keys."""
    return ENV_PREFIX + re.sub(r"[./-]", "_", resource.upper())


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def read_interface(net: Path, name: str) -> Interface | None:
    """Reads one interface; None if it vanished (or was renamed away) while being read.

    Every file is read through one descriptor of the interface's directory, so all
    values come from the same interface even if another one takes the name
    meanwhile. At the end the name must still lead to that directory: a scan
    racing a removal must drop the interface, not offer one whose later files
    could not be read (operstate "unknown", no carrier) as Healthy.
    """
    try:
        directory = os.open(net / name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        iface = _read_open_interface(directory, name)
        if iface is None or not _still_named(net / name, directory):
            return None
        return iface
    finally:
        os.close(directory)


def _read_open_interface(directory: int, name: str) -> Interface | None:
    arphrd = parse_int(read_text("type", dir_fd=directory))
    if arphrd is None:
        return None
    try:
        driver: str | None = os.path.basename(os.readlink("device/driver", dir_fd=directory))
    except OSError:
        driver = None  # a virtual interface, or no driver bound to its device
    numa = parse_int(read_text("device/numa_node", dir_fd=directory))
    admin_up = bool((parse_int(read_text("flags", dir_fd=directory)) or 0) & IFF_UP)
    carrier_text = read_text("carrier", dir_fd=directory) if admin_up else None
    operstate = read_text("operstate", dir_fd=directory)
    return Interface(
        name=name,
        arphrd=arphrd,
        driver=driver,
        numa_node=numa if numa is not None and numa >= 0 else None,
        operstate=operstate or "unknown",
        admin_up=admin_up,
        carrier=None if carrier_text is None else carrier_text == "1",
    )


def _still_named(path: Path, directory: int) -> bool:
    """Whether `path` still leads to the open `directory` (not gone, not renamed away)."""
    try:
        now, opened = os.stat(path), os.fstat(directory)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


def health(iface: Interface) -> tuple[Health, str]:
    """The rule in the module docstring, with a reason that says what was seen.

    The reason leaves out the interface's name (it is the device ID already), so
    256 interfaces in one state are one log line, not 256."""
    state = iface.operstate
    if state == "notpresent":
        return Health.UNHEALTHY, "operstate notpresent (hardware missing)"
    if state == "lowerlayerdown":
        return Health.UNHEALTHY, "operstate lowerlayerdown (its lower device or peer is down)"
    if iface.admin_up and iface.carrier is False:
        return Health.UNHEALTHY, f"link is up but has no carrier (operstate {state})"
    if not iface.admin_up:
        return Health.HEALTHY, "administratively down, carrier not checked"
    return Health.HEALTHY, f"operstate {state}"


def selects(selectors: NetdevSelectors, iface: Interface) -> bool:
    if selectors.if_names and not any(fnmatch.fnmatchcase(iface.name, g) for g in selectors.if_names):
        return False
    if selectors.drivers and iface.driver not in selectors.drivers:
        return False
    if selectors.link_types:
        if iface.link_type not in selectors.link_types and str(iface.arphrd) not in selectors.link_types:
            return False
    return True


def default_route_interfaces(proc_net: Path) -> set[str]:
    """Interfaces with an IPv4 or IPv6 default route in this network namespace."""
    names: set[str] = set()
    for line in (_read(proc_net / "route") or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000":
            names.add(fields[0])
    for line in (_read(proc_net / "ipv6_route") or "").splitlines():
        fields = line.split()
        if len(fields) >= 10 and set(fields[0]) == {"0"} and fields[1] == "00":
            names.add(fields[9])
    names.discard("lo")
    return names


def with_lower_devices(net: Path, names: set[str]) -> set[str]:
    """Adds, transitively, every lower device (`lower_<name>` links: bond and bridge
    members, a VLAN's or macvlan's parent) of the given interfaces."""
    result: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in result:
            continue
        result.add(name)
        try:
            entries = os.listdir(net / name)
        except OSError:
            continue
        pending.extend(entry[len("lower_") :] for entry in entries if entry.startswith("lower_"))
    return result


def filesystem_type(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The type of the file system `path` is on (`sysfs`, `proc`, `tmpfs`), from this
    process's mount table; None if that cannot be read."""
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in (_read(mountinfo) or "").splitlines():
        before, _, after = line.partition(" - ")
        fields, types = before.split(), after.split()
        if len(fields) < 5 or not types:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, types[0]
    return best_type


@dataclass(frozen=True, slots=True)
class _Entry:
    """One interface as last read, and what it became: its resource and device, if any."""

    iface: Interface
    resource: str | None
    device: Device | None


class NetdevDriver(Driver[NetdevOptions]):
    """Interfaces under `<sysfsRoot>/class/net`; default routes from `<procRoot>/net`.

    Each scan lists class/net (one directory read, cheap even with thousands of
    interfaces) and reads the interfaces in `changed`, the ones that appeared in
    the listing, and all of them when `changed` is None. Everything else is
    reused from the previous scan, so one interface added among 1,000 costs one
    interface's reads. The listing also drops interfaces that vanished without
    an event naming them. The exclusion of default-route interfaces is
    recomputed every scan from the route table (a route moves without any link
    event) and the few `lower_*` links below those interfaces.
    """

    name = "netdev"
    Options: ClassVar[type[DriverOptions]] = NetdevOptions

    def __init__(self, options: NetdevOptions, host: HostContext) -> None:
        super().__init__(options, host)
        self._resources = tuple(options.resource_list)
        self._exclude_default_route = options.exclude_default_route
        self._env = {r.full_name: env_name(r.full_name) for r in self._resources}
        self._globs = _name_globs(self._resources)
        self._entries: dict[str, _Entry] = {}
        self._read_all_once = False
        self._watch: tuple[Path, ...] = ()
        self._fixture_sysfs: bool | None = None
        self._fixture_proc: bool | None = None

    @classmethod
    def declared_resources(cls, options: NetdevOptions) -> list[str]:
        return [r.full_name for r in options.resource_list]

    @property
    def _net(self) -> Path:
        return self.host.sysfs_root / "class" / "net"

    @property
    def _proc_net(self) -> Path:
        return self.host.proc_root / "net"

    def scan(self, changed: Collection[str] | None = None) -> Snapshot:
        try:
            listed = set(os.listdir(self._net))
        except FileNotFoundError:
            listed = set()
        if changed is None or not self._read_all_once:
            fresh = listed
        else:
            fresh = (listed & set(changed)) | (listed - self._entries.keys())
        entries = {name: entry for name, entry in self._entries.items() if name in listed and name not in fresh}
        for name in fresh:
            if self._may_select(name) and (entry := self._entry(name)) is not None:
                entries[name] = entry
        self._entries = entries
        self._read_all_once = True
        self._watch = self._paths_to_watch(entries)
        return self._snapshot(entries, self._excluded())

    def _may_select(self, name: str) -> bool:
        """Whether any entry could take an interface of this name; the others are not read."""
        if name == "lo":
            return False
        return self._globs is None or any(fnmatch.fnmatchcase(name, g) for g in self._globs)

    def _entry(self, name: str) -> _Entry | None:
        iface = read_interface(self._net, name)
        if iface is None:
            return None
        if iface.link_type != "loopback":
            for resource in self._resources:
                if selects(resource.selectors, iface):
                    state, reason = health(iface)
                    numa = () if iface.numa_node is None else (iface.numa_node,)
                    edits = ContainerEdits(envs={self._env[resource.full_name]: name})
                    device = Device(id=name, health=state, reason=reason, numa_nodes=numa, edits=edits)
                    return _Entry(iface, resource.full_name, device)
        return _Entry(iface, None, None)

    def _excluded(self) -> set[str]:
        if not self._exclude_default_route:
            return set()
        return with_lower_devices(self._net, default_route_interfaces(self._proc_net))

    def _snapshot(self, entries: dict[str, _Entry], excluded: set[str]) -> Snapshot:
        found: dict[str, list[Device]] = {r.full_name: [] for r in self._resources}
        for name in sorted(entries):
            entry = entries[name]
            if entry.resource is not None and entry.device is not None and name not in excluded:
                found[entry.resource].append(entry.device)
        return found

    def _paths_to_watch(self, entries: dict[str, _Entry]) -> tuple[Path, ...]:
        """For a fixture tree only: the real /sys and /proc send uevents and rtnetlink
        messages instead, and inotify sees nothing there."""
        if self._fixture_sysfs is None:
            self._fixture_sysfs = filesystem_type(self.host.sysfs_root) != "sysfs"
            self._fixture_proc = filesystem_type(self.host.proc_root) != "proc"
        paths: list[Path] = []
        if self._fixture_sysfs:
            paths += [self._net, *(self._net / name for name in sorted(entries))]
        if self._fixture_proc and self._exclude_default_route:
            paths.append(self._proc_net)
        return tuple(paths)

    def watch_paths(self) -> Sequence[Path]:
        return self._watch

    def udev_matches(self) -> Sequence[UdevMatch]:
        """Only the names some entry can select, when every entry names them: a node
        churning pod veths then does not rescan us for each one."""
        if self._globs is None:
            return (UdevMatch("net", actions=NET_ACTIONS),)
        return tuple(UdevMatch("net", g, actions=NET_ACTIONS) for g in self._globs)


def _name_globs(resources: Sequence[NetdevResource]) -> tuple[str, ...] | None:
    """Every `ifNames` glob in order, or None when some entry takes any name."""
    globs: list[str] = []
    for resource in resources:
        if not resource.selectors.if_names:
            return None
        globs.extend(g for g in resource.selectors.if_names if g not in globs)
    return tuple(globs)
