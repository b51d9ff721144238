"""End to end: real interfaces come and go, the real `nodedev serve` hears the
kernel, and the kubelet double sees the list change. The periodic resync is off,
so only hotplug events can explain an update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from nodedev import drivers
from nodedev.api import deviceplugin_pb2 as pb
from tests import netif
from tests.conftest import NodedevProcess
from tests.kubelet import KubeletDouble
from tests.netif import NetIfs

netifs = netif.netifs  # a fixture

pytestmark = pytest.mark.skipif("netdev" not in drivers.NAMES, reason="the netdev driver is not registered in nodedev.drivers.NAMES")

RESOURCE = "nodedev.io/e2e"
EVENT_TIMEOUT = 3.0
"""Generous for a loaded 2-core machine; the benchmark measures the real latency (milliseconds)."""


def netdev_config(prefix: str) -> dict[str, Any]:
    return {
        "hotplug": {"source": "auto", "resyncSeconds": 0},
        "drivers": {"netdev": {"enabled": True, "resourceList": [{"resourceName": "e2e", "selectors": {"ifNames": [f"{prefix}*"]}}]}},
    }


def start(kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess], netifs: NetIfs) -> NodedevProcess:
    process = nodedev(netdev_config(netifs.prefix))
    kubelet.wait(lambda: kubelet.devices(RESOURCE) == {}, what=f"{RESOURCE} streaming an empty list")
    return process


def wait_devices(kubelet: KubeletDouble, expected: dict[str, str], what: str) -> None:
    """Waits until the latest list holds exactly `expected` (ID -> health)."""

    def seen() -> bool:
        devices = kubelet.devices(RESOURCE)
        return devices is not None and {i: h for i, (h, _numa) in devices.items()} == expected

    try:
        kubelet.wait(seen, timeout=EVENT_TIMEOUT, what=what)
    except AssertionError as err:
        raise AssertionError(f"{err}; last list: {kubelet.devices(RESOURCE)}") from None


def test_interfaces_appearing_and_vanishing_reach_the_kubelet(kubelet: KubeletDouble, nodedev, netifs: NetIfs) -> None:
    start(kubelet, nodedev, netifs)
    a, b = netifs.veth()
    wait_devices(kubelet, {a: "Healthy", b: "Healthy"}, "the new veth pair")
    tap = netifs.tap()
    wait_devices(kubelet, {a: "Healthy", b: "Healthy", tap: "Healthy"}, "the new tap")
    netifs.delete(a)
    wait_devices(kubelet, {tap: "Healthy"}, "the veth pair gone")
    netifs.delete(tap)
    wait_devices(kubelet, {}, "the tap gone")


def test_link_state_changes_reach_the_kubelet_without_a_uevent(kubelet: KubeletDouble, nodedev, netifs: NetIfs) -> None:
    start(kubelet, nodedev, netifs)
    a, b = netifs.veth()
    wait_devices(kubelet, {a: "Healthy", b: "Healthy"}, "the new veth pair")
    netifs.up(a)  # its peer is down: no traffic can pass
    wait_devices(kubelet, {a: "Unhealthy", b: "Healthy"}, f"{a} unhealthy while its peer is down")
    netifs.up(b)
    wait_devices(kubelet, {a: "Healthy", b: "Healthy"}, f"{a} healthy once its peer is up")


def test_a_renamed_interface_leaves_under_its_old_name(kubelet: KubeletDouble, nodedev, netifs: NetIfs) -> None:
    start(kubelet, nodedev, netifs)
    a, b = netifs.veth()
    wait_devices(kubelet, {a: "Healthy", b: "Healthy"}, "the new veth pair")
    outside = NetIfs().name()  # a name the selector does not match
    netifs.rename(b, outside)
    wait_devices(kubelet, {a: "Healthy"}, f"{b} renamed to {outside}")


def test_allocate_hands_out_the_interface_names(kubelet: KubeletDouble, nodedev, netifs: NetIfs) -> None:
    start(kubelet, nodedev, netifs)
    a, b = netifs.veth()
    wait_devices(kubelet, {a: "Healthy", b: "Healthy"}, "the new veth pair")
    request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=[b, a])])
    response = kubelet.stub(RESOURCE).Allocate(request, timeout=5)
    assert dict(response.container_responses[0].envs) == {"NETDEV_NODEDEV_IO_E2E": f"{b},{a}"}
