"""`nodedev watch`: every device and health change, one line each, as it happens.

By default it runs the drivers in-process with the same hotplug engine as the
daemon, so it shows reasons too. `--connect` instead reads a running daemon's
own sockets through ListAndWatch, seeing exactly what the kubelet sees.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nodedev.config import Config
from nodedev.driver import Device, Health
from nodedev.inventory import Change, Inventory, describe, natural_key

SOCKET_PREFIX = "nodedev-"
SOCKET_SUFFIX = ".sock"
_SOCKET_NAME = re.compile(rf"^{re.escape(SOCKET_PREFIX)}([a-z0-9.-]+)_([A-Za-z0-9_.-]+){re.escape(SOCKET_SUFFIX)}$")


def _emit(line: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} {line}", flush=True)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


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


def resource_of_socket(name: str) -> str | None:
    """`nodedev-devices.kubevirt.io_kvm.sock` -> `devices.kubevirt.io/kvm`; None for another file.

    The daemon's socket name is the resource with every character outside
    [A-Za-z0-9.-] replaced by `_` (server.socket_name), and no RPC tells a client
    the resource name, so it is derived back. That is exact for every name the
    kubelet accepts, which the host checks before serving: the domain is a DNS
    subdomain (no `_`), so the first `_` was the `/`, and the name after it may
    hold only [A-Za-z0-9_.-], which the replacement leaves alone.
    """
    match = _SOCKET_NAME.match(name)
    return f"{match[1]}/{match[2]}" if match else None


def _snapshot(response: Any) -> dict[str, Device]:
    """A ListAndWatch response as devices (no reasons: the kubelet API has none)."""
    return {
        d.ID: Device(d.ID, Health(d.health), "", tuple(n.ID for n in d.topology.nodes))
        for d in response.devices
    }


def _changes(resource: str, before: Mapping[str, Device], now: Mapping[str, Device]) -> list[Change]:
    """What differs between two lists, IDs in the order people count (kvm2 before kvm10)."""
    ids = sorted(before.keys() | now.keys(), key=natural_key)
    return [Change("", resource, before.get(i), now.get(i)) for i in ids if before.get(i) != now.get(i)]


async def watch_daemon(plugin_dir: Path) -> int:
    """Follows every nodedev socket in the plugin directory as the kubelet would."""
    import grpc

    from nodedev.api import deviceplugin_pb2 as pb
    from nodedev.api import deviceplugin_pb2_grpc as pb_grpc

    sockets = sorted(plugin_dir.glob(f"{SOCKET_PREFIX}*{SOCKET_SUFFIX}"))
    if not sockets:
        print(f"nodedev: no nodedev sockets in {plugin_dir}; is `nodedev serve` running there?", file=sys.stderr)
        return 1

    stub_for: Any = pb_grpc.DevicePluginStub  # generated without type hints, typed or not by the build

    async def follow(socket: Path) -> None:
        resource = resource_of_socket(socket.name) or socket.name
        before: dict[str, Device] = {}
        async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
            try:
                async for response in stub_for(channel).ListAndWatch(pb.Empty()):
                    now = _snapshot(response)
                    for _, line in describe(resource, _changes(resource, before, now)):
                        _emit(line)
                    before = now
            except grpc.aio.AioRpcError as err:
                _emit(f"{resource}: stream ended: {err.code().name} {err.details()}")

    followers = [asyncio.create_task(follow(s)) for s in sockets]
    waiter = asyncio.create_task(_until_signal())
    await asyncio.wait([waiter, *followers], return_when=asyncio.FIRST_COMPLETED)
    for task in [waiter, *followers]:
        task.cancel()
    await asyncio.gather(waiter, *followers, return_exceptions=True)
    return 0
