"""`nodedev status`: the running daemon's own account, asked over its unix socket."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

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
