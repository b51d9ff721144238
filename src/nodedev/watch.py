"""`nodedev watch`: every device and health change, one line each, as it happens.

By default it runs the drivers in-process with the same hotplug engine as the
daemon, so it shows reasons too. `--connect` instead follows a running daemon
through its status socket (`nodedev status`'s, with a `watch` request): the
devices it serves, their health and reasons, as the daemon itself has them.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nodedev import status
from nodedev.config import Config
from nodedev.driver import Device, Health
from nodedev.inventory import Change, Inventory, describe, natural_key


def _emit(line: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} {line}", flush=True)


async def _until_signal() -> None:
    await _signalled().wait()


def _signalled() -> asyncio.Event:
    """Set by SIGTERM or SIGINT from now on."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


class ChangePrinter:
    """The inventory listener of `watch`: one line per kind of change, and nothing for a quiet scan.

    The inventory may call listeners after every scan, changed or not. A
    resource with no devices is said once when it is first seen empty (or
    becomes empty again), not after every scan that finds it still empty.
    """

    def __init__(self, emit: Callable[[str], None] = _emit) -> None:
        self._emit = emit
        self._empty: dict[str, bool] = {}

    def __call__(self, resource: str, devices: Mapping[str, Device], changes: Sequence[Change]) -> None:
        for _, line in describe(resource, changes):
            self._emit(line)
        was_empty = self._empty.get(resource, False)
        self._empty[resource] = not devices
        if not devices and not was_empty:
            self._emit(f"{resource}: no devices")


async def watch_in_process(cfg: Config) -> int:
    inventory = Inventory(cfg)
    inventory.add_listener(ChangePrinter())
    await inventory.start()
    for runner in inventory.runners.values():
        if runner.driver is None:
            _emit(f"driver {runner.name}: not running: {runner.error}")
    try:
        await _until_signal()
    finally:
        await inventory.stop()
    return 0


class StatusPrinter:
    """`watch --connect`: each report of the daemon's status stream, as lines of what changed.

    The first report says every resource's devices as added (with reasons: the
    status socket has them, unlike the kubelet API), later ones only what differs:
    devices added, removed, changing health or reason; a resource that appears
    empty or becomes empty (said once), or is no longer served; a driver failing.
    """

    def __init__(self, emit: Callable[[str], None] = _emit) -> None:
        self._emit = emit
        self._devices: dict[str, dict[str, Device]] = {}
        self._empty: dict[str, bool] = {}
        self._failed: dict[str, str | None] = {}

    def __call__(self, report: Mapping[str, Any]) -> None:
        for driver in report.get("drivers", []):
            error = driver.get("error")
            if error is not None and self._failed.get(driver["name"]) != error:
                self._emit(f"driver {driver['name']}: not running: {error}")
            self._failed[driver["name"]] = error
        seen: set[str] = set()
        for resource in report.get("resources", []):
            name = resource["name"]
            seen.add(name)
            now = {
                d["id"]: Device(d["id"], Health(d["health"]), d.get("reason", ""), tuple(d.get("numa", ())))
                for d in resource["devices"]
            }
            for _, line in describe(name, _changes(name, self._devices.get(name, {}), now)):
                self._emit(line)
            self._devices[name] = now
            was_empty = self._empty.get(name, False)
            self._empty[name] = not now
            if not now and not was_empty:
                self._emit(f"{name}: no devices")
        for name in sorted(self._devices.keys() - seen):
            self._emit(f"{name}: no longer served")
            del self._devices[name]
            self._empty.pop(name, None)


def _changes(resource: str, before: Mapping[str, Device], now: Mapping[str, Device]) -> list[Change]:
    """What differs between two lists, IDs in the order people count (kvm2 before kvm10)."""
    ids = sorted(before.keys() | now.keys(), key=natural_key)
    return [Change("", resource, before.get(i), now.get(i)) for i in ids if before.get(i) != now.get(i)]


async def watch_daemon(plugin_dir: Path, status_socket: str = "") -> int:
    """Follows a running daemon through its status socket (`watch` requests): one line per change."""
    path = status.socket_path(plugin_dir, status_socket)
    stop = _signalled()  # before the first line is printed: whoever reads it may signal at once
    printer = StatusPrinter()
    stream = status.subscribe(path)
    try:
        printer(await anext(stream))  # the first report, or why there is none
    except (status.StatusError, StopAsyncIteration) as err:
        print(f"nodedev: watch: {err or f'{path}: no answer'}", file=sys.stderr)
        return 1

    async def follow() -> None:
        try:
            async for report in stream:
                printer(report)
        except status.StatusError as err:
            _emit(f"status stream ended: {err}")
            return
        _emit("status stream ended: the daemon stopped")

    follower = asyncio.create_task(follow())
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, follower], return_when=asyncio.FIRST_COMPLETED)
    for task in (waiter, follower):
        task.cancel()
    await asyncio.gather(waiter, follower, return_exceptions=True)
    await stream.aclose()
    return 0
