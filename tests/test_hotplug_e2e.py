"""End to end: real interfaces come and go, the real `nodedev serve` hears the
kernel, and the kubelet double sees the list change. The periodic resync is off,
so only hotplug events can explain an update."""

from __future__ import annotations

import secrets
import time
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


def test_interfaces_appearing_and_vanishing_reach_the_kubelet(kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess], netifs: NetIfs) -> None:
    start(kubelet, nodedev, netifs)
    a, b = netifs.veth()
    wait_devices(kubelet, {a: "Healthy", b: "Healthy"}, "the new veth pair")
    tap = netifs.tap()
    wait_devices(kubelet, {a: "Healthy", b: "Healthy", tap: "Healthy"}, "the new tap")
    netifs.delete(a)
    wait_devices(kubelet, {tap: "Healthy"}, "the veth pair gone")
    netifs.delete(tap)
    wait_devices(kubelet, {}, "the tap gone")


def test_link_state_changes_reach_the_kubelet_without_a_uevent(kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess], netifs: NetIfs) -> None:
    start(kubelet, nodedev, netifs)
    a, b = netifs.veth()
    wait_devices(kubelet, {a: "Healthy", b: "Healthy"}, "the new veth pair")
    netifs.up(a)  # its peer is down: no traffic can pass
    wait_devices(kubelet, {a: "Unhealthy", b: "Healthy"}, f"{a} unhealthy while its peer is down")
    netifs.up(b)
    wait_devices(kubelet, {a: "Healthy", b: "Healthy"}, f"{a} healthy once its peer is up")


def test_a_renamed_interface_leaves_under_its_old_name(kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess], netifs: NetIfs) -> None:
    start(kubelet, nodedev, netifs)
    a, b = netifs.veth()
    wait_devices(kubelet, {a: "Healthy", b: "Healthy"}, "the new veth pair")
    outside = NetIfs().name()  # a name the selector does not match
    netifs.rename(b, outside)
    wait_devices(kubelet, {a: "Healthy"}, f"{b} renamed to {outside}")


def test_allocate_hands_out_the_interface_names(kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess], netifs: NetIfs) -> None:
    start(kubelet, nodedev, netifs)
    a, b = netifs.veth()
    wait_devices(kubelet, {a: "Healthy", b: "Healthy"}, "the new veth pair")
    request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=[b, a])])
    response = kubelet.stub(RESOURCE).Allocate(request, timeout=5)
    assert dict(response.container_responses[0].envs) == {"NETDEV_NODEDEV_IO_E2E": f"{b},{a}"}


BURST = 256
BURST_UPDATES = 5
BURST_DELETE_UPDATES = 2
BURST_TIMEOUT = 2.0


def counts(sizes: list[int]) -> str:
    """How many of the burst each update held, the long middle cut."""
    shown = sizes if len(sizes) <= 8 else [*sizes[:4], "...", *sizes[-2:]]
    return ", ".join(map(str, shown))


def holding(kubelet: KubeletDouble, names: set[str]) -> Callable[[], bool]:
    """Whether the latest list holds exactly `names`."""

    def check() -> bool:
        devices = kubelet.devices(RESOURCE)
        return devices is not None and set(devices) == names

    return check


def test_a_burst_of_256_interfaces_becomes_a_few_updates(kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess], netifs: NetIfs) -> None:
    """README, Figures: 256 interfaces made in one `ip -batch` reach the kubelet in at most
    5 ListAndWatch updates and within 2 s; deleted with one `ip link del group`, in at most 2."""
    start(kubelet, nodedev, netifs)
    group = 1000 + secrets.randbelow(60000)
    try:
        began = time.monotonic()
        made = set(netifs.ifbs(BURST, group=group, per_batch=BURST))
        kubelet.wait(holding(kubelet, made), timeout=10 * BURST_TIMEOUT, what=f"all {BURST} interfaces listed")
        took = time.monotonic() - began
        updates = kubelet.updates(RESOURCE)
        first = next(i for i, view in enumerate(updates) if made & set(view))
        final = next(i for i, view in enumerate(updates) if set(view) == made)
        sizes = [len(made & set(view)) for view in updates[first : final + 1]]
        assert took <= BURST_TIMEOUT, f"the full list took {took:.3f} s (at most {BURST_TIMEOUT} s)"
        assert len(sizes) <= BURST_UPDATES, f"{len(sizes)} updates for one burst, holding {counts(sizes)} of the {BURST}"

        netifs.delete_group(group)
        kubelet.wait(holding(kubelet, set()), timeout=10 * BURST_TIMEOUT, what=f"all {BURST} interfaces gone")
        after = kubelet.updates(RESOURCE)[final + 1 :]  # a late update of the burst counts here too
        emptied = next(i for i, view in enumerate(after) if not view)
        sizes = [len(made & set(view)) for view in after[: emptied + 1]]
        assert len(sizes) <= BURST_DELETE_UPDATES, f"{len(sizes)} updates for one group delete, holding {counts(sizes)} of the {BURST}"
    finally:
        netifs.delete_group(group)
