"""PCI passthrough by IOMMU group, and mediated devices, as KubeVirt's virt-handler serves them.

What KubeVirt does, kept: the config (`permittedHostDevices`, see `options`), the
IDs (the IOMMU group number, for a PCI group and for an mdev alike), and what a
container gets: `/dev/vfio/vfio` and `/dev/vfio/<group>` with `mrw`, the iommufd
cdevs `/dev/vfio/devices/vfio<X>` (with `/dev/iommu`) where the kernel made them,
and `PCI_RESOURCE_<NAME>` (the group's matching PCI addresses) or
`MDEV_PCI_RESOURCE_<NAME>` (the mdev UUIDs), the variables virt-launcher reads.

What it lacks, added:
  * Every scan rereads what it needs (the vfio-pci driver's own list, each group's
    members, `bus/mdev/devices`), and PCI bind/unbind/add/remove, mdev and vfio
    node events rescan: a device bound to vfio-pci later is offered at once.
  * Health. A group is Unhealthy, with the reason, while its node
    `<devRoot>/vfio/<N>` is not a character device, while a member other than a
    bridge is held by a host driver (the kernel would refuse the group: "not
    viable"), when it is a no-IOMMU group, and when VFIO itself is unusable. A
    group once offered stays listed while the daemon runs: a matching device
    rebound away, unbound or removed leaves it Unhealthy saying so, and it is
    Healthy again when the device is back in it; it is forgotten when its devices
    turn up in another group (a hot re-add renumbers groups).
  * Scans never open a group node (one opener per group: a probe would fail for
    every group a VM holds, or make QEMU's own open fail). The ioctls run only at
    start (`/dev/vfio/vfio`: API version, a type-1 IOMMU) and in PreStartContainer
    (VFIO_GROUP_GET_STATUS, before the VM opens the group), and not at all with
    `checkVfioApi: false`.

A group whose PCI members match several entries belongs to the first entry (in
config order) that one of them matches: a group is handed out whole, and two
resources offering one group would give it to two pods.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from nodedev.driver import (
    ContainerEdits,
    Device,
    DeviceNode,
    Driver,
    DriverError,
    DriverOptions,
    Health,
    HostContext,
    Snapshot,
    UdevMatch,
)
from nodedev.drivers.devnodes import node_problem
from nodedev.drivers.pci import NOIOMMU_GROUP_NAME, PciDevice
from nodedev.drivers.vfio import checks
from nodedev.drivers.vfio.discovery import VFIO_PCI, Mdev, VfioTree
from nodedev.drivers.vfio.options import VfioOptions, mdev_key

PCI_ENV_PREFIX = "PCI_RESOURCE"
MDEV_ENV_PREFIX = "MDEV_PCI_RESOURCE"
PERMISSIONS = "mrw"
PCI_ACTIONS = frozenset({"add", "remove", "bind", "unbind"})


def env_name(prefix: str, resource: str) -> str:
    """KubeVirt's ResourceNameToEnvVar: upper-cased, `/` and `.` to `_` (a `-` stays)."""
    return f"{prefix}_{re.sub(r'[./]', '_', resource.upper())}"


@dataclass(frozen=True, slots=True)
class Offer:
    """What one listed ID stands for; what PreStartContainer checks."""

    group: int
    node: Path
    members: tuple[str, ...]
    """The PCI addresses (or the mdev UUID) handed out under this ID."""
    mdev: bool


@dataclass(frozen=True, slots=True)
class _Found:
    resource: str
    device: Device
    offer: Offer


class VfioDriver(Driver[VfioOptions]):
    """vfio-pci functions and mdevs under `<sysfsRoot>`; nodes under `<devRoot>/vfio`."""

    name = "vfio"
    Options: ClassVar[type[DriverOptions]] = VfioOptions

    def __init__(self, options: VfioOptions, host: HostContext) -> None:
        super().__init__(options, host)
        self._resources = options.resources()
        self._pci_entries = [(e.vendor, e.device, e.resource_name) for e in options.pci_host_devices]
        self._mdev_entries = {e.key: e.resource_name for e in options.mediated_devices}
        self._vfio_dir = host.dev_root / "vfio"
        self._container = self._vfio_dir / "vfio"
        self._api_problem: str | None = None
        self._offers: dict[str, dict[str, Offer]] = {}
        """Resource -> ID -> what it stands for; replaced whole by each scan (pre_start reads it)."""
        self._known: dict[tuple[str, str], _Found] = {}
        """Every (resource, ID) offered since start, as last found: listed Unhealthy when gone."""
        self._said: set[str] = set()
        self._watch: tuple[Path, ...] = ()

    @classmethod
    def declared_resources(cls, options: VfioOptions) -> list[str]:
        return options.resources()

    def start(self) -> None:
        if self.options.check_vfio_api:
            self._api_problem = self._check_api()
            if self._api_problem is not None:
                self.host.log.warning("no usable VFIO on this node, every device is Unhealthy: %s", self._api_problem)
        else:
            self.host.log.warning("VFIO API check skipped (checkVfioApi: false): only sysfs and device nodes are checked")

    def _check_api(self) -> str | None:
        problem = node_problem(self._container, self.host.dev_root)
        return problem if problem is not None else checks.api_problem(self._container)

    # -- scanning -----------------------------------------------------------------------

    def scan(self, changed: Collection[str] | None = None) -> Snapshot:
        """Everything, every time: the vfio-pci driver's list, each group's members and the
        mdevs are a few reads per device, so `changed` narrows nothing."""
        if self._api_problem is not None:  # vfio loaded after start: checked again until it works
            self._api_problem = self._check_api()
        tree = VfioTree(self.host.sysfs_root)
        common = self._common_problem()
        found = [*self._scan_pci(tree, common), *self._scan_mdevs(tree, common)]
        current = {(f.resource, f.device.id): f for f in found}
        for key, old in list(self._known.items()):
            if key in current:
                continue
            if self._moved(old, current.values()):
                del self._known[key]
                continue
            reason = self._gone_reason(tree, old.offer)
            found.append(_Found(old.resource, replace(old.device, health=Health.UNHEALTHY, reason=reason), old.offer))
        for f in found:
            self._known[(f.resource, f.device.id)] = f
        snapshot: dict[str, list[Device]] = {r: [] for r in self._resources}
        offers: dict[str, dict[str, Offer]] = {r: {} for r in self._resources}
        for f in sorted(found, key=lambda f: (f.resource, int(f.device.id))):
            snapshot[f.resource].append(f.device)
            offers[f.resource][f.device.id] = f.offer
        self._offers = offers
        self._watch = self._paths(tree, found)
        return snapshot

    def _common_problem(self) -> str | None:
        if self._api_problem is not None:
            return f"no usable VFIO on this node: {self._api_problem}"
        return node_problem(self._container, self.host.dev_root)

    def _scan_pci(self, tree: VfioTree, common: str | None) -> list[_Found]:
        if not self._pci_entries:
            return []
        matched: dict[int, list[tuple[int, PciDevice]]] = {}
        for address in tree.vfio_bound():
            device = tree.device(address)
            if device is None:
                continue
            entry = self._pci_entry(device)
            if entry is None:
                continue
            if device.iommu_group is None:
                self._say(f"{address} ({device.vendor}:{device.device}) is bound to vfio-pci but has no IOMMU group: is the IOMMU on?")
                continue
            matched.setdefault(device.iommu_group, []).append((entry, device))
        found = []
        for group, pairs in matched.items():
            resource = self._pci_entries[min(entry for entry, _ in pairs)][2]
            for entry, device in pairs:
                if self._pci_entries[entry][2] != resource:
                    self._say(
                        f"{device.address} matches {self._pci_entries[entry][2]}, but its IOMMU group {group} "
                        f"is offered as {resource}: a group is handed out whole"
                    )
            devices = [device for entry, device in pairs if self._pci_entries[entry][2] == resource]
            found.append(self._pci_group(tree, group, resource, devices, common))
        return found

    def _pci_entry(self, device: PciDevice) -> int | None:
        for index, (vendor, product, _) in enumerate(self._pci_entries):
            if device.vendor == vendor and device.device == product:
                return index
        return None

    def _pci_group(self, tree: VfioTree, group: int, resource: str, devices: list[PciDevice], common: str | None) -> _Found:
        node = self._vfio_dir / str(group)
        addresses = tuple(sorted(d.address for d in devices))
        problem = common or node_problem(node, self.host.dev_root)
        if problem is None and any(d.iommu_group_name == NOIOMMU_GROUP_NAME for d in devices):
            problem = f"IOMMU group {group} is a no-IOMMU group (vfio-noiommu): no isolation, and QEMU refuses it"
        if problem is None:
            problem = checks.viability_problem(tree, group)
        described = ", ".join(f"{d.address} ({d.vendor}:{d.device})" for d in sorted(devices, key=lambda d: d.address))
        reason = problem or f"IOMMU group {group}: {described} on vfio-pci{self._skipped()}"
        cdevs = [c for d in devices for c in d.vfio_cdevs]
        edits = self._edits(group, cdevs, {env_name(PCI_ENV_PREFIX, resource): ",".join(addresses)})
        numa = tuple(sorted({d.numa_node for d in devices if d.numa_node is not None}))
        device = Device(id=str(group), health=Health.UNHEALTHY if problem else Health.HEALTHY, reason=reason, numa_nodes=numa, edits=edits)
        return _Found(resource, device, Offer(group, node, addresses, mdev=False))

    def _scan_mdevs(self, tree: VfioTree, common: str | None) -> list[_Found]:
        if not self._mdev_entries:
            return []
        found = []
        for uuid in tree.mdev_uuids():
            mdev = tree.mdev(uuid)
            if mdev is None:
                continue
            resource = self._mdev_entries.get(mdev_key(mdev.type_name))
            if resource is None:
                continue
            if mdev.group is None:
                self._say(f"mdev {uuid} ({mdev.type_name}) has no IOMMU group: is its vfio driver bound?")
                continue
            found.append(self._mdev_device(mdev, mdev.group, resource, common))
        return found

    def _mdev_device(self, mdev: Mdev, group: int, resource: str, common: str | None) -> _Found:
        node = self._vfio_dir / str(group)
        problem = common or node_problem(node, self.host.dev_root)
        reason = problem or f"IOMMU group {group}: mdev {mdev.uuid} ({mdev.type_name}, {mdev.type_id}) on {mdev.parent}{self._skipped()}"
        edits = self._edits(group, list(mdev.cdevs), {env_name(MDEV_ENV_PREFIX, resource): mdev.uuid})
        numa = () if mdev.numa_node is None else (mdev.numa_node,)
        device = Device(id=str(group), health=Health.UNHEALTHY if problem else Health.HEALTHY, reason=reason, numa_nodes=numa, edits=edits)
        return _Found(resource, device, Offer(group, node, (mdev.uuid,), mdev=True))

    def _edits(self, group: int, cdevs: list[str], envs: dict[str, str]) -> ContainerEdits:
        """The container node, the group node, and the iommufd cdevs whose nodes exist."""
        nodes = [self._node(self._container), self._node(self._vfio_dir / str(group))]
        present = [self._vfio_dir / "devices" / c for c in cdevs if node_problem(self._vfio_dir / "devices" / c, self.host.dev_root) is None]
        nodes += [self._node(path) for path in present]
        iommu = self.host.dev_root / "iommu"
        if present and node_problem(iommu, self.host.dev_root) is None:
            nodes.append(self._node(iommu))
        return ContainerEdits(devices=tuple(nodes), envs=envs)

    def _node(self, path: Path) -> DeviceNode:
        return DeviceNode(host_path=str(path), container_path="/dev/" + str(path.relative_to(self.host.dev_root)), permissions=PERMISSIONS)

    def _skipped(self) -> str:
        return "" if self.options.check_vfio_api else " (VFIO API check skipped: checkVfioApi is false)"

    def _moved(self, old: _Found, current: Collection[_Found]) -> bool:
        """Whether every device of a group that is gone is now offered under another ID."""
        elsewhere = {m for f in current if f.resource == old.resource for m in f.offer.members}
        return set(old.offer.members) <= elsewhere

    def _gone_reason(self, tree: VfioTree, offer: Offer) -> str:
        if offer.mdev:
            (uuid,) = offer.members
            mdev = tree.mdev(uuid)
            return f"IOMMU group {offer.group}: mdev {uuid} " + ("was removed" if mdev is None else "no longer matches")
        reasons = []
        for address in offer.members:
            device = tree.device(address)
            if device is None:
                reasons.append(f"{address} was removed")
            elif device.driver != VFIO_PCI:
                reasons.append(f"{address} is " + (f"bound to {device.driver}, not vfio-pci" if device.driver else "not bound to any driver"))
            elif device.iommu_group != offer.group:
                reasons.append(f"{address} is now in IOMMU group {device.iommu_group}")
            else:
                reasons.append(f"{address} no longer matches")
        return f"IOMMU group {offer.group}: " + "; ".join(reasons)

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            self.host.log.warning("%s", message)

    # -- what the host asks for ----------------------------------------------------------

    def pre_start(self, resource: str, device_ids: Sequence[str]) -> None:
        """Just before the container starts, before QEMU opens the groups: each group viable."""
        offers = self._offers.get(resource, {})
        for device_id in device_ids:
            offer = offers.get(device_id)
            if offer is None:
                raise DriverError(f"IOMMU group {device_id} is no longer found")
            problem = checks.pre_start_problem(VfioTree(self.host.sysfs_root), offer.group, offer.node, ioctl=self.options.check_vfio_api)
            if problem is not None:
                raise DriverError(problem)

    def udev_matches(self) -> Sequence[UdevMatch]:
        return (
            UdevMatch("pci", actions=PCI_ACTIONS),
            UdevMatch("mdev"),
            UdevMatch("vfio"),
            UdevMatch("vfio-dev"),
            UdevMatch("misc", "vfio"),
            UdevMatch("misc", "iommu"),
        )

    def watch_paths(self) -> Sequence[Path]:
        return self._watch

    def _paths(self, tree: VfioTree, found: list[_Found]) -> tuple[Path, ...]:
        paths = [self.host.dev_root, self._vfio_dir, self._vfio_dir / "devices", tree.pci_drivers, tree.vfio_pci, tree.pci.devices_dir]
        if self._mdev_entries:
            paths.append(tree.mdevs)
        for f in found:
            if not f.offer.mdev:
                paths.append(tree.group_dir(f.offer.group))
                paths += tree.member_dirs(f.offer.group)
        return tuple(dict.fromkeys(paths))

    @classmethod
    def simulations(cls) -> Sequence[str]:
        from nodedev.drivers.vfio import simulate

        return (simulate.NAME,)

    @classmethod
    def simulate(cls, fixture: str, workdir: Path) -> dict[str, Any] | None:
        from nodedev.drivers.vfio import simulate

        return simulate.simulate(fixture, workdir)
