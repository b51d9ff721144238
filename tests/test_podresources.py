"""Devices in use: a held device that moves stays Unhealthy under its old resource and is
not offered under its new one until the kubelet's pod-resources `List` says it is released.

The rule alone on snapshot sequences, the inventory with a stand-in driver and the
pod-resources double, and the real `nodedev serve` on an SR-IOV fixture tree."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import grpc
import pytest

from nodedev.api import deviceplugin_pb2 as pb
from nodedev.config import EnabledDriver
from nodedev.driver import Device, DriverOptions, Health
from nodedev.drivers.sysfs_tree import SysfsTree
from nodedev.inventory import Change, Inventory
from nodedev.podresources import Kept, PodResourcesClient, hold_moved, left, socket_path
from nodedev.podresources import log as podresources_log
from tests import test_sriov_e2e as sriov
from tests.conftest import NodedevProcess
from tests.kubelet import KubeletDouble, Lists
from tests.podresources import PodResourcesDouble
from tests.test_inventory import ScriptedDriver, config, driver_class, progress, until

NET = "example.com/net"
DPDK = "example.com/dpdk"
POD = "default/vm-1"


def dev(device_id: str, numa: tuple[int, ...] = ()) -> Device:
    return Device(device_id, numa_nodes=numa)


def snap(**resources: Sequence[str]) -> dict[str, dict[str, Device]]:
    """net=["a", "b"] -> {NET: {"a": Device("a"), ...}}"""
    names = {"net": NET, "dpdk": DPDK}
    return {names[key]: {i: dev(i) for i in ids} for key, ids in resources.items()}


def view(devices: Mapping[str, Mapping[str, Device]]) -> dict[str, dict[str, str]]:
    return {res: {i: d.health.value for i, d in devs.items()} for res, devs in devices.items()}


# --- the rule alone ---------------------------------------------------------------


def test_a_device_nobody_holds_moves_at_once() -> None:
    old, new = snap(net=["a", "b"], dpdk=[]), snap(net=["b"], dpdk=["a"])
    result, kept = hold_moved(old, new, {}, held={})
    assert result is new and kept == {}


def test_a_held_device_stays_unhealthy_under_its_old_resource_until_released() -> None:
    """A fake snapshot sequence: iavf -> unbound -> vfio-pci while held, then released."""
    held = {(NET, "a"): POD}
    first = snap(net=["a", "b"], dpdk=[])
    first[NET]["a"] = dev("a", numa=(1,))

    unbound, kept = hold_moved(first, snap(net=["b"], dpdk=[]), {}, held)  # no driver on the way
    assert view(unbound) == {NET: {"b": "Healthy", "a": "Unhealthy"}, DPDK: {}}
    assert unbound[NET]["a"].reason == f"moved while in use by {POD}: in no resource now"
    assert unbound[NET]["a"].numa_nodes == (1,), "kept as the driver last offered it"
    assert set(kept) == {(NET, "a")}

    rebound, kept = hold_moved(unbound, snap(net=["b"], dpdk=["a", "c"]), kept, held)
    assert view(rebound) == {NET: {"b": "Healthy", "a": "Unhealthy"}, DPDK: {"c": "Healthy"}}
    assert rebound[NET]["a"].reason == f"moved while in use by {POD}: now under {DPDK}, offered there once released"

    still, kept = hold_moved(rebound, snap(net=["b"], dpdk=["a", "c"]), kept, held)
    assert view(still) == view(rebound) and set(kept) == {(NET, "a")}

    released, kept = hold_moved(still, snap(net=["b"], dpdk=["a", "c"]), kept, held={})
    assert view(released) == {NET: {"b": "Healthy"}, DPDK: {"a": "Healthy", "c": "Healthy"}}
    assert kept == {}


def test_only_the_held_pair_is_kept_and_other_devices_move() -> None:
    old = snap(net=["a", "b"], dpdk=[])
    result, kept = hold_moved(old, snap(net=[], dpdk=["a", "b"]), {}, held={(NET, "b"): POD, (DPDK, "z"): "x/y"})
    assert view(result) == {NET: {"b": "Unhealthy"}, DPDK: {"a": "Healthy"}}
    assert set(kept) == {(NET, "b")}


def test_a_held_device_rebound_back_is_simply_back() -> None:
    kept = {(NET, "a"): Kept(dev("a"), POD)}
    old = {NET: {"a": Device("a", Health.UNHEALTHY, "moved while in use")}, DPDK: {}}
    result, now = hold_moved(old, snap(net=["a"], dpdk=[]), kept, held={(NET, "a"): POD})
    assert view(result) == {NET: {"a": "Healthy"}, DPDK: {}} and now == {}


def test_when_the_kubelet_cannot_say_kept_devices_stay_and_new_ones_go() -> None:
    kept = {(NET, "a"): Kept(dev("a"), POD)}
    old = {NET: {"a": Device("a", Health.UNHEALTHY, "moved"), "b": dev("b")}, DPDK: {}}
    result, now = hold_moved(old, snap(net=[], dpdk=["a", "b"]), kept, held=None)
    assert view(result) == {NET: {"a": "Unhealthy"}, DPDK: {"b": "Healthy"}}
    assert set(now) == {(NET, "a")} and result[NET]["a"].reason.startswith(f"moved while in use by {POD}")


def test_left_sees_only_devices_missing_from_their_resource() -> None:
    assert not left(snap(net=["a"]), snap(net=["a", "b"], dpdk=["c"]))
    assert not left({}, snap(net=["a"]))
    assert left(snap(net=["a", "b"]), snap(net=["b"]))
    assert left(snap(net=["a"]), snap(dpdk=["a"]))


def test_the_socket_is_beside_the_plugin_directory() -> None:
    assert socket_path(Path("/var/lib/kubelet/device-plugins")) == Path("/var/lib/kubelet/pod-resources/kubelet.sock")
    assert socket_path(Path("/var/lib/kubelet/device-plugins/")) == Path("/var/lib/kubelet/pod-resources/kubelet.sock")


# --- the inventory, with a stand-in driver and the pod-resources double -----------------


@pytest.fixture
def kubelet_dir() -> Iterator[Path]:
    """A kubelet root of its own (short: socket paths hold 107 bytes), so the derived
    pod-resources socket is this test's and no other's."""
    path = Path(tempfile.mkdtemp(prefix="ndp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pod_resources(kubelet_dir: Path) -> Iterator[PodResourcesDouble]:
    double = PodResourcesDouble(kubelet_dir / "pod-resources" / "kubelet.sock").start()
    yield double
    double.stop()


Seen = list[tuple[str, dict[str, str]]]


async def started(cls: type[ScriptedDriver], kubelet_dir: Path) -> tuple[Inventory, Seen]:
    inventory = Inventory(dataclasses.replace(config(cls), plugin_dir=kubelet_dir / "device-plugins"))
    seen: Seen = []

    def listener(resource: str, devices: Mapping[str, Device], changes: Sequence[Change]) -> None:
        with progress:
            seen.append((resource, {i: d.health.value for i, d in devices.items()}))
            progress.notify_all()

    inventory.add_listener(listener)
    await inventory.start(hotplug=False)
    return inventory, seen


def latest(seen: Seen, resource: str) -> dict[str, str] | None:
    return next((devices for res, devices in reversed(seen) if res == resource), None)


def test_the_inventory_keeps_a_held_device_and_lets_it_go_once_released(kubelet_dir: Path, pod_resources: PodResourcesDouble) -> None:
    cls = driver_class("nics", snapshot={NET: [dev("a"), dev("b")], DPDK: []})

    async def run() -> None:
        inventory, seen = await started(cls, kubelet_dir)
        driver = inventory.runners["nics"].driver
        assert isinstance(driver, ScriptedDriver)
        assert pod_resources.call_count() == 0, "no device moved: the kubelet is not asked"
        pod_resources.set_pods({POD: {NET: ["a"]}})
        driver.snapshot = {NET: [dev("b")], DPDK: [dev("a")]}
        inventory.request_rescan("nics")
        await until(lambda: latest(seen, NET) == {"b": "Healthy", "a": "Unhealthy"} and latest(seen, DPDK) == {})
        assert "moved while in use by default/vm-1" in inventory.runners["nics"].devices[NET]["a"].reason

        pod_resources.set_pods({})  # the pod ended: the poll (every 1 s) notices and rescans, no event needed
        await until(lambda: latest(seen, NET) == {"b": "Healthy"} and latest(seen, DPDK) == {"a": "Healthy"})
        calls = pod_resources.call_count()
        for _ in range(3):  # nothing kept, nothing leaving: scans do not ask any more
            scans = driver.scans
            inventory.request_rescan("nics")
            await until(lambda s=scans: driver.scans > s)  # type: ignore[misc]
        await inventory.stop()
        assert inventory.in_use.kept == {}
        assert pod_resources.call_count() == calls

    asyncio.run(run())


def test_a_driver_restarted_by_a_config_reload_keeps_what_it_kept(kubelet_dir: Path, pod_resources: PodResourcesDouble) -> None:
    cls = driver_class("nics3", snapshot={NET: [dev("a"), dev("b")], DPDK: []})

    async def run() -> None:
        inventory, seen = await started(cls, kubelet_dir)
        pod_resources.set_pods({POD: {NET: ["a"]}})
        cls.snapshot = {NET: [dev("b")], DPDK: [dev("a")]}  # the restarted driver's scans
        inventory.runners["nics3"].driver.snapshot = cls.snapshot  # type: ignore[union-attr]
        inventory.request_rescan("nics3")
        await until(lambda: latest(seen, NET) == {"b": "Healthy", "a": "Unhealthy"})
        changed = dataclasses.replace(inventory.config, drivers=(EnabledDriver("nics3", cls, DriverOptions(enabled=True, sysfs_root="/elsewhere")),))
        dropped, restarted = await inventory.reconfigure(changed)
        assert dropped == [] and sorted(restarted) == [DPDK, NET]
        assert view(inventory.runners["nics3"].devices) == {NET: {"b": "Healthy", "a": "Unhealthy"}, DPDK: {}}
        pod_resources.set_pods({})
        await until(lambda: latest(seen, DPDK) == {"a": "Healthy"} and latest(seen, NET) == {"b": "Healthy"})
        await inventory.stop()

    asyncio.run(run())


def test_without_the_socket_devices_move_and_it_is_said_once(kubelet_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    cls = driver_class("nics2", snapshot={NET: [dev("a"), dev("b")], DPDK: []})

    async def run() -> None:
        inventory, seen = await started(cls, kubelet_dir)
        driver = inventory.runners["nics2"].driver
        assert isinstance(driver, ScriptedDriver)
        for snapshot, expected in (
            ({NET: [dev("b")], DPDK: [dev("a")]}, {"a": "Healthy"}),
            ({NET: [], DPDK: [dev("a"), dev("b")]}, {"a": "Healthy", "b": "Healthy"}),
        ):
            driver.snapshot = snapshot
            inventory.request_rescan("nics2")
            await until(lambda e=expected: latest(seen, DPDK) == e)  # type: ignore[misc]
        await inventory.stop()

    with caplog.at_level(logging.INFO, logger=podresources_log.name):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.name == podresources_log.name]
    assert lines == [f"pod-resources socket {kubelet_dir}/pod-resources/kubelet.sock is absent; devices in use are not protected when they move"]


def test_a_slow_kubelet_costs_one_timeout_and_keeps_nothing_new(kubelet_dir: Path, pod_resources: PodResourcesDouble) -> None:
    pod_resources.set_pods({POD: {NET: ["a"]}})
    pod_resources.delay = 2.0
    client = PodResourcesClient(pod_resources.socket, timeout=0.2)

    async def run() -> tuple[object, float]:
        began = time.monotonic()
        held = await client.held()
        return held, time.monotonic() - began

    held, took = asyncio.run(run())
    assert held is None and took < 1.5
    pod_resources.delay = 0
    assert asyncio.run(client.held()) == {(NET, "a"): POD}


def test_the_client_reads_every_container_of_every_pod(pod_resources: PodResourcesDouble) -> None:
    pod_resources.set_pods({"ns1/p1": {NET: ["a", "b"], DPDK: ["c"]}, "ns2/p2": {NET: ["d"]}})
    held = asyncio.run(PodResourcesClient(pod_resources.socket).held())
    assert held == {(NET, "a"): "ns1/p1", (NET, "b"): "ns1/p1", (DPDK, "c"): "ns1/p1", (NET, "d"): "ns2/p2"}


# --- end to end: the real `nodedev serve` on an SR-IOV fixture tree ----------------------


@pytest.fixture
def kubelet_here(kubelet_dir: Path) -> Iterator[KubeletDouble]:
    double = KubeletDouble(kubelet_dir / "device-plugins")
    double.start()
    yield double
    double.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the fixture's character devices need root (mknod)")
def test_a_vf_rebound_while_held_is_offered_under_its_new_resource_only_once_released(
    tmp_path: Path,
    kubelet_dir: Path,
    kubelet_here: KubeletDouble,
    pod_resources: PodResourcesDouble,
    nodedev: Callable[..., NodedevProcess],
) -> None:
    """The pod-resources socket is found where a real node has it, beside the plugin
    directory (no config key): `<kubelet root>/pod-resources/kubelet.sock`."""
    tree = SysfsTree(tmp_path / "node")
    tree.add_pci(sriov.PF, driver="ice", total_vfs=8, netdev="ens1f0", numa_node=1)
    vfs = tree.set_numvfs(sriov.PF, 4)
    process = nodedev({**sriov.config(tree, tmp_path / "devinfo"), "pluginDir": str(kubelet_here.plugin_dir)})
    lists = Lists(kubelet_here, sriov.EVENT_TIMEOUT)
    kubelet_here.wait(lambda: lists.view(sriov.NET) == sriov.healthy(*vfs) and lists.view(sriov.DPDK) == {}, timeout=10, what="4 VFs listed")
    assert pod_resources.call_count() == 0, "nothing moved yet: the kubelet is not asked"

    pod_resources.set_pods({POD: {sriov.NET: [vfs[0]]}})
    held_list = {**sriov.healthy(*vfs[1:]), vfs[0]: "Unhealthy"}
    lists.after("a held VF rebound to vfio-pci", lambda: tree.bind(vfs[0], "vfio-pci"), {sriov.NET: held_list, sriov.DPDK: {}})
    process.wait_log(f"moved while in use by {POD}: now under {sriov.DPDK}")
    with pytest.raises(grpc.RpcError) as refused:
        request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=[vfs[0]])])
        kubelet_here.stub(sriov.DPDK).Allocate(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    released_at = len(kubelet_here.updates(sriov.DPDK))
    pod_resources.set_pods({})  # no event: the 1 s poll of pod-resources notices
    moved = {sriov.NET: sriov.healthy(*vfs[1:]), sriov.DPDK: sriov.healthy(vfs[0])}
    kubelet_here.wait(lambda: all(lists.view(r) == e for r, e in moved.items()), timeout=10, what="the released VF under its new resource")
    process.wait_log(f"{vfs[0]} no longer kept under {sriov.NET}: it was released by {POD}")
    offered = [update for update in kubelet_here.updates(sriov.DPDK)[:released_at] if vfs[0] in update]
    assert offered == [], "never offered under its new resource while held"
    print("milliseconds from the rebind to the kubelet's list:", {k: round(v, 1) for k, v in lists.took.items()})
    assert process.proc.poll() is None


def test_a_socket_that_does_not_answer_is_unknown_and_said_once(kubelet_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = socket_path(kubelet_dir / "device-plugins")
    path.parent.mkdir(parents=True)
    path.write_text("not a socket")
    client = PodResourcesClient(path, timeout=0.5)

    async def run() -> list[object]:
        return [await client.held(), await client.held()]

    with caplog.at_level(logging.WARNING, logger=podresources_log.name):
        assert asyncio.run(run()) == [None, None]
    lines = [r.getMessage() for r in caplog.records if r.name == podresources_log.name]
    assert len(lines) == 1 and lines[0].startswith(f"pod-resources List at {path} failed: UNAVAILABLE")
