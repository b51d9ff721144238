"""The NVIDIA GPU driver: NVML discovery, NVIDIA-compatible resources and Allocate,
topology-aware preferred allocation, and event-driven health that can recover.

Threads: scan() (host worker thread) rebuilds an immutable `View` and swaps it
in with one assignment; allocate() and preferred_allocation() (event loop) only
read the current View. The health thread writes into the HealthBook and asks
the host for a rescan; it never touches the View.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pynvml

from nodedev.driver import (
    Allocation,
    AllocationError,
    Device,
    Driver,
    DriverError,
    DriverOptions,
    Health,
    HostContext,
    Snapshot,
)
from nodedev.drivers.nvidia import allocate as alloc
from nodedev.drivers.nvidia import resources, topology
from nodedev.drivers.nvidia.discovery import NVML_LIBRARY, Discovery, discover
from nodedev.drivers.nvidia.health import EventMonitor, HealthBook, HealthView, XidPolicy
from nodedev.drivers.nvidia.options import NvidiaOptions
from nodedev.drivers.nvidia.resources import ResourceError, Unit


@dataclass(frozen=True, slots=True)
class View:
    """Everything allocate() and preferred_allocation() need, fixed at one scan."""

    units: dict[str, dict[str, Unit]] = field(default_factory=dict)
    replicated: frozenset[str] = frozenset()
    control_nodes: tuple[str, ...] = ()
    scores: dict[tuple[str, str], int] = field(default_factory=dict)
    capacity: dict[str, dict[str, int]] = field(default_factory=dict)
    """Resource -> spreading group -> how many IDs the group has in all."""
    group_order: dict[str, dict[str, int]] = field(default_factory=dict)
    """Resource -> spreading group -> its position (GPU, then MIG order): the last tie-break."""


class NvidiaDriver(Driver):
    name = "nvidia"
    Options: ClassVar[type[DriverOptions]] = NvidiaOptions

    def __init__(self, options: DriverOptions, host: HostContext) -> None:
        super().__init__(options, host)
        assert isinstance(options, NvidiaOptions)
        self.opts: NvidiaOptions = options
        self.log: logging.Logger = host.log
        self.nvml: Any = pynvml
        self._settings = alloc.AllocateSettings.from_options(options)
        self._policy = XidPolicy.from_options(options.health)
        self._book = HealthBook()
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
        self.view = View()

    # -- config ------------------------------------------------------------------

    @classmethod
    def declared_resources(cls, options: DriverOptions) -> list[str]:
        assert isinstance(options, NvidiaOptions)
        return resources.declared_resources(options)

    @property
    def dev_dir(self) -> Path:
        """Where device nodes are looked for and what host paths name: NVIDIA's
        nvidiaDevRoot (or nvidiaDriverRoot) + /dev when set, else nodedev's devRoot."""
        root = self.opts.flags.nvidia_dev_root or self.opts.flags.nvidia_driver_root
        return Path(root) / "dev" if root else self.host.dev_root

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        try:
            self._open_nvml()
        except DriverError as err:
            if self.opts.flags.fail_on_init_error:
                raise
            self.log.warning("no NVML (%s); waiting: serving no GPUs and retrying at every rescan", err)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._monitor is not None:
                self._monitor.stop()
                self._monitor = None
            if self._open:
                self._open = False
                try:
                    self.nvml.nvmlShutdown()
                except self.nvml.NVMLError as err:
                    self.log.warning("nvmlShutdown failed: %s", err)

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
                if self.opts.health.enabled:
                    self._monitor = EventMonitor(
                        self.nvml,
                        discovery.handles,
                        self._book,
                        self._policy,
                        self.opts.health,
                        on_change=self.host.rescan,
                        log=self.log,
                    )
                    self._monitor.start()
            except BaseException:
                self.nvml.nvmlShutdown()
                raise
            self._open = True
            gpus = discovery.gpus
            migs = sum(len(g.migs) for g in gpus)
            self.log.info("NVML sees %d GPU(s)%s", len(gpus), f" with {migs} MIG device(s)" if migs else "")

    def _discover(self) -> Discovery:
        try:
            discovery = discover(self.nvml, self.host.sysfs_root, Path(self.opts.proc_root), self.log, self._discovery)
        except self.nvml.NVMLError as err:
            raise DriverError(f"NVML ({NVML_LIBRARY}) cannot list GPUs: {err}") from None
        self._discovery = discovery
        return discovery

    # -- scan --------------------------------------------------------------------

    def scan(self) -> Snapshot:
        with self._lock:
            if self._stopped:
                return {name: [] for name in self.declared_resources(self.opts)}
            return self._scan()

    def _scan(self) -> Snapshot:
        if not self._open:
            try:
                self._open_nvml()
            except DriverError as err:
                if self.opts.flags.fail_on_init_error:
                    raise
                self.log.info("no NVML (%s); waiting", err)
                return {name: [] for name in self.declared_resources(self.opts)}
        discovery = self._discover()
        transient: dict[str, str] = {}
        for uuid, err in discovery.unreadable.items():
            reason = f"NVML cannot reach the GPU: {err}"
            if self._monitor is not None:
                self._book.record(uuid, reason, source="nvml")
            else:
                transient[uuid] = reason
        by_resource = self._units(discovery)
        self._refresh_topology(discovery)
        control = tuple(n for n in alloc.CONTROL_NODES if os.path.exists(self.dev_dir / n))
        self.view = self._build_view(by_resource, control)
        if self._settings.any_cdi:
            self._write_cdi(discovery, control)
        return self._snapshot(by_resource, self._book.view(), transient)

    def _units(self, discovery: Discovery) -> dict[str, list[Unit]]:
        warnings: list[str] = []
        try:
            by_resource = resources.build_units(discovery.gpus, self.opts, warnings)
        except ResourceError as err:
            raise DriverError(str(err)) from None
        for warning in warnings:
            if warning not in self._warned:
                self._warned.add(warning)
                self.log.warning("%s", warning)
        for name in self.declared_resources(self.opts):
            by_resource.setdefault(name, [])
        return by_resource

    def _refresh_topology(self, discovery: Discovery) -> None:
        """NVLink and PCIe levels are read again only when the set of GPUs changed."""
        key = frozenset(g.uuid for g in discovery.gpus)
        if key == self._topology_key:
            return
        self._topology = topology.read_topology(self.nvml, discovery.gpus, discovery.handles)
        self._topology_key = key

    def _build_view(self, by_resource: dict[str, list[Unit]], control: tuple[str, ...]) -> View:
        replicated = frozenset(r for r, units in by_resource.items() if any(u.replica is not None for u in units))
        capacity: dict[str, dict[str, int]] = {}
        order: dict[str, dict[str, int]] = {}
        for resource, units in by_resource.items():
            counts: dict[str, int] = {}
            for unit in units:
                group = _group(unit, resource in replicated)
                counts[group] = counts.get(group, 0) + 1
            capacity[resource] = counts
            order[resource] = {group: position for position, group in enumerate(counts)}
        scores: dict[tuple[str, str], int] = {}
        for pair, link in self._topology.links.items():
            a, b = tuple(pair)
            scores[(a, b)] = scores[(b, a)] = link.score
        return View(
            units={r: {u.id: u for u in units} for r, units in by_resource.items()},
            replicated=replicated,
            control_nodes=control,
            scores=scores,
            capacity=capacity,
            group_order=order,
        )

    def _write_cdi(self, discovery: Discovery, control: tuple[str, ...]) -> None:
        spec = alloc.cdi_spec(discovery.gpus, self.dev_dir, control)
        text = json.dumps(spec, sort_keys=True)
        root = Path(self.opts.cdi_root)
        if text == self._cdi_text and (root / alloc.CDI_SPEC_FILE).exists():
            return
        try:
            path = alloc.write_cdi_spec(root, spec)
        except OSError as err:
            self.log.error("cannot write the CDI spec under %s: %s; cdi-* allocations will fail", root, err)
            return
        self._cdi_text = text
        self.log.info("CDI spec written: %s (%d devices)", path, len(spec["devices"]))

    def _snapshot(self, by_resource: dict[str, list[Unit]], health: HealthView, transient: dict[str, str]) -> Snapshot:
        monitored = "NVML events watched" if self._monitor is not None else "health checks off"
        snapshot: dict[str, list[Device]] = {}
        for resource, units in by_resource.items():
            devices = []
            for unit in units:
                if unit.mig is not None:
                    problem = health.mig_problem(unit.gpu.uuid, unit.mig.gpu_instance, unit.mig.compute_instance)
                else:
                    problem = health.gpu_problem(unit.gpu.uuid)
                problem = problem or transient.get(unit.gpu.uuid)
                where = f"{unit.gpu.name} at {unit.gpu.bus_id}"
                if unit.mig is not None:
                    where = f"MIG {unit.mig.profile} {unit.mig.index} on {where}"
                devices.append(
                    Device(
                        id=unit.id,
                        health=Health.UNHEALTHY if problem else Health.HEALTHY,
                        reason=problem or f"{where}; {monitored}",
                        numa_nodes=unit.numa_nodes,
                    )
                )
            snapshot[resource] = devices
        return snapshot

    # -- kubelet calls (event loop, no I/O) ----------------------------------------

    def allocate(self, resource: str, device_ids: Sequence[str]) -> Allocation:
        view = self.view
        table = view.units.get(resource)
        if table is None:
            raise AllocationError(f"nvidia: unknown resource {resource!r}")
        units = []
        for device_id in device_ids:
            unit = table.get(device_id)
            if unit is None:
                raise AllocationError(f"{resource}: unknown device {device_id!r}")
            units.append(unit)
        return alloc.build_allocation(
            resource,
            units,
            replicated=resource in view.replicated,
            settings=self._settings,
            dev_dir=self.dev_dir,
            control_nodes=view.control_nodes,
        )

    def preferred_allocation(
        self,
        resource: str,
        available: Sequence[str],
        must_include: Sequence[str],
        size: int,
    ) -> list[str]:
        view = self.view
        table = view.units.get(resource, {})
        pool = list(dict.fromkeys([*must_include, *available]))
        if size >= len(pool):
            return pool
        replicated = resource in view.replicated
        if replicated or any(u.mig is not None for u in table.values()):
            return topology.spread_pick(
                available,
                must_include,
                size,
                group_of=lambda i: _group(table[i], replicated) if i in table else i,
                capacity=view.capacity.get(resource, {}),
                policy=self.opts.flags.plugin.shared_devices_allocation_policy,
                group_order=view.group_order.get(resource, {}),
            )
        scores = view.scores
        return topology.best_set(available, must_include, size, lambda a, b: scores.get((a, b), 0))


def _group(unit: Unit, replicated: bool) -> str:
    """Replicas spread over their physical device; MIG devices over their parent GPUs."""
    return unit.target_uuid if replicated else unit.gpu.uuid
