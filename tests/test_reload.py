"""SIGHUP reloads the config: drivers come and go without a restart; a bad file changes nothing.

Every test asserts the state a user sees once the reload is over (the daemon logs
"config reloaded"), not a moment in the middle: sockets present, registrations
counted, and an Allocate that works.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import yaml

from nodedev.api import deviceplugin_pb2 as pb
from tests.conftest import NodedevProcess
from tests.devtree import dev_tree
from tests.kubelet import KubeletDouble

TUN = "devices.kubevirt.io/tun"
VHOST = "devices.kubevirt.io/vhost-net"
TUN_SOCKET = "nodedev-devices.kubevirt.io_tun.sock"
VHOST_SOCKET = "nodedev-devices.kubevirt.io_vhost-net.sock"


def reload(process: NodedevProcess, config: dict[str, Any]) -> str:
    """Writes the config, sends SIGHUP, and waits for the reload to finish; returns its log line."""
    path = Path(process.proc.args[process.proc.args.index("--config") + 1])
    plugin_dir = yaml.safe_load(path.read_text())["pluginDir"]
    path.write_text(yaml.safe_dump({"pluginDir": plugin_dir, **config}))
    mark = process.line_count()
    process.proc.send_signal(signal.SIGHUP)
    return process.wait_log("config reloaded from", after=mark)


def allocate(kubelet: KubeletDouble, resource: str, device_id: str) -> pb.AllocateResponse:
    request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=[device_id])])
    return kubelet.stub(resource).Allocate(request, timeout=5)


def test_changing_one_driver_keeps_its_socket_and_leaves_the_others_untouched(
    kubelet: KubeletDouble, nodedev, tmp_path: Path, plugin_dir: Path
) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun", "vhost-net")
    config = {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 2}, "vhost-net": {"enabled": True, "shares": 1}}}
    process = nodedev(config)
    kubelet.wait(lambda: kubelet.streaming() == {TUN, VHOST}, what="both streaming")
    tun_inode = (plugin_dir / TUN_SOCKET).stat().st_ino

    config["drivers"]["tun"]["shares"] = 3
    reload(process, config)

    kubelet.wait(lambda: kubelet.registration_count(TUN) == 2, what="tun registered again: its options may have changed")
    kubelet.wait(lambda: len(kubelet.devices(TUN) or {}) == 3, what="tun with 3 shares on the new stream")
    assert (plugin_dir / TUN_SOCKET).stat().st_ino == tun_inode  # the same socket, still served
    assert allocate(kubelet, TUN, "tun2").container_responses[0].devices[0].container_path == "/dev/net/tun"
    assert kubelet.registration_count(VHOST) == 1  # an unchanged driver is not disturbed
    assert kubelet.devices(VHOST) == {"vhost-net0": ("Healthy", ())}
    assert "no longer served" not in process.logs()
    assert "changed; that takes effect at the next start" not in process.logs()
    assert TUN in kubelet.streaming()


def test_removing_a_driver_ends_its_stream_socket_and_registration(kubelet: KubeletDouble, nodedev, tmp_path: Path, plugin_dir: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun", "vhost-net")
    config = {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 2}, "vhost-net": {"enabled": True, "shares": 1}}}
    process = nodedev(config)
    kubelet.wait(lambda: kubelet.streaming() == {TUN, VHOST}, what="both streaming")

    config["drivers"] = {"vhost-net": {"enabled": True, "shares": 1}}
    reload(process, config)

    kubelet.wait(lambda: TUN not in kubelet.streaming(), what="tun stream ended")
    assert not (plugin_dir / TUN_SOCKET).exists()
    assert (plugin_dir / VHOST_SOCKET).exists()
    kubelet.restart()  # a kubelet restart must not bring the removed resource back
    kubelet.wait(lambda: kubelet.streaming() == {VHOST}, what="vhost-net back after the restart")
    assert kubelet.registration_count(TUN) == 1
    assert allocate(kubelet, VHOST, "vhost-net0").container_responses[0].devices[0].container_path == "/dev/vhost-net"


def test_a_bad_file_is_refused_and_changes_nothing(kubelet: KubeletDouble, nodedev, tmp_path: Path, plugin_dir: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun")
    config = {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 2}}}
    process = nodedev(config)
    kubelet.wait(lambda: kubelet.streaming() == {TUN}, what="tun streaming")
    path = Path(process.proc.args[process.proc.args.index("--config") + 1])

    path.write_text("drivers:\n  tun: {enabled: true, shares: many}\n")
    mark = process.line_count()
    process.proc.send_signal(signal.SIGHUP)
    line = process.wait_log("config reload refused, still running the previous config", after=mark)

    assert "drivers.tun.shares" in line
    assert kubelet.registration_count(TUN) == 1
    assert allocate(kubelet, TUN, "tun1").container_responses[0].devices[0].host_path == str(dev / "net" / "tun")
    assert kubelet.devices(TUN) == {"tun0": ("Healthy", ()), "tun1": ("Healthy", ())}
    assert process.proc.poll() is None


def test_adding_a_driver_serves_and_registers_it(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun", "vhost-net")
    config: dict[str, Any] = {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 1}}}
    process = nodedev(config)
    kubelet.wait(lambda: kubelet.streaming() == {TUN}, what="tun streaming")

    config["drivers"]["vhost-net"] = {"enabled": True, "shares": 2}
    reload(process, config)

    kubelet.wait(lambda: kubelet.devices(VHOST) == {"vhost-net0": ("Healthy", ()), "vhost-net1": ("Healthy", ())}, what="vhost-net")
    assert kubelet.registration_count(TUN) == 1
    assert allocate(kubelet, VHOST, "vhost-net1").container_responses[0].devices[0].container_path == "/dev/vhost-net"
