"""/healthz, /readyz and /metrics as the kubelet's probes and Prometheus meet them."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from nodedev import probes
from tests.conftest import nodedev_command
from tests.devtree import dev_tree
from tests.kubelet import KubeletDouble

TUN = "devices.kubevirt.io/tun"
VHOST = "devices.kubevirt.io/vhost-net"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def two_drivers(dev: Path, **extra: object) -> dict[str, object]:
    return {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 2}, "vhost-net": {"enabled": True, "shares": 2}}, **extra}


def test_readyz_names_what_is_missing_until_every_resource_is_registered(plugin_dir: Path, nodedev, tmp_path: Path) -> None:
    port = free_port()
    process = nodedev(two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net"), healthAddress=f"127.0.0.1:{port}"))
    process.wait_log("serving 2 resource(s)")
    process.wait_log("cannot register yet")

    status, headers, body = request(port, "/readyz")
    assert status == 503
    assert headers["Content-Type"] == "application/json"
    report = json.loads(body)
    assert report == {"ready": False, "missing": {"resources": {TUN: "not registered with the kubelet yet", VHOST: "not registered with the kubelet yet"}}}
    assert request(port, "/healthz")[:1] == (200,)

    kubelet = KubeletDouble(plugin_dir)
    kubelet.start()
    try:
        process.wait_log(f"{TUN}: registered")
        process.wait_log(f"{VHOST}: registered")
        status, _, body = request(port, "/readyz")
        assert (status, json.loads(body)) == (200, {"ready": True, "resources": sorted([TUN, VHOST])})

        mark = process.line_count()
        kubelet.restart()  # wiped and a new kubelet: ready again once both are registered anew
        process.wait_log(f"{TUN}: registered", after=mark)
        process.wait_log(f"{VHOST}: registered", after=mark)
        assert request(port, "/readyz")[0] == 200
    finally:
        kubelet.stop()


def test_a_failed_driver_keeps_readyz_503_naming_it_and_why(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    port = free_port()
    config = two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net"), healthAddress=f"127.0.0.1:{port}")
    config["drivers"]["nvidia"] = {"enabled": True}  # type: ignore[index]
    process = nodedev(config, env={"LD_LIBRARY_PATH": str(tmp_path)})  # no libnvidia-ml.so.1 to be found
    process.wait_log(f"{TUN}: registered")
    process.wait_log(f"{VHOST}: registered")

    status, _, body = request(port, "/readyz")
    report = json.loads(body)
    assert status == 503
    assert list(report["missing"]) == ["drivers"]
    assert "libnvidia-ml" in report["missing"]["drivers"]["nvidia"]
    assert request(port, "/healthz")[0] == 200  # alive, only not ready


def test_unknown_paths_are_404_head_works_and_metrics_share_or_keep_their_address(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    shared, metrics_only = free_port(), free_port()
    dev = dev_tree(tmp_path / "dev", "net/tun")
    process = nodedev(
        {
            "devRoot": str(dev),
            "healthAddress": f"127.0.0.1:{shared}",
            "metricsAddress": f"127.0.0.1:{shared}",
            "drivers": {"tun": {"enabled": True}},
        }
    )
    process.wait_log(f"{TUN}: registered")
    for path in ("/healthz", "/readyz", "/metrics"):
        status, headers, body = request(shared, path, "HEAD")
        assert (status, body) == (200, b""), path
        assert int(headers["Content-Length"]) > 0
    assert request(shared, "/readyz?verbose=1")[0] == 200
    for path in ("/", "/metricsx", "/healthz/x", "/favicon.ico"):
        status, _, body = request(shared, path)
        assert status == 404, path
        assert b"/healthz, /metrics, /readyz" in body
    assert request(shared, "/", "HEAD")[0] == 404
    assert process.stop() == 0

    process = nodedev({"devRoot": str(dev), "metricsAddress": f"127.0.0.1:{metrics_only}", "drivers": {"tun": {"enabled": True}}})
    process.wait_log(f"{TUN}: registered")
    assert request(metrics_only, "/metrics")[0] == 200
    assert request(metrics_only, "/healthz")[0] == 404  # probes only where healthAddress says
    assert request(metrics_only, "/")[0] == 404  # prometheus-client alone answers every path with the page


def test_a_busy_health_address_is_one_line_and_exit_1(write_config, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        path = write_config({"devRoot": str(dev_tree(tmp_path / "dev", "net/tun")), "healthAddress": address, "drivers": {"tun": {"enabled": True}}})
        result = subprocess.run(nodedev_command("serve", "--config", str(path)), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"healthAddress {address}: cannot listen: Address already in use" in errors[0], result.stderr


def test_health_address_is_checked_like_the_metrics_address(write_config) -> None:
    result = subprocess.run(nodedev_command("serve", "--config", str(write_config({"healthAddress": "9466"}))), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "healthAddress: expected host:port" in result.stderr


def test_a_stuck_event_loop_fails_healthz_and_readyz_within_about_a_second() -> None:
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    release = threading.Event()
    routes = probes.health_routes(loop, lambda: {"ready": True})
    try:
        assert routes["/healthz"]({}).status == 200
        assert routes["/readyz"]({}).status == 200
        loop.call_soon_threadsafe(release.wait, 10)  # a blocking call on the loop, as a bug would make
        health = routes["/healthz"]({})
        ready = routes["/readyz"]({})
        assert health.status == 503 and b"did not answer within 1 s" in health.body
        assert ready.status == 503 and json.loads(ready.body)["missing"] == {"daemon": "the event loop did not answer within 1 s"}
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()
    assert routes["/healthz"]({}).status == 503  # a closed loop is not alive either


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_endpoints_listen_on_ipv4_and_ipv6(host: str) -> None:
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host.strip("[]"), 0))
        port = s.getsockname()[1]
    endpoints = probes.Endpoints()
    endpoints.listen(f"{host}:{port}", {"/x": lambda headers: probes.Answer(200, probes.TEXT, b"x")}, key="healthAddress")
    try:
        connection = http.client.HTTPConnection(host.strip("[]"), port, timeout=5)
        connection.request("GET", "/x")
        assert connection.getresponse().read() == b"x"
        connection.close()
    finally:
        endpoints.close()
