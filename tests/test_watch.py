"""`nodedev watch`: an operator sees each change as one line, in-process or from a running daemon."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from nodedev import config, watch
from nodedev.driver import Device, Health
from nodedev.inventory import Change, Listener
from tests.conftest import nodedev_command
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
    line = watch.wait_log("devices.kubevirt.io/tun: 12 device(s) now Unhealthy: tun0, tun1, tun2, tun3 and 8 more")
    assert line.endswith(f"({dev}/net/tun is missing)")  # reasons: the status socket has them, ListAndWatch does not
    assert "nodedev-" not in watch.logs()
    assert watch.stop() == 0


def test_watch_connect_follows_the_status_socket_not_the_plugin_sockets(nodedev, kubelet: KubeletDouble, tmp_path: Path) -> None:
    """With every plugin socket gone (as a kubelet restart leaves them, before nodedev serves
    again), --connect still starts and follows: it asks the status socket only."""
    dev = tun_tree(tmp_path)
    config = {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 2}}}
    daemon = nodedev(config)
    daemon.wait_log("devices.kubevirt.io/tun: registered")
    watch = nodedev(config, command="watch", args=["--connect"])
    watch.wait_log("devices.kubevirt.io/tun: 2 device(s) added Healthy: tun0, tun1")
    for socket in kubelet.plugin_dir.glob("nodedev-*.sock"):
        socket.rename(socket.with_name(f"moved-{socket.name}"))  # the daemon serves again; watch must not care
    mark = watch.line_count()
    (dev / "net" / "tun").unlink()
    watch.wait_log("devices.kubevirt.io/tun: 2 device(s) now Unhealthy: tun0, tun1", after=mark)
    assert "stream ended" not in watch.logs()
    assert watch.stop() == 0


def test_watch_connect_says_failed_drivers_and_ends_when_the_daemon_stops(nodedev, kubelet: KubeletDouble, tmp_path: Path) -> None:
    dev = tun_tree(tmp_path)
    config = {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 1}, "nvidia": {"enabled": True}}}
    daemon = nodedev(config, env={"LD_LIBRARY_PATH": str(tmp_path)})  # no libnvidia-ml.so.1
    daemon.wait_log("devices.kubevirt.io/tun: registered")
    watch = nodedev(config, command="watch", args=["--connect"])
    assert "libnvidia-ml" in watch.wait_log("driver nvidia: not running: ")
    watch.wait_log("devices.kubevirt.io/tun: 1 device(s) added Healthy: tun0")
    assert daemon.stop() == 0
    watch.wait_log("status stream ended: the daemon stopped")
    assert watch.proc.wait(5) == 0  # it ends by itself


def test_watch_connect_without_a_daemon_is_one_line_and_exit_1(write_config) -> None:
    command = nodedev_command("watch", "--connect", "--config", str(write_config({})))
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("nodedev: watch: ")
    assert "status.sock: no such socket; is `nodedev serve` running with this config?" in result.stderr


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


def _report(resources: dict[str, list[tuple[str, str, str]]], failed: dict[str, str] | None = None) -> dict[str, object]:
    return {
        "drivers": [{"name": name, "started": False, "error": error} for name, error in (failed or {}).items()],
        "resources": [
            {"name": name, "devices": [{"id": i, "health": h, "reason": r, "numa": []} for i, h, r in devices]}
            for name, devices in resources.items()
        ],
    }


def test_status_reports_become_one_line_per_change_and_nothing_for_a_quiet_one() -> None:
    lines: list[str] = []
    printer = watch.StatusPrinter(lines.append)
    printer(_report({"a.io/x": [("d0", "Healthy", "ok")], "a.io/empty": []}, failed={"nvidia": "no libnvidia-ml.so.1"}))
    assert lines == ["driver nvidia: not running: no libnvidia-ml.so.1", "a.io/x: 1 device(s) added Healthy: d0 (ok)", "a.io/empty: no devices"]
    lines.clear()
    printer(_report({"a.io/x": [("d0", "Healthy", "ok")], "a.io/empty": []}, failed={"nvidia": "no libnvidia-ml.so.1"}))
    assert lines == []  # the same report again (registration changed, say): nothing to say
    printer(_report({"a.io/x": [("d0", "Unhealthy", "gone"), ("d1", "Healthy", "ok")]}))
    assert lines == ["a.io/x: 1 device(s) now Unhealthy: d0 (gone)", "a.io/x: 1 device(s) added Healthy: d1 (ok)", "a.io/empty: no longer served"]


def test_watch_connect_asks_the_configured_status_socket(nodedev, kubelet: KubeletDouble, tmp_path: Path) -> None:
    dev = tun_tree(tmp_path)
    config = {"devRoot": str(dev), "statusSocket": str(kubelet.plugin_dir / "elsewhere.sock"), "drivers": {"tun": {"enabled": True, "shares": 1}}}
    nodedev(config).wait_log("devices.kubevirt.io/tun: registered")
    watch = nodedev(config, command="watch", args=["--connect"])
    watch.wait_log("devices.kubevirt.io/tun: 1 device(s) added Healthy: tun0")
    assert watch.stop() == 0
