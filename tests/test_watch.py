"""`nodedev watch`: an operator sees each change as one line, in-process or from a running daemon."""

from __future__ import annotations

from pathlib import Path

from tests.kubelet import KubeletDouble


def tun_tree(tmp_path: Path) -> Path:
    dev = tmp_path / "dev"
    (dev / "net").mkdir(parents=True)
    (dev / "net" / "tun").touch()
    return dev


def test_watch_prints_health_changes_with_reasons(nodedev, tmp_path: Path) -> None:
    dev = tun_tree(tmp_path)
    watch = nodedev({"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 3}}}, command="watch")
    watch.wait_log("devices.kubevirt.io/tun: 3 device(s) added Healthy: tun0, tun1, tun2")

    mark = watch.line_count()
    (dev / "net" / "tun").unlink()
    line = watch.wait_log("devices.kubevirt.io/tun: 3 device(s) now Unhealthy", after=mark)
    assert line.endswith(f"tun0, tun1, tun2 ({dev}/net/tun is missing)")

    mark = watch.line_count()
    (dev / "net" / "tun").touch()
    watch.wait_log("devices.kubevirt.io/tun: 3 device(s) now Healthy", after=mark)
    assert watch.stop() == 0


def test_watch_connect_follows_a_running_daemon(nodedev, kubelet: KubeletDouble, tmp_path: Path) -> None:
    dev = tun_tree(tmp_path)
    config = {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 2}}}
    nodedev(config)
    kubelet.wait(lambda: "devices.kubevirt.io/tun" in kubelet.streaming(), what="tun streaming")

    watch = nodedev(config, command="watch", args=["--connect"])
    watch.wait_log("nodedev-devices.kubevirt.io_tun.sock: 2 device(s) added Healthy: tun0, tun1")
    (dev / "net" / "tun").unlink()
    watch.wait_log("nodedev-devices.kubevirt.io_tun.sock: 2 device(s) now Unhealthy: tun0, tun1")
    assert watch.stop() == 0
