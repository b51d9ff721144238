"""Metrics an operator scrapes from a running `nodedev serve`."""

from __future__ import annotations

import platform
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


def test_process_runtime_and_build_series_and_every_result_from_the_start(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    from nodedev import __version__

    dev = dev_tree(tmp_path / "dev", "net/tun")
    port = free_port()
    process = nodedev({"devRoot": str(dev), "metricsAddress": f"127.0.0.1:{port}", "drivers": {"tun": {"enabled": True, "shares": 1}}})
    process.wait_log(f"{TUN}: registered")

    text = scrape(port)
    assert f'nodedev_build_info{{python="{platform.python_version()}",version="{__version__}"}} 1.0' in text
    for family in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "python_info", "python_gc_collections_total"):
        assert f"\n{family}" in text, family
    # Nothing allocated or failed yet, and still every series an alert would read is there, at 0.
    for result in ("ok", "refused", "failed"):
        assert f'nodedev_allocations_total{{resource="{TUN}",result="{result}"}} 0.0' in text
    assert 'nodedev_scans_total{driver="tun",result="failed"} 0.0' in text
    assert f'nodedev_allocate_duration_seconds_count{{resource="{TUN}"}} 0.0' in text
    assert f'nodedev_preferred_allocation_duration_seconds_bucket{{le="+Inf",resource="{TUN}"}} 0.0' in text
    assert 'nodedev_scan_duration_seconds_count{driver="tun"}' in text
    assert 'nodedev_events_total{driver="tun"} 0.0' in text
    assert 'nodedev_resyncs_total{reason="periodic"} 0.0' in text
    assert 'nodedev_resyncs_total{reason="lost events"} 0.0' in text
    assert "nodedev_kubelet_restarts_total 0.0" in text
    assert "_created" not in text


def test_kubelet_restarts_are_counted_once_each(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun")
    port = free_port()
    process = nodedev({"devRoot": str(dev), "metricsAddress": f"127.0.0.1:{port}", "drivers": {"tun": {"enabled": True}}})
    process.wait_log(f"{TUN}: registered")
    for restarts in (1, 2):
        mark = process.line_count()
        kubelet.restart(wipe=restarts == 1)  # a wipe and a new kubelet.sock, then a new kubelet.sock alone
        process.wait_log(f"{TUN}: registered", after=mark)
        text = scrape(port)
        assert f"nodedev_kubelet_restarts_total {restarts}.0" in text
        assert f'nodedev_registrations_total{{resource="{TUN}"}} {restarts + 1}.0' in text


def test_openmetrics_is_served_when_asked_for_without_created_series(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun")
    port = free_port()
    process = nodedev({"devRoot": str(dev), "metricsAddress": f"127.0.0.1:{port}", "drivers": {"tun": {"enabled": True}}})
    process.wait_log(f"{TUN}: registered")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=5) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode()
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    assert f'nodedev_allocations_total{{resource="{TUN}",result="failed"}} 0.0' in text
    assert "_created" not in text


def value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no series {series} in:\n{text}")


def test_latency_scan_duration_events_and_resyncs_are_observed(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun")
    port = free_port()
    config = {"devRoot": str(dev), "metricsAddress": f"127.0.0.1:{port}", "hotplug": {"resyncSeconds": 1}, "drivers": {"tun": {"enabled": True, "shares": 2}}}
    process = nodedev(config)
    process.wait_log(f"{TUN}: registered")
    stub = kubelet.stub(TUN)
    stub.Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["tun0"])]), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["nope"])]), timeout=5)
    (dev / "net" / "tun").unlink()  # a path event for the tun driver
    process.wait_log("Unhealthy")
    mark = process.line_count()
    process.wait_log("driver tun: scan", after=mark, timeout=5)  # the periodic resync's scan, at most 1 s away

    text = scrape(port)
    assert value(text, f'nodedev_allocate_duration_seconds_count{{resource="{TUN}"}}') == 2.0
    assert 0 < value(text, f'nodedev_allocate_duration_seconds_sum{{resource="{TUN}"}}') < 1
    assert value(text, 'nodedev_scan_duration_seconds_count{driver="tun"}') >= 3
    assert value(text, 'nodedev_events_total{driver="tun"}') >= 1
    assert value(text, 'nodedev_resyncs_total{reason="periodic"}') >= 1
