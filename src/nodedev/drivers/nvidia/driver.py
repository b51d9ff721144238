"""The NVIDIA GPU driver: NVML discovery, NVIDIA-compatible resources and Allocate,
topology-aware preferred allocation, and event-driven health that can recover.

What a container gets for each GPU, MIG device or replica is computed at scan
time into its `Device.edits`; allocate() adds only what depends on the request.

GPUs that arrive or leave after start: a PCI event for an NVIDIA device (or a
change in a fixture's sysfs tree) makes scan() compare the GPUs on the bus with
those NVML lists; NVML lists GPUs only as of its initialisation, so a new one
makes the driver initialise NVML again (and restart the event thread). A GPU
NVML loses is Unhealthy at once (Xid 79 or a failing probe) and leaves the list
when its PCI device is gone.

With `sharing.mps` the driver runs and supervises NVIDIA's MPS control daemon
(mps.py); a daemon that cannot run makes the shared devices Unhealthy.

A resource is reported only once it has had a device (NVIDIA registers no
empty resource); one that had devices stays, empty, as the host keeps it anyway.

Threads: scan() (host worker thread) rebuilds an immutable `View` and swaps it
in with one assignment; allocate() and preferred_allocation() (event loop) only
read the current View. The health thread writes into the HealthBook and asks
the host for a rescan; it never touches the View.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pynvml

from nodedev.driver import (
    ContainerEdits,
    Device,
    Driver,
    DriverError,
    DriverOptions,
    Health,
    HostContext,
    Snapshot,
    UdevMatch,
)
from nodedev.drivers.nvidia import allocate as alloc
from nodedev.drivers.nvidia import driverroot, environment, gfd, pcibus, resources, topology
from nodedev.drivers.nvidia.discovery import NVML_LIBRARY, Discovery, discover, normalize_bus_id
from nodedev.drivers.nvidia.health import EventMonitor, HealthBook, HealthView, XidPolicy
from nodedev.drivers.nvidia.mps import ControlDaemon
from nodedev.drivers.nvidia.options import GPU_RESOURCE, NvidiaOptions
from nodedev.drivers.nvidia.resources import ResourceError, Unit


@dataclass(frozen=True, slots=True)
class Spread:
    """How preferred allocation spreads one replicated or MIG resource over physical devices."""

    group_of: Mapping[str, str]
    """Device ID -> its spreading group: the physical GPU or MIG device of a replica,
    the parent GPU of a MIG device."""
    capacity: Mapping[str, int]
    """Group -> how many IDs it has in all."""
    order: Mapping[str, int]
    """Group -> its position (GPU, then MIG order): the last tie-break."""


@dataclass(frozen=True, slots=True)
class View:
    """What allocate() and preferred_allocation() need beyond the devices, fixed at one scan."""

    replicated: frozenset[str] = frozenset()
    spread: Mapping[str, Spread] = field(default_factory=dict)
    """Resources whose IDs are replicas or MIG devices; the others are chosen by topology."""
    scores: Mapping[tuple[str, str], int] = field(default_factory=dict)
    cdi_names: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """Resource -> device ID -> qualified CDI name; filled only for cdi-annotations."""


class NvidiaDriver(Driver[NvidiaOptions]):
    name = "nvidia"
    Options: ClassVar[type[DriverOptions]] = NvidiaOptions

    def __init__(self, options: NvidiaOptions, host: HostContext) -> None:
        super().__init__(options, host)
        self.log: logging.Logger = host.log
        self.nvml: Any = pynvml
        self.clock: Callable[[], float] = time.monotonic
        """The health thread's time (quiet periods, probe schedule). Tests replace it before start()."""
        self._settings = alloc.AllocateSettings.from_options(options)
        self._policy = XidPolicy.from_options(options.health)
        self._book = HealthBook(clock=self._now)
        self._lock = threading.RLock()
        """Serialises NVML use by start(), scan() and stop() (the health thread has its own)."""
        self._open = False
        self._stopped = False
        self._monitor: EventMonitor | None = None
        self._discovery: Discovery | None = None
        self._topology_key: frozenset[str] | None = None
        self._topology = topology.EMPTY
        self._cdi_text: str | None = None
        self._warned: set[str] = set()
        self._served: set[str] = set()
        """Resources that have had a device: reported from then on, even when empty."""
        self._on_bus: set[str] = set()
        """GPUs (bus IDs) seen in sysfs, so one whose PCI device goes is noticed."""
        self._tried: set[str] = set()
        """GPUs on the bus NVML was re-initialised for, so one it never lists costs one re-init."""
        self._gone: set[str] = set()
        """GPUs NVML still lists (until its next initialisation) whose PCI device is gone."""
        self._driver_files: driverroot.DriverFiles | None = None
        self._hooks: tuple[dict[str, Any], ...] = ()
        self._env_note = "; from the environment: " + ", ".join(o.describe() for o in options.environment) if options.environment else ""
        self._mps: ControlDaemon | None = None
        if options.sharing.mps is not None and options.flags.mps_root is not None:
            self._mps = ControlDaemon(self.visible_driver_root, options.flags.mps_root, options.shared_name(GPU_RESOURCE), self.log)
        self.view = View()
        self._labels: Mapping[str, str] = {}

    # -- config ------------------------------------------------------------------

    @classmethod
    def declared_resources(cls, options: NvidiaOptions) -> list[str]:
        return resources.declared_resources(options)

    @classmethod
    def simulations(cls) -> Sequence[str]:
        from nodedev.drivers.nvidia import simulate

        return simulate.fixture_names()

    @classmethod
    def simulate(cls, fixture: str, workdir: Path) -> dict[str, Any] | None:
        from nodedev.drivers.nvidia import simulate

        return simulate.simulate(fixture, workdir)

    @property
    def dev_dir(self) -> Path:
        """Where device nodes are looked for and what host paths name: NVIDIA's
        nvidiaDevRoot (or nvidiaDriverRoot) + /dev when set, else nodedev's devRoot."""
        flags = self.options.flags
        root = flags.nvidia_dev_root or flags.nvidia_driver_root
        return Path(root) / "dev" if root else self.host.dev_root

    @property
    def driver_root(self) -> Path:
        """nvidiaDriverRoot on the host: what CDI host paths name."""
        return Path(self.options.flags.nvidia_driver_root or "/")

    @property
    def visible_driver_root(self) -> Path:
        """Where this process finds the driver's files: containerDriverRoot, else the host's root."""
        return Path(self.options.flags.plugin.container_driver_root or self.driver_root)

    def udev_matches(self) -> Sequence[UdevMatch]:
        """NVIDIA PCI devices arriving, leaving, or changing driver."""
        return (UdevMatch("pci", actions=frozenset({"add", "remove", "bind", "unbind"}), properties={"PCI_ID": "10DE:*"}),)

    def watch_paths(self) -> Sequence[Path]:
        """The PCI device directory: watched only when it is a fixture tree (the host skips /sys)."""
        return (pcibus.devices_dir(self.host.sysfs_root),)

    def _now(self) -> float:
        return self.clock()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        for line in self.options.ignored():
            self.log.info("%s", line)
        for line in environment.ignored():
            self.log.warning("%s", line)
        for override in self.options.environment:
            if override.file_value is not None:
                self.log.warning("%s: the environment wins over the config file, as in NVIDIA's plugin", override.describe())
            else:
                self.log.info("%s from the environment", override.describe())
        try:
            self._open_nvml()
        except DriverError as err:
            if self.options.flags.fail_on_init_error:
                raise
            self.log.warning("no NVML (%s); waiting: serving no GPUs and retrying at every rescan", err)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._close_nvml()
            if self._mps is not None:
                self._mps.stop()

    def _open_nvml(self) -> None:
        """nvmlInit, a first discovery (so a MIG layout that contradicts the strategy stops
        the driver here), topology, and the health thread."""
        with self._lock:
            if self._open:
                return
            try:
                self.nvml.nvmlInit()
            except self.nvml.NVMLError as err:
                raise DriverError(f"cannot initialise NVML from {NVML_LIBRARY}: {err}") from None
            try:
                discovery = self._discover()
                self._units(discovery)
                if self.options.health.enabled:
                    self._monitor = EventMonitor(
                        self.nvml,
                        discovery.handles,
                        self._book,
                        self._policy,
                        self.options.health,
                        on_change=self.host.rescan,
                        log=self.log,
                        clock=self._now,
                    )
                    self._monitor.start()
            except BaseException:
                self.nvml.nvmlShutdown()
                raise
            self._open = True
            if self._settings.any_cdi:
                self._find_driver_files()
            gpus = discovery.gpus
            migs = sum(len(g.migs) for g in gpus)
            self.log.info("NVML sees %d GPU(s)%s", len(gpus), f" with {migs} MIG device(s)" if migs else "")

    def _close_nvml(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        if self._open:
            self._open = False
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError as err:
                self.log.warning("nvmlShutdown failed: %s", err)

    def _find_driver_files(self) -> None:
        """The driver's files for the CDI spec, by the version NVML reports; once per NVML init."""
        try:
            version = self.nvml.nvmlSystemGetDriverVersion()
        except self.nvml.NVMLError as err:
            self.log.warning("NVML gives no driver version (%s); the CDI spec names device nodes only", err)
            self._driver_files, self._hooks = None, ()
            return
        version = version.decode() if isinstance(version, bytes) else str(version)
        files = driverroot.find(self.visible_driver_root, version)
        if files != self._driver_files:
            driverroot.describe(files, self.visible_driver_root, self.log)
        self._driver_files = files
        self._hooks = ()
        tool = self.options.flags.plugin.nvidia_ctk_path
        if tool is not None:
            hook = driverroot.ldcache_hook(tool, files)
            if hook is None:
                self._warn_once(f"flags.plugin.nvidiaCTKPath {tool}: not nvidia-ctk or nvidia-cdi-hook, or no libraries "
                                "found; the CDI spec has no ld cache hook")
            elif not os.path.exists(tool):
                self._warn_once(f"flags.plugin.nvidiaCTKPath {tool} does not exist; the CDI spec has no ld cache hook")
            else:
                self._hooks = (hook,)

    def _warn_once(self, warning: str) -> None:
        if warning not in self._warned:
            self._warned.add(warning)
            self.log.warning("%s", warning)

    def _follow_bus(self, changed: Collection[str] | None) -> None:
        """Initialises NVML again when a GPU is on the bus that NVML does not list; notes a GPU
        NVML lists whose PCI device is gone (`_gone`), which scans then leave out: NVML keeps
        listing it, lost, until it is initialised again, which is not worth the event
        thread's restart (up to a second). `changed` (PCI addresses from uevents) limits the look."""
        root = self.host.sysfs_root
        listed = {g.bus_id for g in self._discovery.gpus} - self._gone if self._discovery else set()
        among = None if changed is None else {normalize_bus_id(name) for name in changed}
        on_bus = pcibus.gpus_on_bus(root, among)
        self._on_bus |= on_bus
        self._tried -= (among if among is not None else self._tried) - on_bus  # gone or unbound: worth a new try
        arrived = on_bus - listed - self._tried
        left = {b for b in self._on_bus & listed if (among is None or b in among) and not pcibus.present(root, b)}
        self._on_bus -= left
        if left:
            self.log.info("NVIDIA GPU at %s left the bus: no longer listed", ", ".join(sorted(left)))
            self._gone |= left
        if not arrived:
            return
        self.log.info("NVIDIA GPU arrived at %s: initialising NVML again", ", ".join(sorted(arrived)))
        self._tried |= arrived
        self._close_nvml()
        self._discovery = None
        self._gone = set()
        self._open_nvml()

    def _discover(self) -> Discovery:
        try:
            discovery = discover(self.nvml, self.host.sysfs_root, self.host.proc_root, self.log, self._discovery)
        except self.nvml.NVMLError as err:
            raise DriverError(f"NVML ({NVML_LIBRARY}) cannot list GPUs: {err}") from None
        self._discovery = discovery
        return discovery

    # -- scan --------------------------------------------------------------------

    def scan(self, changed: Collection[str] | None = None) -> Snapshot:
        """Always reads every GPU (NVML answers for all of them in one pass); `changed`
        only limits which PCI addresses are checked for GPUs arriving or leaving."""
        with self._lock:
            if self._stopped:
                return {name: [] for name in self._served}
            snapshot = self._scan(changed)
            self._labels = gfd.node_labels(self._discovery, self._gone, self.options) if any(snapshot.values()) else {}
            return snapshot

    def labels(self) -> Mapping[str, str]:
        return self._labels  # GPU Feature Discovery's, as the last scan found them (gfd.py)

    def _scan(self, changed: Collection[str] | None) -> Snapshot:
        if not self._open:
            try:
                self._open_nvml()
            except DriverError as err:
                if self.options.flags.fail_on_init_error:
                    raise
                self.log.info("no NVML (%s); waiting", err)
                return {name: [] for name in self._served}
        try:
            self._follow_bus(changed)
        except DriverError as err:
            if self.options.flags.fail_on_init_error:
                raise
            self.log.warning("NVML cannot be initialised again (%s); waiting", err)
            return {name: [] for name in self._served}
        discovery = self._discover()
        if self._gone:
            discovery = dataclasses.replace(discovery, gpus=tuple(g for g in discovery.gpus if g.bus_id not in self._gone))
        transient: dict[str, str] = {}
        for uuid, nvml_error in discovery.unreadable.items():
            reason = f"NVML cannot reach the GPU: {nvml_error}"
            if self._monitor is not None:
                self._book.record(uuid, reason, source="nvml")
            else:
                transient[uuid] = reason
        by_resource = self._units(discovery)
        self._refresh_topology(discovery)
        control = tuple(n for n in alloc.CONTROL_NODES if os.path.exists(self.dev_dir / n))
        if self._settings.any_cdi:
            self._write_cdi(discovery, control)
        mps_problem = self._supervise_mps(by_resource)
        snapshot = self._snapshot(by_resource, self._book.view(), transient, control, mps_problem)
        self.view = self._build_view(by_resource)
        return snapshot

    def _units(self, discovery: Discovery) -> dict[str, list[Unit]]:
        warnings: list[str] = []
        try:
            by_resource = resources.build_units(discovery.gpus, self.options, warnings)
        except ResourceError as err:
            raise DriverError(str(err)) from None
        for warning in warnings:
            self._warn_once(warning)
        self._served |= {name for name, units in by_resource.items() if units}
        ordered = [name for name in by_resource if name in self._served] + sorted(self._served - by_resource.keys())
        return {name: by_resource.get(name, []) for name in ordered}

    def _refresh_topology(self, discovery: Discovery) -> None:
        """NVLink and PCIe levels are read again only when the set of GPUs changed."""
        key = frozenset(g.uuid for g in discovery.gpus)
        if key == self._topology_key:
            return
        self._topology = topology.read_topology(self.nvml, discovery.gpus, discovery.handles)
        self._topology_key = key

    def _build_view(self, by_resource: dict[str, list[Unit]]) -> View:
        replicated = frozenset(r for r, units in by_resource.items() if any(u.replica is not None for u in units))
        spread = {
            resource: _spread(units, resource in replicated)
            for resource, units in by_resource.items()
            if resource in replicated or any(u.mig is not None for u in units)
        }
        scores: dict[tuple[str, str], int] = {}
        for pair, link in self._topology.links.items():
            a, b = tuple(pair)
            scores[(a, b)] = scores[(b, a)] = link.score
        cdi_names: dict[str, dict[str, str]] = {}
        if self._settings.annotates:
            cdi_names = {r: {u.id: alloc.cdi_name(u, self._settings) for u in units} for r, units in by_resource.items()}
        return View(replicated=replicated, spread=spread, scores=scores, cdi_names=cdi_names)

    def _write_cdi(self, discovery: Discovery, control: tuple[str, ...]) -> None:
        files = self._driver_files
        mounts = driverroot.mounts(files, self.driver_root) if files else []
        spec = alloc.cdi_spec(discovery.gpus, self.dev_dir, control, mounts, self._hooks)
        text = json.dumps(spec, sort_keys=True)
        root = Path(self.options.cdi_root)
        if text == self._cdi_text and (root / alloc.CDI_SPEC_FILE).exists():
            return
        try:
            path = alloc.write_cdi_spec(root, spec)
        except OSError as err:
            self.log.error("cannot write the CDI spec under %s: %s; cdi-* allocations will fail", root, err)
            return
        self._cdi_text = text
        self.log.info("CDI spec written: %s (%d devices)", path, len(spec["devices"]))

    def _supervise_mps(self, by_resource: dict[str, list[Unit]]) -> str | None:
        """Keeps the MPS control daemon running with the shared GPUs' limits; why not, if it cannot."""
        if self._mps is None:
            return None
        gpus = [unit.gpu for unit in by_resource.get(self._mps.resource, [])]
        problem = self._mps.supervise(gpus, self.options.replicas[GPU_RESOURCE])
        if problem:
            self._warn_once(f"{self._mps.resource}: {problem}")
        return problem

    def _snapshot(
        self,
        by_resource: dict[str, list[Unit]],
        health: HealthView,
        transient: dict[str, str],
        control: tuple[str, ...],
        mps_problem: str | None = None,
    ) -> Snapshot:
        monitored = "NVML events watched" if self._monitor is not None else "health checks off"
        dev_dir = self.dev_dir
        snapshot: dict[str, list[Device]] = {}
        for resource, units in by_resource.items():
            devices = []
            for unit in units:
                if unit.mig is not None:
                    problem = health.mig_problem(unit.gpu.uuid, unit.mig.gpu_instance, unit.mig.compute_instance)
                else:
                    problem = health.gpu_problem(unit.gpu.uuid)
                problem = problem or transient.get(unit.gpu.uuid)
                if unit.replica is not None and mps_problem:
                    problem = f"{problem}; {mps_problem}" if problem else mps_problem
                where = f"{unit.gpu.name} at {unit.gpu.bus_id}"
                if unit.mig is not None:
                    where = f"MIG {unit.mig.profile} {unit.mig.index} on {where}"
                devices.append(
                    Device(
                        id=unit.id,
                        health=Health.UNHEALTHY if problem else Health.HEALTHY,
                        reason=(problem or f"{where}; {monitored}") + self._env_note,
                        numa_nodes=unit.numa_nodes,
                        edits=alloc.device_edits(unit, self._settings, dev_dir, control),
                    )
                )
            snapshot[resource] = devices
        return snapshot

    # -- kubelet calls (event loop, no I/O) ----------------------------------------

    def allocate(self, resource: str, devices: Sequence[Device]) -> ContainerEdits:
        view = self.view
        return alloc.request_edits(
            devices,
            replicated=resource in view.replicated,
            settings=self._settings,
            cdi_names=view.cdi_names.get(resource, {}),
        )

    def preferred_allocation(
        self,
        resource: str,
        available: Sequence[str],
        must_include: Sequence[str],
        size: int,
    ) -> list[str]:
        view = self.view
        if size >= len(available):  # the host checked: must_include is within available
            return topology.in_id_order(available)
        spread = view.spread.get(resource)
        if spread is not None:
            return topology.spread_pick(
                available,
                must_include,
                size,
                group_of=lambda i: spread.group_of.get(i, i),
                capacity=spread.capacity,
                policy=self.options.flags.plugin.shared_devices_allocation_policy,
                group_order=spread.order,
            )
        scores = view.scores
        return topology.best_set(available, must_include, size, lambda a, b: scores.get((a, b), 0))


def _spread(units: Sequence[Unit], replicated: bool) -> Spread:
    """Replicas spread over their physical device; MIG devices over their parent GPUs."""
    group_of = {unit.id: unit.target_uuid if replicated else unit.gpu.uuid for unit in units}
    capacity: dict[str, int] = {}
    for group in group_of.values():
        capacity[group] = capacity.get(group, 0) + 1
    return Spread(group_of=group_of, capacity=capacity, order={group: i for i, group in enumerate(capacity)})
