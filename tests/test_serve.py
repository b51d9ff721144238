"""End to end: the real `nodedev serve` against the kubelet double, with the real /dev/kvm."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from nodedev.api import deviceplugin_pb2 as pb
from tests.conftest import nodedev_command
from tests.devtree import char_device
from tests.kubelet import KubeletDouble

KVM = "devices.kubevirt.io/kvm"
TUN = "devices.kubevirt.io/tun"
VHOST = "devices.kubevirt.io/vhost-net"
ALL = {KVM, TUN, VHOST}

needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm")


def three_drivers(shares: int = 4, dev_root: str = "/dev") -> dict:
    return {
        "devRoot": dev_root,
        "drivers": {
            "kvm": {"enabled": True, "shares": shares},
            "tun": {"enabled": True, "shares": shares},
            "vhost-net": {"enabled": True, "shares": shares},
        },
    }


def expected_health(path: str) -> str:
    return "Healthy" if os.path.exists(path) else "Unhealthy"


@needs_kvm
def test_every_resource_is_registered_with_its_devices(kubelet: KubeletDouble, nodedev, plugin_dir: Path) -> None:
    nodedev(three_drivers(shares=3))
    kubelet.wait(lambda: kubelet.streaming() == ALL, what="all three resources streaming")

    assert kubelet.devices(KVM) == {f"kvm{i}": ("Healthy", ()) for i in range(3)}
    assert kubelet.devices(TUN) == {f"tun{i}": (expected_health("/dev/net/tun"), ()) for i in range(3)}
    assert kubelet.devices(VHOST) == {f"vhost-net{i}": (expected_health("/dev/vhost-net"), ()) for i in range(3)}
    for request in kubelet.registrations:
        assert request.version == "v1beta1"
        assert request.endpoint == request.endpoint.split("/")[-1]
        socket = plugin_dir / request.endpoint
        assert stat.S_ISSOCK(socket.stat().st_mode)
        assert stat.S_IMODE(socket.stat().st_mode) == 0o600
    assert kubelet.options(KVM) == pb.DevicePluginOptions()


@needs_kvm
def test_allocate_returns_the_real_node_per_container_in_order(kubelet: KubeletDouble, nodedev) -> None:
    nodedev(three_drivers())
    kubelet.wait(lambda: KVM in kubelet.streaming(), what="kvm streaming")

    response = kubelet.stub(KVM).Allocate(
        pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["kvm0"]), pb.ContainerAllocateRequest(devices_ids=["kvm1", "kvm2"])]),
        timeout=5,
    )

    assert len(response.container_responses) == 2
    for container in response.container_responses:
        assert [(d.host_path, d.container_path, d.permissions) for d in container.devices] == [("/dev/kvm", "/dev/kvm", "rw")]
    fd = os.open(response.container_responses[0].devices[0].host_path, os.O_RDWR)  # the node handed out is real
    os.close(fd)


@needs_kvm
@pytest.mark.parametrize(
    ("containers", "message"),
    [
        ([["kvm0", "kvm99"]], "devices.kubevirt.io/kvm: unknown device 'kvm99'"),
        ([["kvm1", "kvm1"]], "devices.kubevirt.io/kvm: device 'kvm1' is requested more than once"),
        ([["kvm1"], ["kvm1"]], "devices.kubevirt.io/kvm: device 'kvm1' is requested more than once"),
    ],
)
def test_allocate_rejects_bad_ids_naming_them(kubelet: KubeletDouble, nodedev, containers, message) -> None:
    nodedev(three_drivers())
    kubelet.wait(lambda: KVM in kubelet.streaming(), what="kvm streaming")
    request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=ids) for ids in containers])

    with pytest.raises(grpc.RpcError) as raised:
        kubelet.stub(KVM).Allocate(request, timeout=5)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == message


def test_allocate_rejects_unhealthy_devices_with_the_reason(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    char_device(dev / "net" / "tun")
    nodedev({"devRoot": str(dev), "drivers": {"vhost-net": {"enabled": True, "shares": 2}}})
    kubelet.wait(lambda: VHOST in kubelet.streaming(), what="vhost-net streaming")

    with pytest.raises(grpc.RpcError) as raised:
        kubelet.stub(VHOST).Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["vhost-net0"])]), timeout=5)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == f"{VHOST}: device 'vhost-net0' is Unhealthy: {dev}/vhost-net is missing"


@needs_kvm
def test_twenty_kubelet_restarts_each_reregister_everything(kubelet: KubeletDouble, nodedev) -> None:
    nodedev(three_drivers())
    kubelet.wait(lambda: kubelet.streaming() == ALL, what="first registration")

    for restart in range(1, 21):
        kubelet.restart()
        kubelet.wait(
            lambda: kubelet.streaming() == ALL and all(len(kubelet.endpoints[r].lists) > 0 for r in ALL),
            what=f"re-registration after restart {restart}",
        )
        for resource in ALL:
            assert kubelet.registration_count(resource) == restart + 1
    assert kubelet.devices(KVM) == {f"kvm{i}": ("Healthy", ()) for i in range(4)}
    assert kubelet.rejections == []


@needs_kvm
def test_kubelet_starting_after_nodedev_gets_every_resource(plugin_dir: Path, nodedev) -> None:
    process = nodedev(three_drivers())
    process.wait_log("cannot register yet")

    kubelet = KubeletDouble(plugin_dir)
    kubelet.start()
    try:
        kubelet.wait(lambda: kubelet.streaming() == ALL, what="registration once the kubelet is up")
        assert kubelet.rejections == []
    finally:
        kubelet.stop()


@needs_kvm
def test_sigterm_ends_streams_removes_sockets_and_exits_zero(kubelet: KubeletDouble, nodedev, plugin_dir: Path) -> None:
    process = nodedev(three_drivers())
    kubelet.wait(lambda: kubelet.streaming() == ALL, what="all three resources streaming")

    started = time.monotonic()
    assert process.stop(timeout=5) == 0
    assert time.monotonic() - started < 2.0

    kubelet.wait(lambda: kubelet.streaming() == set(), what="streams ended")
    assert sorted(p.name for p in plugin_dir.iterdir()) == ["kubelet.sock"]


def test_a_node_that_disappears_goes_unhealthy_and_comes_back(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    (dev / "net").mkdir(parents=True)
    node = char_device(dev / "net" / "tun")
    nodedev({"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 2}}})
    kubelet.wait(lambda: kubelet.devices(TUN) == {"tun0": ("Healthy", ()), "tun1": ("Healthy", ())}, what="tun Healthy")

    node.unlink()
    kubelet.wait(lambda: kubelet.devices(TUN) == {"tun0": ("Unhealthy", ()), "tun1": ("Unhealthy", ())}, what="tun Unhealthy")

    char_device(node)
    kubelet.wait(lambda: kubelet.devices(TUN) == {"tun0": ("Healthy", ()), "tun1": ("Healthy", ())}, what="tun Healthy again")


def test_a_driver_with_nothing_to_serve_leaves_the_others_serving(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    """A kvm node that is not a kvm device makes kvm Unhealthy with the ioctl error, and tun still serves."""
    dev = tmp_path / "dev"
    char_device(dev / "net" / "tun")
    char_device(dev / "kvm", (1, 3))  # /dev/null's numbers: a char device, not kvm
    nodedev({"devRoot": str(dev), "drivers": {"kvm": {"enabled": True, "shares": 1}, "tun": {"enabled": True, "shares": 1}}})

    kubelet.wait(lambda: kubelet.streaming() == {KVM, TUN}, what="both resources streaming")
    assert kubelet.devices(KVM) == {"kvm0": ("Unhealthy", ())}
    assert kubelet.devices(TUN) == {"tun0": ("Healthy", ())}


BAD_CONFIGS = [
    ("drivers:\n  kvm: {enabled: true, shares: '5'}\n", "drivers.kvm.shares: Input should be a valid integer"),
    ("drivers:\n  kvm: {enabled: true, sharez: 5}\n", "drivers.kvm.sharez: unknown key"),
    ("drivers:\n  gpu: {enabled: true}\n", "drivers.gpu: unknown driver"),
    ("drivers:\n  kvm: {enabled: yes please}\n", "drivers.kvm.enabled: Input should be a valid boolean"),
    ("pluginDir: 3\n", "pluginDir: Input should be a valid string"),
    ("drivers: [kvm]\n", "drivers: Input should be a valid dictionary"),
    ("hotplug: {source: dbus}\n", "hotplug.source: Input should be 'auto', 'udev' or 'kernel'"),
    ("drivers:\n  kvm: {enabled: true\n", "not valid YAML (line 3, column 1)"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("drivers:\n  kvm: {enabled: true, shares: 0}\n", "drivers.kvm.shares: Input should be greater than or equal to 1"),
    (
        "drivers:\n  kvm: {enabled: true}\n  netdev: {enabled: true, resourceList: [{resourceName: kvm, resourcePrefix: devices.kubevirt.io}]}\n",
        "drivers.netdev: resource 'devices.kubevirt.io/kvm' is already served by drivers.kvm",
    ),
    (
        "drivers:\n  netdev: {enabled: true, resourceList: [{resourceName: 'bad name'}]}\n",
        "drivers.netdev.resourceList[0].resourceName: resourceName 'bad name' may contain only letters, digits",
    ),
    (
        "drivers:\n  netdev: {enabled: true, resourceList: [{resourceName: x, resourcePrefix: Bad_Domain}]}\n",
        "drivers.netdev: resource name 'Bad_Domain/x': 'Bad_Domain' is not a DNS subdomain",
    ),
    (
        "drivers:\n  netdev: {enabled: true, resourceList: [{resourceName: x, selectors: {ifNames: [1]}}]}\n",
        "drivers.netdev.resourceList[0].selectors.ifNames[0]: Input should be a valid string (got 1)",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_malformed_config_exits_2_with_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)

    result = subprocess.run(nodedev_command("serve", "--config", str(path)), capture_output=True, text=True, timeout=30)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"nodedev: config error: {path}: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_the_kubelet_double_refuses_a_plugin_that_is_not_serving_yet(kubelet: KubeletDouble) -> None:
    """As the real kubelet does: Register dials back first, so registering before serving fails."""
    from nodedev.api import deviceplugin_pb2_grpc as pb_grpc

    kubelet.dial_timeout = 0.5
    with grpc.insecure_channel(f"unix://{kubelet.socket}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            pb_grpc.RegistrationStub(channel).Register(
                pb.RegisterRequest(version="v1beta1", endpoint="nobody.sock", resource_name="example.com/x"), timeout=5
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot dial plugin at nobody.sock" in raised.value.details()


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"devRoot: {tmp_path}\ndrivers:\n  tun: {{enabled: true, shares: 1}}\n")

    result = subprocess.run(
        nodedev_command("discover", "--config", str(path), "--log-format", "json", "--log-level", "info"),
        capture_output=True, text=True, timeout=30,
    )

    assert result.returncode == 0
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"ts", "level", "logger", "msg"} <= set(entries[0])
    assert any(e["level"] == "warning" and "tun0" in e["msg"] and "is missing" in e["msg"] for e in entries)
