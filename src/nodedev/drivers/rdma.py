"""RDMA HCAs as resources, a drop-in for Mellanox's k8s-rdma-shared-dev-plugin.

Config: the plugin's `configList` pastes in unchanged (`resourceName`,
`resourcePrefix` default `rdma`, `rdmaHcaMax`, `devices` (interface names),
`selectors {vendors, deviceIDs, drivers, ifNames, linkTypes}`), or
`configFile: PATH` reads the plugin's own `config.json` (its
`periodicUpdateInterval` is accepted and not needed: changes are events here).
Values are ORed within a selector and selectors ANDed, as in the plugin; each
entry selects independently (an HCA may serve several shared resources).

Shared mode (the plugin's only one): `rdmaHcaMax` identical IDs `0`..`N-1`, and
every container gets every char device of every selected HCA (`uverbsN`,
`umadN`, `issmN` and `rdma_cm`, permissions `rwm`). `mode: exclusive` on an
entry offers one ID per HCA (its name, `mlx5_0`) with that HCA's devices
instead, and needs no `rdmaHcaMax`.

What the plugin lacks, added: health (an HCA is healthy while a port is ACTIVE;
in shared mode every ID is Unhealthy when no selected HCA is, in exclusive mode
per ID), NUMA in the topology (an HCA's node; for a shared resource every node
its HCAs sit on), and live changes without a restart (HCAs appearing or going,
port and link changes, a fixture tree's files rewritten).

Read from sysfs: `class/infiniband/<hca>` (and `device`, up to the PCI
function: vendor, device, driver, NUMA via `pci`), `ports/<n>/state`,
`link_layer`, the PCI function's interfaces (`class/net/*/device`), and the char
devices `device/infiniband_verbs/uverbsN`, `device/infiniband_mad/{umadN,issmN}`.
A limit: a native InfiniBand port changing state sends no uevent (RoCE ports
follow their interface's link, which does), so such a change is seen at the
next event or periodic resync on a real node.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from nodedev.driver import ConfigSection, ContainerEdits, Device, DeviceNode, Driver, DriverOptions, Health, HostContext, Snapshot, UdevMatch
from nodedev.drivers import netdev
from nodedev.drivers.pci import PciDevice, PciTree, pci_parent, read_text
from nodedev.drivers.peerconfig import nonblank, pci_ids, read_json, short_name, unique_names
from nodedev.drivers.sysfs_tree import ARPHRD_INFINIBAND, SysfsTree

DEFAULT_PREFIX = "rdma"
PERMISSIONS = "rwm"
_LINK_TYPES = frozenset(netdev.LINK_TYPES.values())
MAX_SHARED_IDS = 100_000
RDMA_CAPABLE = "feature.node.kubernetes.io/rdma.capable"
RDMA_AVAILABLE = "feature.node.kubernetes.io/rdma.available"


class RdmaSelectors(ConfigSection):
    vendors: list[str] = []
    device_ids: list[str] = Field(default=[], alias="deviceIDs")
    drivers: list[str] = []
    if_names: list[str] = []
    link_types: list[str] = []

    @field_validator("vendors", "device_ids")
    @classmethod
    def _hex(cls, values: list[str]) -> list[str]:
        return pci_ids(values, "15b3")

    @field_validator("drivers", "if_names")
    @classmethod
    def _not_blank(cls, values: list[str]) -> list[str]:
        return nonblank(values)

    @field_validator("link_types")
    @classmethod
    def _link_types(cls, values: list[str]) -> list[str]:
        for value in values:
            if value.lower() not in _LINK_TYPES:
                raise ValueError(f"unknown link type {value!r} (such as 'ether', 'infiniband')")
        return [v.lower() for v in values]


class RdmaResource(ConfigSection):
    resource_name: str
    resource_prefix: str = DEFAULT_PREFIX
    rdma_hca_max: int | None = None
    devices: list[str] = []
    """Interface names, the plugin's older spelling of `selectors.ifNames`."""
    selectors: RdmaSelectors = RdmaSelectors()
    mode: Literal["shared", "exclusive"] = "shared"

    @field_validator("resource_name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return short_name(value)

    @field_validator("rdma_hca_max")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= MAX_SHARED_IDS:
            raise ValueError(f"must be from 1 to {MAX_SHARED_IDS} (got {value})")
        return value

    @model_validator(mode="after")
    def _needs_max(self) -> RdmaResource:
        if self.mode == "shared" and self.rdma_hca_max is None:
            raise ValueError("rdmaHcaMax is required in shared mode (how many pods may share the HCAs)")
        return self

    @property
    def full_name(self) -> str:
        return f"{self.resource_prefix}/{self.resource_name}"


class PluginFile(ConfigSection):
    """The RDMA shared device plugin's own `config.json`."""

    periodic_update_interval: int | None = None
    config_list: list[RdmaResource] = []


def read_plugin_file(path: str) -> list[RdmaResource]:
    """The configList of an RDMA plugin JSON file; ValueError in one line naming the key."""
    parsed = read_json(path, PluginFile, "configList")
    try:
        unique_names(parsed.config_list, "configList")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return parsed.config_list


class RdmaOptions(DriverOptions):
    config_list: list[RdmaResource] = []
    config_file: str | None = None
    """The RDMA shared plugin's JSON file, read instead of `configList`."""
    _resources: tuple[RdmaResource, ...] = PrivateAttr(default=())

    @field_validator("config_file")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        if value is not None:
            read_plugin_file(value)
        return value

    @field_validator("config_list")
    @classmethod
    def _unique_names(cls, values: list[RdmaResource]) -> list[RdmaResource]:
        unique_names(values, "configList")
        return values

    @model_validator(mode="after")
    def _one_source(self) -> RdmaOptions:
        if self.config_file is not None:
            if self.config_list:
                raise ValueError("give configList or configFile, not both")
            self._resources = tuple(read_plugin_file(self.config_file))
        else:
            self._resources = tuple(self.config_list)
        return self

    @property
    def resources(self) -> tuple[RdmaResource, ...]:
        return self._resources


@dataclass(frozen=True, slots=True)
class Hca:
    """One RDMA device as sysfs shows it now."""

    name: str
    pci: PciDevice | None
    ports: tuple[tuple[int, str, str], ...]
    """(port, state name such as ACTIVE, link layer)."""
    netdevs: tuple[str, ...]
    link_types: tuple[str, ...]
    chars: tuple[str, ...]
    """Char device names under <dev>/infiniband: uverbsN, umadN, issmN (rdma_cm is added per resource)."""

    @property
    def active(self) -> bool:
        return any(state == "ACTIVE" for _, state, _ in self.ports)

    @property
    def state(self) -> str:
        return ", ".join(f"port {n} {state}" for n, state, _ in self.ports) or "no ports"


def selects(resource: RdmaResource, hca: Hca) -> bool:
    sel = resource.selectors
    pci = hca.pci
    if sel.vendors and (pci is None or pci.vendor not in sel.vendors):
        return False
    if sel.device_ids and (pci is None or pci.device not in sel.device_ids):
        return False
    if sel.drivers and (pci is None or pci.driver not in sel.drivers):
        return False
    names = [*sel.if_names, *resource.devices]
    if names and not set(names) & set(hca.netdevs):
        return False
    return not (sel.link_types and not set(sel.link_types) & set(hca.link_types))


class RdmaDriver(Driver[RdmaOptions]):
    """HCAs under `<sysfsRoot>/class/infiniband`; char devices under `<devRoot>/infiniband`."""

    name = "rdma"
    Options: ClassVar[type[DriverOptions]] = RdmaOptions

    def __init__(self, options: RdmaOptions, host: HostContext) -> None:
        super().__init__(options, host)
        self._resources = options.resources
        self._watch: tuple[Path, ...] = ()
        self._fixture: bool | None = None
        self._labels: Mapping[str, str] = {}

    @classmethod
    def declared_resources(cls, options: RdmaOptions) -> list[str]:
        return [r.full_name for r in options.resources]

    @property
    def _class_ib(self) -> Path:
        return self.host.sysfs_root / "class" / "infiniband"

    def scan(self, changed: Collection[str] | None = None) -> Snapshot:
        """A handful of HCAs per node: every scan reads them all."""
        tree = PciTree(self.host.sysfs_root)
        netdevs = tree.netdevs_by_address()
        hcas = [h for name in sorted(_listdir(self._class_ib)) if (h := self._read_hca(tree, name, netdevs)) is not None]
        snapshot = {r.full_name: self._devices(r, [h for h in hcas if selects(r, h)]) for r in self._resources}
        self._labels = rdma_labels(hcas)
        if self._fixture is None:
            self._fixture = netdev.filesystem_type(self.host.sysfs_root) != "sysfs"
        if self._fixture:
            ports = [Path(os.path.realpath(self._class_ib / h.name / "ports" / str(n))) for h in hcas for n, _, _ in h.ports]
            self._watch = (self._class_ib, tree.class_net, *ports)
        return snapshot

    def _read_hca(self, tree: PciTree, name: str, netdevs: dict[str, list[str]]) -> Hca | None:
        base = self._class_ib / name
        if not base.is_dir():
            return None
        address = pci_parent(base / "device")
        pci = tree.read_device(address) if address is not None else None
        ports = []
        for port in sorted(_listdir(base / "ports"), key=lambda p: int(p) if p.isdigit() else 0):
            state = (read_text(base / "ports" / port / "state") or "").partition(":")[2].strip() or "UNKNOWN"
            ports.append((int(port) if port.isdigit() else 0, state, read_text(base / "ports" / port / "link_layer") or ""))
        names = tuple(netdevs.get(address, [])) if address is not None else ()
        links = [netdev.read_interface(tree.class_net, n) for n in names]
        chars = (*pci.uverbs, *pci.mad) if pci is not None else ()
        return Hca(name, pci, tuple(ports), names, tuple(link.link_type for link in links if link is not None), chars)

    def _nodes(self, hcas: Sequence[Hca]) -> tuple[DeviceNode, ...]:
        ib = self.host.dev_root / "infiniband"
        names = [c for h in hcas for c in h.chars] + (["rdma_cm"] if hcas else [])
        return tuple(DeviceNode(str(ib / n), f"/dev/infiniband/{n}", PERMISSIONS) for n in dict.fromkeys(names))

    def _devices(self, resource: RdmaResource, hcas: list[Hca]) -> list[Device]:
        if resource.mode == "exclusive":
            return [self._exclusive(h) for h in hcas]
        numa = tuple(sorted({h.pci.numa_node for h in hcas if h.pci is not None and h.pci.numa_node is not None}))
        if not hcas:
            health, reason = Health.UNHEALTHY, "no HCA matches the selectors"
        elif any(h.active for h in hcas):
            health, reason = Health.HEALTHY, "; ".join(f"{h.name}: {h.state}" for h in hcas)
        else:
            health, reason = Health.UNHEALTHY, "no selected HCA has an ACTIVE port: " + "; ".join(f"{h.name}: {h.state}" for h in hcas)
        edits = ContainerEdits(devices=self._nodes(hcas))
        count = resource.rdma_hca_max or 0
        return [Device(id=str(i), health=health, reason=reason, numa_nodes=numa, edits=edits) for i in range(count)]

    def _exclusive(self, hca: Hca) -> Device:
        health = Health.HEALTHY if hca.active else Health.UNHEALTHY
        numa = (hca.pci.numa_node,) if hca.pci is not None and hca.pci.numa_node is not None else ()
        return Device(id=hca.name, health=health, reason=hca.state, numa_nodes=numa, edits=ContainerEdits(devices=self._nodes([hca])))

    def labels(self) -> Mapping[str, str]:
        """NFD's rdma labels, as the last scan found the HCAs."""
        return self._labels

    def udev_matches(self) -> Sequence[UdevMatch]:
        added = frozenset({"add", "remove"})
        return (
            UdevMatch("infiniband", actions=added),
            UdevMatch("infiniband_verbs", actions=added),
            UdevMatch("net", actions=frozenset({"add", "remove", "move", "link"})),
        )

    def watch_paths(self) -> Sequence[Path]:
        return self._watch

    @classmethod
    def simulations(cls) -> Sequence[str]:
        return (SIMULATION,)

    @classmethod
    def simulate(cls, fixture: str, workdir: Path) -> dict[str, object] | None:
        """`infiniband`: two ConnectX InfiniBand HCAs, mlx5_0 (NUMA 0, port ACTIVE) and
        mlx5_1 (NUMA 1, port DOWN), a shared and an exclusive resource."""
        if fixture != SIMULATION:
            return None
        return simulation_section(build_simulation(Path(workdir)))


SIMULATION = "infiniband"
SIMULATED_RESOURCES: list[dict[str, object]] = [
    {"resourceName": "hca_shared_devices_a", "rdmaHcaMax": 1000, "selectors": {"vendors": ["15b3"], "linkTypes": ["infiniband"]}},
    {"resourceName": "hca_exclusive", "mode": "exclusive", "selectors": {"drivers": ["mlx5_core"]}},
]


def build_simulation(root: Path) -> SysfsTree:
    tree = SysfsTree(root, char_devices=os.geteuid() == 0)
    for index, (address, numa, state) in enumerate((("0000:81:00.0", 0, "ACTIVE"), ("0000:c1:00.0", 1, "DOWN"))):
        tree.add_pci(address, vendor=0x15B3, device=0x101B, pci_class=0x020700, driver="mlx5_core", numa_node=numa)
        tree.add_netdev(address, f"ib{index}", arphrd=ARPHRD_INFINIBAND, carrier=state == "ACTIVE")
        tree.add_rdma(address, f"mlx5_{index}", index, state=state, link_layer="InfiniBand")
    return tree


def rdma_labels(hcas: Sequence[Hca]) -> dict[str, str]:
    """Named as Node Feature Discovery names them: `rdma.capable` when an HCA is there,
    `rdma.available` when one has a verbs device (ib_uverbs is loaded: user space can use it)."""
    labels = {RDMA_CAPABLE: "true"} if hcas else {}
    if any(c.startswith("uverbs") for h in hcas for c in h.chars):
        labels[RDMA_AVAILABLE] = "true"
    return labels


def simulation_section(tree: SysfsTree) -> dict[str, object]:
    return {"enabled": True, "sysfsRoot": str(tree.sys), "devRoot": str(tree.dev), "configList": SIMULATED_RESOURCES}


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
