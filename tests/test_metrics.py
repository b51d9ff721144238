"""Metrics an operator scrapes from a running `nodedev serve`."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import grpc
import pytest

from nodedev.api import deviceplugin_pb2 as pb
from tests.devtree import char_device, dev_tree
from tests.kubelet import KubeletDouble

TUN = "devices.kubevirt.io/tun"
VHOST = "devices.kubevirt.io/vhost-net"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_count_devices_allocations_and_registrations(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    char_device(dev / "net" / "tun")
    port = free_port()
    nodedev({"devRoot": str(dev), "metricsAddress": f"127.0.0.1:{port}", "drivers": {"tun": {"enabled": True, "shares": 3}}})
    kubelet.wait(lambda: TUN in kubelet.streaming(), what="tun streaming")
    stub = kubelet.stub(TUN)
    stub.Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["tun0"])]), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["tun9"])]), timeout=5)

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    assert f'nodedev_devices{{health="Healthy",resource="{TUN}"}} 3.0' in text
    assert f'nodedev_devices{{health="Unhealthy",resource="{TUN}"}} 0.0' in text
    assert f'nodedev_allocations_total{{resource="{TUN}",result="ok"}} 1.0' in text
    assert f'nodedev_allocations_total{{resource="{TUN}",result="refused"}} 1.0' in text
    assert f'nodedev_registrations_total{{resource="{TUN}"}} 1.0' in text
    assert 'nodedev_driver_up{driver="tun"} 1.0' in text
    assert 'nodedev_scans_total{driver="tun",result="ok"}' in text


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_a_failed_driver_is_down_and_a_removed_resource_leaves_no_series(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    import signal

    import yaml

    dev = dev_tree(tmp_path / "dev", "net/tun", "vhost-net")
    port = free_port()
    config = {
        "devRoot": str(dev),
        "metricsAddress": f"127.0.0.1:{port}",
        "drivers": {"tun": {"enabled": True, "shares": 1}, "vhost-net": {"enabled": True, "shares": 1}, "nvidia": {"enabled": True}},
    }
    process = nodedev(config, env={"LD_LIBRARY_PATH": str(tmp_path)})  # no libnvidia-ml.so.1 to be found
    kubelet.wait(lambda: kubelet.streaming() == {TUN, VHOST}, what="tun and vhost-net streaming")
    assert 'nodedev_driver_up{driver="nvidia"} 0.0' in scrape(port)
    assert f'nodedev_registrations_total{{resource="{TUN}"}} 1.0' in scrape(port)

    config["drivers"] = {"vhost-net": {"enabled": True, "shares": 1}}
    path = Path(process.proc.args[process.proc.args.index("--config") + 1])
    path.write_text(yaml.safe_dump({"pluginDir": str(kubelet.plugin_dir), **config}))
    mark = process.line_count()
    process.proc.send_signal(signal.SIGHUP)
    process.wait_log("config reloaded", after=mark)

    text = scrape(port)
    assert TUN not in text
    assert f'nodedev_devices{{health="Healthy",resource="{VHOST}"}} 1.0' in text


def test_a_bad_metrics_address_is_a_config_error(write_config) -> None:
    import subprocess

    from tests.conftest import nodedev_command

    path = write_config({"metricsAddress": "9465"})
    result = subprocess.run(nodedev_command("serve", "--config", str(path)), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "metricsAddress: expected host:port such as 0.0.0.0:9465 or :9465, got '9465'" in result.stderr
