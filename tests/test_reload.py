"""SIGHUP reloads the config: drivers come and go without a restart; a bad file changes nothing."""

from __future__ import annotations

import signal
from pathlib import Path

import yaml

from tests.kubelet import KubeletDouble

TUN = "devices.kubevirt.io/tun"
VHOST = "devices.kubevirt.io/vhost-net"


def test_sighup_applies_driver_changes_and_refuses_a_bad_file(kubelet: KubeletDouble, nodedev, tmp_path: Path, plugin_dir: Path) -> None:
    dev = tmp_path / "dev"
    (dev / "net").mkdir(parents=True)
    (dev / "net" / "tun").touch()
    (dev / "vhost-net").touch()
    config = {"pluginDir": str(plugin_dir), "devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 2}}}
    process = nodedev(config)
    kubelet.wait(lambda: kubelet.devices(TUN) == {"tun0": ("Healthy", ()), "tun1": ("Healthy", ())}, what="tun with 2 shares")
    config_path = Path(process.proc.args[process.proc.args.index("--config") + 1])

    config["drivers"] = {"tun": {"enabled": True, "shares": 3}, "vhost-net": {"enabled": True, "shares": 1}}
    config_path.write_text(yaml.safe_dump(config))
    process.proc.send_signal(signal.SIGHUP)
    kubelet.wait(lambda: kubelet.devices(TUN) is not None and len(kubelet.devices(TUN)) == 3, what="tun with 3 shares")
    kubelet.wait(lambda: kubelet.devices(VHOST) == {"vhost-net0": ("Healthy", ())}, what="vhost-net added")

    config_path.write_text("drivers:\n  tun: {enabled: true, shares: many}\n")
    mark = process.line_count()
    process.proc.send_signal(signal.SIGHUP)
    process.wait_log("config reload refused, still running the previous config", after=mark)
    assert "drivers.tun.shares" in process.wait_log("config reload refused", after=mark)

    config["drivers"] = {"vhost-net": {"enabled": True, "shares": 1}}
    config_path.write_text(yaml.safe_dump(config))
    process.proc.send_signal(signal.SIGHUP)
    kubelet.wait(lambda: TUN not in kubelet.streaming(), what="tun no longer served")
    assert kubelet.devices(VHOST) == {"vhost-net0": ("Healthy", ())}
    assert not (plugin_dir / "nodedev-devices.kubevirt.io_tun.sock").exists()
    assert process.stop() == 0
