"""`nodedev serve` as an adversary meets it: kubelet restarts at every spacing, a second
daemon, plugin directories that cannot be used, sockets that cannot be bound, huge
requests in flight at SIGTERM. Each failure is one line and the right exit code; what
can be served stays served."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodedev import config as config_module
from nodedev.api import deviceplugin_pb2 as pb
from nodedev.daemon import Daemon
from tests.conftest import nodedev_command
from tests.devtree import dev_tree
from tests.kubelet import KubeletDouble

TUN = "devices.kubevirt.io/tun"
VHOST = "devices.kubevirt.io/vhost-net"
BOTH = {TUN, VHOST}


def two_drivers(dev: Path, shares: int = 2) -> dict[str, Any]:
    return {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": shares}, "vhost-net": {"enabled": True, "shares": shares}}}


def run_to_exit(path: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nodedev_command("serve", "--config", str(path)), capture_output=True, text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line or line.startswith("nodedev:")]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_200_kubelet_restarts_at_varied_spacing_never_register_a_dead_socket_or_twice(
    kubelet: KubeletDouble, nodedev, tmp_path: Path
) -> None:
    nodedev(two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net")))
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="first registration")

    spacings = itertools.cycle([0.0, 0.002, 0.02, 0.05, 0.2, 0.0, 0.01, 0.1])
    for _ in range(200):
        kubelet.restart()
        time.sleep(next(spacings))  # the schedule under test, not a synchronisation
    final = kubelet.restarts
    kubelet.wait(
        lambda: {r.resource for r in kubelet.register_log if r.incarnation == final and r.accepted} == BOTH,
        timeout=10,
        what="both resources registered with the last kubelet",
    )
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="both streaming")

    dead = [r for r in kubelet.register_log if not r.socket_existed]
    assert dead == [], f"{len(dead)} Register(s) for a socket that did not exist"
    accepted = [(r.resource, r.incarnation) for r in kubelet.register_log if r.accepted]
    assert len(accepted) == len(set(accepted)), "a resource registered twice with one kubelet"
    assert kubelet.rejections == []


def test_a_new_kubelet_sock_without_a_wipe_gets_every_resource_again(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    nodedev(two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net")))
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="first registration")

    kubelet.restart(wipe=False)

    kubelet.wait(lambda: all(kubelet.registration_count(r) == 2 for r in BOTH), what="both registered with the new kubelet")
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="both streaming")


def test_a_second_daemon_on_the_same_directory_refuses_naming_the_first(
    kubelet: KubeletDouble, nodedev, tmp_path: Path, write_config
) -> None:
    first = nodedev(two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net")))
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="first daemon registered")

    result = run_to_exit(write_config(two_drivers(tmp_path / "dev")))

    assert result.returncode == 1
    line = one_error_line(result)
    assert f"already served by another nodedev (PID {first.proc.pid})" in line
    kubelet.restart()  # the wipe must not break the first daemon's lock or sockets
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="first daemon re-registered")
    assert run_to_exit(write_config(two_drivers(tmp_path / "dev"))).returncode == 1
    assert kubelet.registration_count(TUN) == 2


@pytest.mark.parametrize("shape", ["a regular file", "under a regular file", "read-only"])
def test_an_unusable_plugin_dir_is_one_line_and_exit_1(tmp_path: Path, shape: str) -> None:
    base = Path(f"/tmp/nd-{os.getpid()}-{shape.replace(' ', '-')}")
    base.mkdir()
    plugin_dir = base / "plugins"
    mounted = False
    try:
        if shape == "a regular file":
            plugin_dir.write_text("")
        elif shape == "under a regular file":
            (base / "file").write_text("")
            plugin_dir = base / "file" / "plugins"
        else:
            plugin_dir.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(plugin_dir)], check=True)
            mounted = True
        path = tmp_path / "config.yaml"
        path.write_text(f"pluginDir: {plugin_dir}\ndevRoot: {dev_tree(tmp_path / 'dev', 'net/tun')}\ndrivers: {{tun: {{enabled: true}}}}\n")

        result = run_to_exit(path)

        assert result.returncode == 1
        assert str(plugin_dir) in one_error_line(result)
        assert not list(Path("/").glob("nodedev-*.sock"))
    finally:
        if mounted:
            subprocess.run(["umount", str(plugin_dir)], check=True)
        subprocess.run(["rm", "-rf", str(base)], check=True)


def test_a_busy_or_unresolvable_metrics_address_is_one_line_and_exit_1(tmp_path: Path, write_config) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for address in (f"127.0.0.1:{port}", "no-such-host.invalid:9465"):
            result = run_to_exit(write_config({"devRoot": str(dev), "metricsAddress": address, "drivers": {"tun": {"enabled": True}}}))
            assert result.returncode == 1
            assert f"metricsAddress {address}: cannot listen" in one_error_line(result)


def test_a_socket_that_cannot_be_bound_leaves_the_others_served(kubelet: KubeletDouble, nodedev, tmp_path: Path, plugin_dir: Path) -> None:
    (plugin_dir / "nodedev-devices.kubevirt.io_tun.sock").mkdir()  # in the way, and not removable by unlink
    process = nodedev(two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net")))

    kubelet.wait(lambda: kubelet.streaming() == {VHOST}, what="vhost-net served")
    assert "devices.kubevirt.io/tun: cannot replace" in process.wait_log("cannot replace")
    assert process.proc.poll() is None


def test_a_daemon_that_can_serve_nothing_exits_1(tmp_path: Path, write_config, plugin_dir: Path) -> None:
    for name in ("tun", "vhost-net"):
        (plugin_dir / f"nodedev-devices.kubevirt.io_{name}.sock").mkdir()

    result = run_to_exit(write_config(two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net"))))

    assert result.returncode == 1
    assert "none of the 2 resource(s) can be served" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_huge_id_is_refused_with_a_short_message_and_a_short_log_line(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    process = nodedev(two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net")))
    kubelet.wait(lambda: TUN in kubelet.streaming(), what="tun streaming")

    with pytest.raises(grpc.RpcError) as raised:
        kubelet.stub(TUN).Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["x" * 1_000_000])]), timeout=10)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(raised.value.details()) < 200
    assert len(process.wait_log("unknown device 'xxxx")) < 300


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_with_a_huge_request_in_flight_exits_0_within_2_s(
    kubelet: KubeletDouble, nodedev, tmp_path: Path, plugin_dir: Path, sig: signal.Signals
) -> None:
    process = nodedev(two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net"), shares=50_000))
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="both streaming")
    request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=[f"tun{i}" for i in range(50_000)])])
    future = kubelet.stub(TUN).Allocate.future(request, timeout=30)

    began = time.monotonic()
    process.proc.send_signal(sig)
    code = process.proc.wait(5)

    assert code == 0
    assert time.monotonic() - began < 2.0
    future.cancel()
    assert sorted(p.name for p in plugin_dir.iterdir()) == ["kubelet.sock"]


def test_no_list_is_sent_when_nothing_the_kubelet_sees_changed(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun", "vhost-net")
    process = nodedev(two_drivers(dev))
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="both streaming")
    sent = len(kubelet.updates(TUN))

    mark = process.line_count()
    (dev / "net" / "unrelated").write_text("x")  # a change in a watched directory: a rescan, same devices
    process.wait_log("driver tun: scan", after=mark)

    assert len(kubelet.updates(TUN)) == sent


def test_the_backstop_check_serves_again_when_the_watch_missed_a_wipe(kubelet: KubeletDouble, tmp_path: Path, plugin_dir: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun")
    text = f"pluginDir: {plugin_dir}\ndevRoot: {dev}\ndrivers: {{tun: {{enabled: true, shares: 1}}}}\n"
    cfg = config_module.parse(text, tmp_path / "config.yaml")

    async def body() -> int:
        daemon = Daemon(cfg)
        running = asyncio.create_task(daemon.run())
        await asyncio.to_thread(kubelet.wait, lambda: TUN in kubelet.streaming(), 10, "tun streaming")
        daemon.plugin_dir_watch.cancel()  # the watch is lost: a wipe goes unnoticed
        await asyncio.to_thread(kubelet.restart)
        assert kubelet.registration_count(TUN) == 1
        daemon.backstop_check()
        await asyncio.to_thread(kubelet.wait, lambda: kubelet.registration_count(TUN) == 2, 10, "re-registered by the backstop")
        await asyncio.to_thread(kubelet.wait, lambda: TUN in kubelet.streaming(), 10, "tun streaming again")
        os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own handler, as in production
        return await running

    assert asyncio.run(body()) == 0
