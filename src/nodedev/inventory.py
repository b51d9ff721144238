"""The device side of the daemon: drivers, their scans, and what changed.

The inventory starts every enabled driver, rescans a driver when something asks
(a kernel event, a watched path, the driver itself, the periodic resync), checks
and diffs the snapshot it returns, and tells listeners which resources changed.
It knows nothing of gRPC; `serve` puts the kubelet side on top of it, `watch`
prints its changes.

Scans are not spaced: a driver is scanned at once when no scan of it is in
flight, and whatever asks while one runs folds into a single follow-up scan,
told the union of the device names that changed (or "everything").

Before a snapshot is applied, a device that left its resource while a pod holds
it stays there, Unhealthy, until the kubelet says it is released (`podresources`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodedev import metrics
from nodedev.config import Config, EnabledDriver, resource_name_problem
from nodedev.driver import MAX_DEVICE_ID_LENGTH, Device, Driver, DriverError, HostContext, Snapshot
from nodedev.podresources import InUse, PodResourcesClient, socket_path

if TYPE_CHECKING:
    from nodedev.hotplug import HotplugEngine, PathWatcher

log = logging.getLogger("nodedev.inventory")

STOP_WAIT_S = 1.0
"""How long stop() waits for a scan still running in its thread before giving up on the
driver's stop(): stop never overlaps a scan, and SIGTERM must not hang on a stuck library."""


@dataclass(frozen=True, slots=True)
class Change:
    """One device that appeared, vanished or changed health, numa or reason."""

    driver: str
    resource: str
    before: Device | None
    after: Device | None


Listener = Callable[[str, Mapping[str, Device], Sequence[Change]], None]
"""Called on the loop after every scan, for each resource of the driver: the resource,
all its devices now, and what changed (often nothing: edits may still be new)."""

Changed = frozenset[str] | None
"""Device names an event named, or None for "everything"."""


@dataclass(eq=False)
class DriverRunner:
    """One enabled driver and its last good snapshot."""

    name: str
    enabled: EnabledDriver
    driver: Driver[Any] | None = None
    error: str | None = None
    task: asyncio.Task[None] | None = None
    devices: dict[str, dict[str, Device]] = field(default_factory=dict)
    wanted: asyncio.Event = field(default_factory=asyncio.Event)
    changed: set[str] | None = field(default_factory=set)
    """Names asked for since the last scan began; None once anyone asked for everything."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held in the worker thread around scan() and stop(), so the two never overlap."""
    scans: int = 0


class Inventory:
    def __init__(self, config: Config, paths: PathWatcher | None = None) -> None:
        self.config = config
        self.runners: dict[str, DriverRunner] = {}
        self.owners: dict[str, str] = {}
        self._listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paths = paths
        self.events: HotplugEngine | None = None
        self.in_use = InUse(PodResourcesClient(socket_path(config.plugin_dir)), self.request_rescan)
        """Held devices that moved stay where they were until released (see podresources)."""

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    @property
    def started(self) -> list[DriverRunner]:
        return [r for r in self.runners.values() if r.driver is not None]

    def resources(self) -> dict[str, tuple[DriverRunner, dict[str, Device]]]:
        return {res: (r, devs) for r in self.started for res, devs in r.devices.items()}

    def owner(self, resource: str) -> DriverRunner | None:
        runner = self.runners.get(self.owners.get(resource, ""))
        return runner if runner is not None and runner.driver is not None else None

    # --- lifecycle -------------------------------------------------------------

    async def start(self, *, hotplug: bool = True) -> None:
        """Starts every driver (concurrently; a failure disables that driver only) and scans them."""
        self._loop = asyncio.get_running_loop()
        runners = [self._runner(enabled) for enabled in self.config.drivers]
        self.runners = {r.name: r for r in runners}
        await asyncio.gather(*(self._start_driver(r) for r in self.started))
        if hotplug:  # listen before the first scan, so a change between the two is not missed
            self._start_events()
        await asyncio.gather(*(self._scan(r) for r in self.started))
        for runner in self.started:
            runner.task = asyncio.create_task(self._rescan_loop(runner), name=f"rescan-{runner.name}")
        if self.config.hotplug.resync_seconds > 0:
            self._tasks.append(asyncio.create_task(self._resync_loop(), name="resync"))

    async def stop(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.in_use.close()
        await asyncio.gather(*(self._stop_driver(r) for r in self.started))

    async def reconfigure(self, config: Config) -> tuple[list[str], list[str]]:
        """Applies a reloaded config's drivers; returns (resources no driver serves any
        more, resources still served by a driver that was restarted).

        A driver whose section is unchanged keeps running untouched; one removed,
        disabled or changed is stopped, and a new or changed one is started and
        scanned. A changed driver's resources keep their owner across the swap, so
        the new driver's first scan lands on the same resource.
        """
        old = {name: r.enabled.options for name, r in self.runners.items()}
        new = {d.name: d for d in config.drivers}
        going = [name for name in old if name not in new or new[name].options != old[name]]
        before: dict[str, str] = dict(self.owners)
        for name in going:
            runner = self.runners.pop(name)
            self.owners = {res: owner for res, owner in self.owners.items() if owner != name}
            if name not in new:  # a restarted driver keeps what it kept: still held, still moved
                self.in_use.forget(name)
            if self.events is not None:
                self.events.subscribe(name, (), ())
            await self._stop_driver(runner)
            log.info("driver %s: stopped by config reload", name)
        self.config = config
        for enabled in config.drivers:
            if enabled.name not in self.runners:
                await self._add(enabled)
        restarted = [res for res, owner in before.items() if owner in going and self.owners.get(res) == owner]
        dropped = [res for res in before if res not in self.owners]
        return dropped, restarted

    async def _add(self, enabled: EnabledDriver) -> None:
        runner = self.runners[enabled.name] = self._runner(enabled)
        if runner.driver is not None:
            await self._start_driver(runner)
        if runner.driver is None:
            return
        if self.events is not None:
            self.events.subscribe(runner.name, runner.driver.udev_matches(), ())
        await self._scan(runner)
        runner.task = asyncio.create_task(self._rescan_loop(runner), name=f"rescan-{runner.name}")

    async def _stop_driver(self, runner: DriverRunner) -> None:
        if runner.task is not None:
            runner.task.cancel()
            await asyncio.gather(runner.task, return_exceptions=True)
            runner.task = None
        driver = runner.driver
        if driver is None:
            return

        def stop() -> None:
            if not runner.lock.acquire(timeout=STOP_WAIT_S):
                log.warning("driver %s: a scan is still running after %.1f s; not stopping it", runner.name, STOP_WAIT_S)
                return
            try:
                driver.stop()
            finally:
                runner.lock.release()

        try:
            await asyncio.to_thread(stop)
        except Exception as err:  # noqa: BLE001 - a driver's stop must not block the others'
            log.warning("driver %s: stop failed: %s", runner.name, err)

    # --- asking for scans -------------------------------------------------------

    def request_rescan(self, driver: str, changed: Collection[str] | None = None) -> None:
        """Asks for a scan of one driver soon; requests made while one runs fold into one."""
        runner = self.runners.get(driver)
        if runner is None or runner.driver is None:
            return
        if changed is None or runner.changed is None:
            runner.changed = None
        else:
            runner.changed.update(changed)
        runner.wanted.set()

    def _on_event(self, driver: str, changed: Collection[str] | None) -> None:
        metrics.EVENTS.labels(driver).inc()
        self.request_rescan(driver, changed)

    def resync_all(self, reason: str) -> None:
        """An event source lost events (overflow, a failed socket): every driver reads everything."""
        metrics.RESYNCS.labels("lost events").inc()
        log.info("resyncing every driver: %s", reason)
        for runner in self.started:
            self.request_rescan(runner.name)

    def _runner(self, enabled: EnabledDriver) -> DriverRunner:
        runner = DriverRunner(name=enabled.name, enabled=enabled)
        options = enabled.options
        context = HostContext(
            sysfs_root=Path(options.sysfs_root) if options.sysfs_root else self.config.sysfs_root,
            dev_root=Path(options.dev_root) if options.dev_root else self.config.dev_root,
            proc_root=Path(options.proc_root) if options.proc_root else self.config.proc_root,
            rescan=lambda: self._rescan_threadsafe(enabled.name),
            log=logging.getLogger(f"nodedev.drivers.{enabled.name}"),
        )
        try:
            runner.driver = enabled.cls(enabled.options, context)
        except Exception as err:  # noqa: BLE001 - reported, and the other drivers go on
            runner.error = f"cannot build driver: {err}"
            log.error("driver %s: %s", enabled.name, runner.error)
        return runner

    def _rescan_threadsafe(self, driver: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.request_rescan, driver)
            except RuntimeError:  # the loop closed between the check and the call
                pass

    async def _start_driver(self, runner: DriverRunner) -> None:
        assert runner.driver is not None
        try:
            await asyncio.to_thread(runner.driver.start)
        except Exception as err:  # noqa: BLE001 - DriverError or a bug: either way this driver stays off
            runner.error = str(err) if isinstance(err, DriverError) else f"{type(err).__name__}: {err}"
            runner.driver = None
            metrics.DRIVER_UP.labels(runner.name).set(0)
            log.error("driver %s: failed to start: %s", runner.name, runner.error)
        else:
            metrics.DRIVER_UP.labels(runner.name).set(1)
            log.info("driver %s: started", runner.name)

    def _start_events(self) -> None:
        from nodedev.hotplug import HotplugEngine  # discover never listens for events

        self.events = HotplugEngine(
            source=self.config.hotplug.source,
            on_match=self._on_event,
            on_lost=self.resync_all,
            log=logging.getLogger("nodedev.hotplug"),
            paths=self._paths,
        )
        for runner in self.started:
            assert runner.driver is not None
            self.events.subscribe(runner.name, runner.driver.udev_matches(), ())
        try:
            self.events.start(asyncio.get_running_loop())
        except OSError as err:
            log.error("kernel device events unavailable (%s); relying on the periodic resync", err)
            self.events = None
        else:
            log.debug("listening for kernel device events (source %s)", self.events.source)

    async def _rescan_loop(self, runner: DriverRunner) -> None:
        while True:
            await runner.wanted.wait()
            await self._scan(runner)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.hotplug.resync_seconds)
            metrics.RESYNCS.labels("periodic").inc()
            for runner in self.started:
                self.request_rescan(runner.name)

    # --- scanning ----------------------------------------------------------------

    async def _scan(self, runner: DriverRunner) -> None:
        driver = runner.driver
        assert driver is not None
        runner.wanted.clear()
        changed: Changed = None if runner.changed is None or runner.scans == 0 else frozenset(runner.changed)
        runner.changed = set()

        def scan() -> tuple[Snapshot, Sequence[Path]]:
            with runner.lock:
                return driver.scan(changed), driver.watch_paths()

        started = time.perf_counter()
        try:
            snapshot, paths = await asyncio.to_thread(scan)
        except Exception as err:  # noqa: BLE001 - keep the last good snapshot and say why
            metrics.SCAN_SECONDS.labels(runner.name).observe(time.perf_counter() - started)
            metrics.SCANS.labels(runner.name, "failed").inc()
            log.error("driver %s: scan failed, keeping the previous device list: %s", runner.name, err)
            runner.changed = None  # what this scan was told is not read yet
            return
        if runner.driver is not driver:  # stopped by a reload while it scanned
            return
        runner.scans += 1
        metrics.SCAN_SECONDS.labels(runner.name).observe(time.perf_counter() - started)
        metrics.SCANS.labels(runner.name, "ok").inc()
        log.debug("driver %s: scan %d done (%s)", runner.name, runner.scans, "full" if changed is None else f"{len(changed)} named")
        if self.events is not None:
            self.events.subscribe(runner.name, driver.udev_matches(), paths)
        checked = self._checked(runner.name, snapshot)
        served = {res for res, owner in self.owners.items() if owner == runner.name}
        settled = await self.in_use.settle(runner.name, runner.devices, checked, served)
        if runner.driver is driver:  # not stopped by a reload while the kubelet was asked
            self._apply(runner, settled)

    def _checked(self, driver: str, snapshot: Snapshot) -> dict[str, dict[str, Device]]:
        """Drops what the kubelet would refuse, saying which device of which resource and why."""
        result: dict[str, dict[str, Device]] = {}
        for resource, devices in snapshot.items():
            owner = self.owners.setdefault(resource, driver)
            if owner != driver:
                log.error("driver %s: resource %s is already served by driver %s; ignored", driver, resource, owner)
                continue
            if problem := resource_name_problem(resource):
                log.error("driver %s: %s; ignored", driver, problem)
                continue
            checked: dict[str, Device] = {}
            for device in devices:
                if not device.id or len(device.id) > MAX_DEVICE_ID_LENGTH:
                    log.error("driver %s: %s: device ID %r must be 1 to 63 characters; ignored", driver, resource, device.id[:80])
                elif device.id in checked:
                    log.error("driver %s: %s: device ID %r reported twice; keeping the first", driver, resource, device.id)
                else:
                    checked[device.id] = device
            result[resource] = checked
        return result

    def _apply(self, runner: DriverRunner, new: dict[str, dict[str, Device]]) -> None:
        old = runner.devices
        # A resource missing from a scan keeps being served, with no devices.
        for resource in old.keys() - new.keys():
            new[resource] = {}
        runner.devices = new
        for resource, devices in new.items():
            before = old.get(resource)
            changes = _diff(runner.name, resource, before, devices)
            if before is None:
                _log_first(resource, devices)
            elif changes:
                _log_changes(resource, changes)
            for listener in list(self._listeners):
                listener(resource, devices, changes)


def _diff(driver: str, resource: str, old: Mapping[str, Device] | None, new: Mapping[str, Device]) -> list[Change]:
    old = old or {}
    if old == new:
        return []
    # `is not` first: drivers hand back the Device of an unchanged device, and `!=` on a
    # dataclass compares every field, not identity (milliseconds over 4,096 devices).
    changes = [Change(driver, resource, a, b) for i in old.keys() | new.keys() if (a := old.get(i)) is not (b := new.get(i)) and a != b]
    changes.sort(key=lambda c: natural_key(_changed_id(c)))
    return changes


def _changed_id(change: Change) -> str:
    device = change.after or change.before
    assert device is not None
    return device.id


_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> list[int | str]:
    """Sorts kvm2 before kvm10, as people count."""
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(text)]


def _log_first(resource: str, devices: Mapping[str, Device]) -> None:
    """A resource's first list: one summary line, plus a line per kind of Unhealthy, so a
    start with 1,000 devices logs a few lines, not 1,000."""
    unhealthy = [d for d in devices.values() if not d.healthy]
    log.info("%s: %d device(s), %d Healthy", resource, len(devices), len(devices) - len(unhealthy))
    changes = [Change("", resource, None, d) for d in sorted(unhealthy, key=lambda d: natural_key(d.id))]
    _log_changes(resource, changes)


def _log_changes(resource: str, changes: Sequence[Change]) -> None:
    for level, line in describe(resource, changes):
        log.log(level, "%s", line)


MAX_KINDS = 8
"""Log lines per resource and update at most; a burst of 1,000 distinct reasons is not 1,000 lines."""


def describe(resource: str, changes: Sequence[Change]) -> list[tuple[int, str]]:
    """One line per kind of change, so 1000 shares of one node going away is one line.

    Returns (log level, text): losing devices or health is a warning, the rest info.
    """
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for change in changes:
        if change.after is None:
            assert change.before is not None
            groups[("removed", "")].append(change.before.id)
        else:
            verb = "added" if change.before is None else "now"
            groups[(f"{verb} {change.after.health.value}", change.after.reason)].append(change.after.id)
    lines = []
    if len(groups) > MAX_KINDS:  # many distinct reasons: the first few, then a count
        rest = list(groups.items())[MAX_KINDS - 1 :]
        groups = dict(list(groups.items())[: MAX_KINDS - 1])
        others = sum(len(ids) for _, ids in rest)
        lines.append((logging.INFO, f"{resource}: {others} more device change(s) of {len(rest)} other kinds (nodedev discover shows each)"))
    for (what, reason), ids in groups.items():
        shown = ", ".join(ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")
        level = logging.WARNING if "Unhealthy" in what or what == "removed" else logging.INFO
        lines.append((level, f"{resource}: {len(ids)} device(s) {what}: {shown}" + (f" ({reason})" if reason else "")))
    return lines
