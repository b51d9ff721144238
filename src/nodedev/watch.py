"""`nodedev watch`: every device and health change, one line each, as it happens.

By default it runs the drivers in-process with the same hotplug engine as the
daemon, so it shows reasons too. `--connect` instead reads a running daemon's
own sockets through ListAndWatch, seeing exactly what the kubelet sees.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from nodedev.config import Config
from nodedev.driver import Device, Health
from nodedev.inventory import Change, Inventory, describe


def _emit(line: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} {line}", flush=True)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def watch_in_process(cfg: Config) -> int:
    def on_change(resource: str, devices: Mapping[str, Device], changes: Sequence[Change]) -> None:
        for _, line in describe(resource, changes):
            _emit(line)
        if not devices and not changes:
            _emit(f"{resource}: no devices")

    inventory = Inventory(cfg)
    inventory.add_listener(on_change)
    await inventory.start()
    for runner in inventory.runners.values():
        if runner.driver is None:
            _emit(f"driver {runner.name}: not running: {runner.error}")
    try:
        await _until_signal()
    finally:
        await inventory.stop()
    return 0


async def watch_daemon(plugin_dir: Path) -> int:
    """Follows every nodedev socket in the plugin directory as the kubelet would."""
    import grpc

    from nodedev.api import deviceplugin_pb2 as pb
    from nodedev.api import deviceplugin_pb2_grpc as pb_grpc

    sockets = sorted(plugin_dir.glob("nodedev-*.sock"))
    if not sockets:
        print(f"nodedev: no nodedev sockets in {plugin_dir}; is `nodedev serve` running there?", file=sys.stderr)
        return 1

    async def follow(socket: Path) -> None:
        name = socket.name
        before: dict[str, Device] = {}
        async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
            try:
                async for response in pb_grpc.DevicePluginStub(channel).ListAndWatch(pb.Empty()):
                    now = {d.ID: Device(d.ID, Health(d.health), "", tuple(n.ID for n in d.topology.nodes)) for d in response.devices}
                    changes = [Change("", name, before.get(i), now.get(i)) for i in sorted(before.keys() | now.keys()) if before.get(i) != now.get(i)]
                    for _, line in describe(name, changes):
                        _emit(line)
                    before = now
            except grpc.aio.AioRpcError as err:
                _emit(f"{name}: stream ended: {err.code().name} {err.details()}")

    followers = [asyncio.create_task(follow(s)) for s in sockets]
    waiter = asyncio.create_task(_until_signal())
    await asyncio.wait([waiter, *followers], return_when=asyncio.FIRST_COMPLETED)
    for task in [waiter, *followers]:
        task.cancel()
    await asyncio.gather(waiter, *followers, return_exceptions=True)
    return 0
