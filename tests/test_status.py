"""`nodedev status`: the running daemon's own account, asked over its unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nodedev import status as status_module
from nodedev.status import StatusError, StatusServer, fetch, subscribe
from tests.conftest import nodedev_command
from tests.devtree import dev_tree
from tests.kubelet import KubeletDouble

TUN = "devices.kubevirt.io/tun"
VHOST = "devices.kubevirt.io/vhost-net"


def status(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nodedev_command("status", "--config", str(config), *args), capture_output=True, text=True, timeout=30)


def config_path(process) -> Path:
    return Path(process.proc.args[process.proc.args.index("--config") + 1])


def test_status_shows_resources_devices_registration_restarts_and_failed_drivers(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun", "vhost-net")
    config = {
        "devRoot": str(dev),
        "drivers": {"tun": {"enabled": True, "shares": 2}, "vhost-net": {"enabled": True, "shares": 1}, "nvidia": {"enabled": True}},
    }
    process = nodedev(config, env={"LD_LIBRARY_PATH": str(tmp_path)})  # no libnvidia-ml.so.1: the nvidia driver fails
    process.wait_log(f"{TUN}: registered")
    process.wait_log(f"{VHOST}: registered")
    mark = process.line_count()
    kubelet.restart()
    process.wait_log(f"{TUN}: registered", after=mark)
    process.wait_log(f"{VHOST}: registered", after=mark)
    (dev / "vhost-net").unlink()
    process.wait_log("Unhealthy", after=mark)

    socket = kubelet.plugin_dir / "nodedev" / "status.sock"
    assert stat.S_IMODE(socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700

    result = status(config_path(process), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["pid"] == process.proc.pid and report["phase"] == "running"
    assert report["registration"]["mode"] == "kubelet"
    assert report["kubeletRestarts"] == 1
    assert {d["name"]: d["started"] for d in report["drivers"]} == {"tun": True, "vhost-net": True, "nvidia": False}
    (nvidia,) = [d for d in report["drivers"] if d["name"] == "nvidia"]
    assert "libnvidia-ml" in nvidia["error"]
    resources = {r["name"]: r for r in report["resources"]}
    assert resources[TUN]["registered"] and resources[TUN]["served"] and resources[TUN]["driver"] == "tun"
    assert [(d["id"], d["health"]) for d in resources[TUN]["devices"]] == [("tun0", "Healthy"), ("tun1", "Healthy")]
    (vhost,) = resources[VHOST]["devices"]
    assert vhost["health"] == "Unhealthy" and vhost["reason"]

    table = status(config_path(process))
    assert table.returncode == 0, table.stderr
    assert f"PID {process.proc.pid}, running" in table.stdout
    assert "registration: kubelet mode; kubelet restarts seen: 1" in table.stdout
    lines = {line.split()[0]: line for line in table.stdout.splitlines() if line.startswith("  devices.")}
    assert lines[TUN].endswith("tun: registered; 2 device(s), 2 Healthy")
    assert lines[VHOST].endswith("vhost-net: registered; 1 device(s), 0 Healthy")
    assert "driver nvidia FAILED: " in table.stdout
    assert "Unhealthy" in table.stdout and "tun0..tun1" not in table.stdout  # two IDs are listed, not folded

    assert process.stop() == 0
    assert not socket.parent.exists()  # the directory it made goes with it


def test_status_without_a_daemon_is_one_line_and_exit_1(write_config) -> None:
    result = status(write_config({}))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "nodedev: status: " in result.stderr
    assert "status.sock: no such socket; is `nodedev serve` running with this config?" in result.stderr


def test_a_status_socket_another_daemon_answers_on_is_refused(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun")
    shared = f"/tmp/nd-status-{os.getpid()}.sock"
    first = nodedev({"devRoot": str(dev), "statusSocket": shared, "drivers": {"tun": {"enabled": True}}})
    first.wait_log(f"{TUN}: registered")
    other_dir = Path(f"/tmp/nd-other-{os.getpid()}")
    path = tmp_path / "second.yaml"
    path.write_text(json.dumps({"pluginDir": str(other_dir), "devRoot": str(dev), "statusSocket": shared, "drivers": {"tun": {"enabled": True}}}))
    try:
        second = subprocess.run(nodedev_command("serve", "--config", str(path)), capture_output=True, text=True, timeout=30)
    finally:
        subprocess.run(["rm", "-rf", str(other_dir)], check=True)
    assert second.returncode == 1
    assert f"statusSocket {shared}: another nodedev answers on it" in second.stderr
    assert json.loads(status(config_path(first), "--json").stdout)["pid"] == first.proc.pid  # the first still answers
    assert first.stop() == 0
    assert not Path(shared).exists()


def test_status_socket_must_be_an_absolute_path(write_config) -> None:
    result = status(write_config({"statusSocket": "status.sock"}))
    assert result.returncode == 2
    assert "statusSocket: must be an absolute path" in result.stderr


# -- the protocol: `status` and `watch` requests, against the server alone ------------------------


class State:
    """What the stand-in daemon reports; a test changes it."""

    def __init__(self) -> None:
        self.devices = ["d0"]
        self.reports = 0

    def __call__(self) -> dict[str, Any]:
        self.reports += 1
        return {"resources": [{"name": "a.io/x", "devices": [{"id": i, "health": "Healthy"} for i in self.devices]}], "drivers": []}


async def _serving(path: Path, state: State, recheck_s: float) -> StatusServer:
    server = StatusServer(path, state)
    server.recheck_s = recheck_s
    await server.start()
    return server


def _ids(report: dict[str, Any]) -> list[str]:
    return [d["id"] for d in report["resources"][0]["devices"]]


def test_a_watch_stream_sends_a_report_when_notified_and_only_when_it_changed(plugin_dir: Path) -> None:
    path = plugin_dir / "s.sock"

    async def run() -> None:
        state = State()
        server = await _serving(path, state, recheck_s=3600)  # only notify() can wake the stream
        stream = subscribe(path)
        try:
            assert _ids(await asyncio.wait_for(anext(stream), 5)) == ["d0"]
            server.notify()  # nothing changed: nothing is sent
            state.devices = ["d0", "d1"]
            server.notify()
            assert _ids(await asyncio.wait_for(anext(stream), 5)) == ["d0", "d1"]
            state.devices = ["d1"]
            server.notify()
            assert _ids(await asyncio.wait_for(anext(stream), 5)) == ["d1"]
        finally:
            await stream.aclose()
            await server.close()

    asyncio.run(run())


def test_a_watch_stream_sees_a_change_nobody_notified(plugin_dir: Path) -> None:
    path = plugin_dir / "s.sock"

    async def run() -> None:
        state = State()
        server = await _serving(path, state, recheck_s=0.05)
        stream = subscribe(path)
        try:
            await asyncio.wait_for(anext(stream), 5)
            state.devices = []
            assert _ids(await asyncio.wait_for(anext(stream), 5)) == []
        finally:
            await stream.aclose()
            await server.close()

    asyncio.run(run())


def test_closing_the_server_ends_watch_streams_and_a_leaving_client_ends_its_own(plugin_dir: Path) -> None:
    path = plugin_dir / "s.sock"

    async def run() -> None:
        state = State()
        server = await _serving(path, state, recheck_s=3600)
        leaving = subscribe(path)
        await asyncio.wait_for(anext(leaving), 5)
        await leaving.aclose()
        stream = subscribe(path)
        await asyncio.wait_for(anext(stream), 5)
        state.devices = ["d9"]
        server.notify()  # the client that left is not written to; the other one is
        assert _ids(await asyncio.wait_for(anext(stream), 5)) == ["d9"]
        await asyncio.wait_for(server.close(), 5)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), 5)
        assert not path.exists()

    asyncio.run(run())


def test_status_requests_silent_clients_and_unknown_requests(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = plugin_dir / "s.sock"
    monkeypatch.setattr(status_module, "REQUEST_TIMEOUT_S", 0.1)

    async def ask(request: bytes | None) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(path))
        if request is not None:
            writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return json.loads(answer)

    async def run() -> None:
        server = await _serving(path, State(), recheck_s=3600)
        try:
            assert _ids(await asyncio.to_thread(fetch, path)) == ["d0"]
            assert _ids(await ask(None)) == ["d0"]  # sends nothing: the status after a moment
            assert "unknown request 'stats'" in (await ask(b"stats\n"))["error"]
        finally:
            await server.close()

    asyncio.run(run())


def test_subscribe_says_in_one_line_when_the_daemon_cannot_stream(plugin_dir: Path) -> None:
    path = plugin_dir / "s.sock"

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b'{"error": "unknown request \'watch\'; send status"}\n')
        await writer.drain()
        writer.close()

    async def run() -> None:
        server = await asyncio.start_unix_server(refuse, path=str(path))
        try:
            with pytest.raises(StatusError, match="the daemon cannot stream: unknown request 'watch'"):
                await anext(subscribe(path))
            with pytest.raises(StatusError, match="no such socket"):
                await anext(subscribe(plugin_dir / "none.sock"))
        finally:
            server.close()

    asyncio.run(run())
