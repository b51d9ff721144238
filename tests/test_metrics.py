"""Metrics an operator scrapes from a running `nodedev serve`."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import grpc
import pytest

from nodedev.api import deviceplugin_pb2 as pb
from tests.kubelet import KubeletDouble

TUN = "devices.kubevirt.io/tun"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_count_devices_allocations_and_registrations(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    (dev / "net").mkdir(parents=True)
    (dev / "net" / "tun").touch()
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


def test_a_bad_metrics_address_is_a_config_error(write_config) -> None:
    import subprocess

    from tests.conftest import nodedev_command

    path = write_config({"metricsAddress": "9465"})
    result = subprocess.run(nodedev_command("serve", "--config", str(path)), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "metricsAddress: expected host:port such as 0.0.0.0:9465 or :9465, got '9465'" in result.stderr
