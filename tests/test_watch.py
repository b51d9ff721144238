"""`nodedev watch`: an operator sees each change as one line, in-process or from a running daemon."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from nodedev import config, watch
from nodedev.driver import Device, Health
from nodedev.inventory import Change, Listener
from nodedev.server import socket_name
from tests.devtree import char_device, dev_tree
from tests.kubelet import KubeletDouble

Call = tuple[str, dict[str, Device], list[Change]]
"""One listener call: resource, all its devices now, what changed."""


def tun_tree(tmp_path: Path) -> Path:
    return dev_tree(tmp_path / "dev", "net/tun")


def test_watch_prints_health_changes_with_reasons(nodedev, tmp_path: Path) -> None:
    dev = tun_tree(tmp_path)
    watch = nodedev({"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 3}}}, command="watch")
    watch.wait_log("devices.kubevirt.io/tun: 3 device(s) added Healthy: tun0, tun1, tun2")

    mark = watch.line_count()
    (dev / "net" / "tun").unlink()
    line = watch.wait_log("devices.kubevirt.io/tun: 3 device(s) now Unhealthy", after=mark)
    assert line.endswith(f"tun0, tun1, tun2 ({dev}/net/tun is missing)")

    mark = watch.line_count()
    char_device(dev / "net" / "tun")
    watch.wait_log("devices.kubevirt.io/tun: 3 device(s) now Healthy", after=mark)
    assert watch.stop() == 0


def test_watch_connect_names_resources_and_counts_ids_as_people_do(nodedev, kubelet: KubeletDouble, tmp_path: Path) -> None:
    """Lines name the resource, not its socket file, and list tun2 before tun10."""
    dev = tun_tree(tmp_path)
    config = {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 12}}}
    nodedev(config)
    kubelet.wait(lambda: "devices.kubevirt.io/tun" in kubelet.streaming(), what="tun streaming")

    watch = nodedev(config, command="watch", args=["--connect"])
    watch.wait_log("devices.kubevirt.io/tun: 12 device(s) added Healthy: tun0, tun1, tun2, tun3 and 8 more")
    (dev / "net" / "tun").unlink()
    watch.wait_log("devices.kubevirt.io/tun: 12 device(s) now Unhealthy: tun0, tun1, tun2, tun3 and 8 more")
    assert "nodedev-" not in watch.logs()
    assert watch.stop() == 0


@pytest.mark.parametrize(
    "resource",
    [
        "devices.kubevirt.io/kvm",
        "devices.kubevirt.io/vhost-net",
        "nvidia.com/mig-1g.10gb",
        "nvidia.com/gpu.shared",
        "nodedev.io/fast_nics",
        "a.io/x_y",
    ],
)
def test_a_socket_name_maps_back_to_its_resource(resource: str) -> None:
    assert watch.resource_of_socket(socket_name(resource)) == resource


@pytest.mark.parametrize("name", ["kubelet.sock", "nodedev-nodomain.sock", "nodedev-a.io_x.sock.tmp", "other-a.io_x.sock"])
def test_a_file_that_is_not_a_nodedev_socket_has_no_resource(name: str) -> None:
    assert watch.resource_of_socket(name) is None


class _ScanningInventory:
    """Stands in for the inventory: calls listeners as if after every scan, changed or not."""

    calls: list[Call] = []

    def __init__(self, cfg: config.Config) -> None:
        self.runners: dict[str, object] = {}
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        for resource, devices, changes in self.calls:
            for listener in self._listeners:
                listener(resource, devices, changes)

    async def stop(self) -> None:
        pass


def _added(resource: str, *ids: str) -> Call:
    devices = {i: Device(i, Health.HEALTHY) for i in ids}
    return resource, devices, [Change("d", resource, None, d) for d in devices.values()]


def _removed(resource: str, *ids: str) -> Call:
    return resource, {}, [Change("d", resource, Device(i, Health.HEALTHY), None) for i in ids]


def _quiet(resource: str, devices: Mapping[str, Device] | None = None) -> Call:
    return resource, dict(devices or {}), []


def _watch_lines(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], calls: Sequence[Call]) -> list[str]:
    """Runs the real in-process watch over the stand-in inventory; its stdout lines, without time stamps."""

    async def no_wait() -> None:
        return None

    monkeypatch.setattr(_ScanningInventory, "calls", list(calls))
    monkeypatch.setattr(watch, "Inventory", _ScanningInventory)
    monkeypatch.setattr(watch, "_until_signal", no_wait)
    assert asyncio.run(watch.watch_in_process(config.parse("", Path("c.yaml")))) == 0
    return [line.split(" ", 1)[1] for line in capsys.readouterr().out.splitlines()]


def test_in_process_watch_prints_nothing_for_scans_that_change_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The inventory may call listeners after every scan; an empty resource is said once, not per scan."""
    calls = [
        _quiet("a.io/empty"),
        _added("a.io/busy", "d0", "d1"),
        _quiet("a.io/empty"),
        _quiet("a.io/busy", _added("a.io/busy", "d0", "d1")[1]),
        _quiet("a.io/empty"),
    ]

    assert _watch_lines(monkeypatch, capsys, calls) == ["a.io/empty: no devices", "a.io/busy: 2 device(s) added Healthy: d0, d1"]


def test_a_resource_that_becomes_empty_is_said_once(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls = [_added("a.io/x", "d0"), _removed("a.io/x", "d0"), _quiet("a.io/x"), _quiet("a.io/x")]

    assert _watch_lines(monkeypatch, capsys, calls) == [
        "a.io/x: 1 device(s) added Healthy: d0",
        "a.io/x: 1 device(s) removed: d0",
        "a.io/x: no devices",
    ]
