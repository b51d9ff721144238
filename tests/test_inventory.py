"""The inventory with stand-in drivers: start failures, coalescing, checks on what drivers report."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest

from nodedev.config import Config, EnabledDriver, HotplugSettings
from nodedev.driver import Device, Driver, DriverError, DriverOptions, Health, Snapshot
from nodedev.inventory import Change, Inventory

progress = threading.Condition()
"""Notified on every scan (a worker thread) and every listener call (the loop)."""


class ScriptedDriver(Driver[DriverOptions]):
    """Reports whatever the test puts in `snapshot`; counts its scans and what each was told."""

    name = "scripted"
    snapshot: Snapshot = {}
    fail_start: str | None = None

    def __init__(self, options: DriverOptions, host) -> None:
        super().__init__(options, host)
        self.scans = 0
        self.told: list[frozenset[str] | None] = []
        self.scanning = False
        self.overlaps = 0
        self.gate = threading.Event()
        self.gate.set()

    def start(self) -> None:
        if self.fail_start:
            raise DriverError(self.fail_start)

    def scan(self, changed: Collection[str] | None = None) -> Snapshot:
        with progress:
            self.scanning = True
            progress.notify_all()
        try:
            self.gate.wait(5)
            with progress:
                self.scans += 1
                self.told.append(None if changed is None else frozenset(changed))
                progress.notify_all()
            if isinstance(self.snapshot, Exception):
                raise self.snapshot
            return self.snapshot
        finally:
            self.scanning = False

    def stop(self) -> None:
        if self.scanning:
            self.overlaps += 1


class _NotifyOnRecord(logging.Handler):
    """Wakes `until` when something is logged, so a test can wait for a log line."""

    def emit(self, record: logging.LogRecord) -> None:
        with progress:
            progress.notify_all()


def driver_class(name: str, **attrs) -> type[ScriptedDriver]:
    return type(f"Driver_{name}", (ScriptedDriver,), {"name": name, **attrs})


def config(*classes: type[ScriptedDriver], resync: float = 0) -> Config:
    enabled = tuple(EnabledDriver(c.name, c, DriverOptions(enabled=True)) for c in classes)
    return Config(
        path=Path("test.yaml"),
        plugin_dir=Path("/nonexistent"),
        sysfs_root=Path("/sys"),
        dev_root=Path("/dev"),
        proc_root=Path("/proc"),
        hotplug=HotplugSettings(resync_seconds=resync),
        metrics_address="",
        drivers=enabled,
    )


def dev(device_id: str, health: Health = Health.HEALTHY, reason: str = "") -> Device:
    return Device(device_id, health, reason)


async def started(*classes: type[ScriptedDriver], resync: float = 0) -> tuple[Inventory, list[tuple[str, list[Change]]]]:
    inventory = Inventory(config(*classes, resync=resync))
    seen: list[tuple[str, list[Change]]] = []

    def listener(resource: str, devices: object, changes: Sequence[Change]) -> None:
        with progress:
            seen.append((resource, list(changes)))
            progress.notify_all()

    inventory.add_listener(listener)
    await inventory.start(hotplug=False)
    return inventory, seen


async def until(predicate, timeout: float = 5.0) -> None:
    """Waits, off the loop so the inventory keeps running, until a scan or listener call makes it true."""

    def wait() -> None:
        with progress:
            if not progress.wait_for(predicate, timeout):
                raise AssertionError(f"not reached within {timeout} s")

    await asyncio.to_thread(wait)


def test_a_driver_that_fails_to_start_leaves_the_others_running(caplog: pytest.LogCaptureFixture) -> None:
    broken = driver_class("broken", fail_start="libfoo.so.1 not found")
    fine = driver_class("fine", snapshot={"example.com/fine": [dev("a")]})

    async def run() -> Inventory:
        inventory, _ = await started(broken, fine)
        await inventory.stop()
        return inventory

    with caplog.at_level(logging.ERROR):
        inventory = asyncio.run(run())

    assert inventory.runners["broken"].driver is None
    assert inventory.runners["broken"].error == "libfoo.so.1 not found"
    assert "driver broken: failed to start: libfoo.so.1 not found" in caplog.text
    assert list(inventory.runners["fine"].devices["example.com/fine"]) == ["a"]


def test_a_burst_of_rescan_requests_folds_into_few_scans() -> None:
    cls = driver_class("bursty", snapshot={"example.com/x": [dev("a")]})

    async def run() -> int:
        inventory, _ = await started(cls)
        driver = inventory.runners["bursty"].driver
        assert isinstance(driver, ScriptedDriver)
        driver.gate.clear()  # hold the first rescan while the burst arrives
        for _ in range(256):
            inventory.request_rescan("bursty")
        await asyncio.sleep(0)  # let the rescan loop take the first request
        for _ in range(256):
            inventory.request_rescan("bursty")
        driver.gate.set()
        await until(lambda: not inventory.runners["bursty"].wanted.is_set() and driver.scans >= 2)
        await inventory.stop()
        return driver.scans

    scans = asyncio.run(run())
    assert 2 <= scans <= 3  # the first scan at start, then one or two for 512 requests


def test_what_the_kubelet_would_refuse_is_dropped_and_named(caplog: pytest.LogCaptureFixture) -> None:
    first = driver_class("first", snapshot={"example.com/shared": [dev("a")]})
    second = driver_class(
        "second",
        snapshot={
            "example.com/shared": [dev("b")],
            "example.com/own": [dev("x" * 64), dev("ok"), dev("ok", Health.UNHEALTHY)],
            "kubernetes.io/own": [dev("z")],
        },
    )

    async def run() -> Inventory:
        inventory, _ = await started(first, second)
        await inventory.stop()
        return inventory

    with caplog.at_level(logging.ERROR):
        inventory = asyncio.run(run())

    assert set(inventory.runners["second"].devices) == {"example.com/own"}
    assert list(inventory.runners["second"].devices["example.com/own"].values()) == [dev("ok")]
    assert "resource example.com/shared is already served by driver first; ignored" in caplog.text
    assert f"device ID '{'x' * 64}' must be 1 to 63 characters" in caplog.text
    assert "device ID 'ok' reported twice; keeping the first" in caplog.text
    assert "reserved kubernetes.io domain" in caplog.text


def test_a_failed_scan_keeps_the_last_list_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    cls = driver_class("flaky", snapshot={"example.com/x": [dev("a")]})

    async def run() -> Inventory:
        inventory, _ = await started(cls)
        runner = inventory.runners["flaky"]
        runner.driver.snapshot = OSError(5, "Input/output error", "/sys/bus/pci/devices/0000:01:00.0/numa_node")  # type: ignore[union-attr]
        inventory.request_rescan("flaky")
        await until(lambda: "scan failed" in caplog.text)  # logged once the failed scan is handled
        await inventory.stop()
        return inventory

    with caplog.at_level(logging.ERROR):
        logging.getLogger().addHandler(notifier := _NotifyOnRecord())  # after caplog's handler
        try:
            inventory = asyncio.run(run())
        finally:
            logging.getLogger().removeHandler(notifier)

    assert list(inventory.runners["flaky"].devices["example.com/x"]) == ["a"]
    assert "scan failed, keeping the previous device list" in caplog.text
    assert "0000:01:00.0/numa_node" in caplog.text


def test_listeners_hear_each_change_and_a_driver_thread_can_ask_for_a_rescan() -> None:
    cls = driver_class("changing", snapshot={"example.com/x": [dev("a"), dev("b")]})

    async def run() -> list[tuple[str, list[Change]]]:
        inventory, seen = await started(cls)
        driver = inventory.runners["changing"].driver
        driver.snapshot = {"example.com/x": [dev("a", Health.UNHEALTHY, "XID 79"), dev("c")]}  # type: ignore[union-attr]
        threading.Thread(target=driver.host.rescan).start()  # type: ignore[union-attr]
        await until(lambda: len(seen) == 2)
        driver.snapshot = {}  # type: ignore[union-attr]
        inventory.request_rescan("changing")
        await until(lambda: len(seen) == 3)
        await inventory.stop()
        return seen

    seen = asyncio.run(run())
    seen = [entry for i, entry in enumerate(seen) if i == 0 or entry[1]]  # listeners hear every scan

    assert [c.after for c in seen[0][1]] == [dev("a"), dev("b")]
    assert [(c.before, c.after) for c in seen[1][1]] == [
        (dev("a"), dev("a", Health.UNHEALTHY, "XID 79")),
        (dev("b"), None),
        (None, dev("c")),
    ]
    assert seen[2][0] == "example.com/x"  # a resource that vanished from the scan is kept, empty
    assert [(c.before.id, c.after) for c in seen[2][1]] == [("a", None), ("c", None)]  # type: ignore[union-attr]


def test_names_asked_for_during_a_scan_fold_into_one_follow_up_scan_told_all_of_them() -> None:
    cls = driver_class("named", snapshot={"example.com/x": [dev("a")]})

    async def run() -> ScriptedDriver:
        inventory, _ = await started(cls)
        driver = inventory.runners["named"].driver
        assert isinstance(driver, ScriptedDriver)
        driver.gate.clear()
        inventory.request_rescan("named", {"eth0"})
        await until(lambda: driver.scanning)  # the scan told {eth0} is in flight, held
        inventory.request_rescan("named", {"eth1"})
        inventory.request_rescan("named", {"eth2", "eth1"})
        driver.gate.set()
        await until(lambda: driver.scans == 3)
        inventory.request_rescan("named", {"eth3"})
        inventory.request_rescan("named")  # everything: absorbs the names
        await until(lambda: driver.scans == 4)
        await inventory.stop()
        return driver

    driver = asyncio.run(run())
    assert driver.told == [None, frozenset({"eth0"}), frozenset({"eth1", "eth2"}), None]


def test_an_idle_driver_is_scanned_at_once_not_after_a_spacing() -> None:
    cls = driver_class("prompt", snapshot={"example.com/x": [dev("a")]})

    async def run() -> list[float]:
        inventory, _ = await started(cls)
        driver = inventory.runners["prompt"].driver
        assert isinstance(driver, ScriptedDriver)
        took = []
        for n in range(2, 12):
            began = time.monotonic()
            inventory.request_rescan("prompt", {"x"})
            await until(lambda n=n: driver.scans == n)
            took.append(time.monotonic() - began)
        await inventory.stop()
        return took

    took = asyncio.run(run())
    assert max(took) < 0.05, took  # back-to-back requests, each scanned as it comes


def test_stop_never_overlaps_a_scan_still_running_in_its_thread() -> None:
    cls = driver_class("slow", snapshot={"example.com/x": [dev("a")]})

    async def run() -> ScriptedDriver:
        inventory, _ = await started(cls)
        driver = inventory.runners["slow"].driver
        assert isinstance(driver, ScriptedDriver)
        driver.gate.clear()
        inventory.request_rescan("slow")
        await until(lambda: driver.scanning)
        stopping = asyncio.create_task(inventory.stop())  # cancels the rescan task; the thread runs on
        await asyncio.sleep(0.05)  # give stop() the chance to overlap, were it allowed to
        driver.gate.set()
        await stopping
        return driver

    driver = asyncio.run(run())
    assert driver.overlaps == 0


def test_the_periodic_resync_catches_a_change_no_event_reported() -> None:
    cls = driver_class("quiet", snapshot={"example.com/x": [dev("a")]})

    async def run() -> list[tuple[str, list[Change]]]:
        inventory, seen = await started(cls, resync=1)
        driver = inventory.runners["quiet"].driver
        assert isinstance(driver, ScriptedDriver)
        driver.snapshot = {"example.com/x": [dev("a", Health.UNHEALTHY, "gone")]}  # nobody calls rescan
        await until(lambda: any(changes for _, changes in seen[1:]), timeout=3)
        await inventory.stop()
        return seen

    seen = asyncio.run(run())
    assert [c.after for _, changes in seen for c in changes][-1] == dev("a", Health.UNHEALTHY, "gone")
