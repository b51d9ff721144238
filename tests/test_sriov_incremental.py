"""The sriov driver's named scans against full scans: after any sequence of changes to a
fixture tree, a driver told only what inotify named (through the real engine and
PathWatcher) must report exactly what a new driver reading everything reports: the
same devices under the same resources, with the same health, reasons, NUMA, container
edits, `_INFO` and device-info files."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodedev.driver import Health
from nodedev.drivers.sriov import simulate
from nodedev.drivers.sriov.driver import SriovDriver
from nodedev.drivers.sysfs_tree import SysfsTree
from tests import test_hotplug
from tests.test_hotplug import Recorder, aio
from tests.test_sriov import driver_for

recorder = test_hotplug.recorder  # a fixture

INTEL, MLX = simulate.INTEL_PF, simulate.MLX_PF
PF_DRIVERS = {INTEL: ("ice", "iavf", 0x8086, 0x1592, 0x1889, 0, "ens1f0"), MLX: ("mlx5_core", "mlx5_core", 0x15B3, 0x101D, 0x101E, 1, "ens2f0")}


def described(driver: SriovDriver, snapshot: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Everything a user sees of a snapshot, edits and `_INFO` included."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for resource, devices in snapshot.items():
        out[resource] = [(d.id, d.health, d.reason, d.numa_nodes, d.edits) for d in devices]
        if devices:
            out[resource].append(("_INFO", driver.allocate(resource, list(devices))))
    return out


def files(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.glob("*.json"))} if directory.is_dir() else {}


class Changes:
    """The kinds of change a node sees, picked at random, each applied to the fixture tree."""

    def __init__(self, tree: SysfsTree, rng: random.Random) -> None:
        self.tree = tree
        self.rng = rng
        self.removed: set[str] = set()

    def vfs(self) -> list[str]:
        return [vf for pf in (INTEL, MLX) if pf not in self.removed for vf in self.tree.vfs(pf)]

    def apply(self) -> str:
        rng, tree = self.rng, self.tree
        vfs = self.vfs()
        kind = rng.choice(["bind", "bind", "bind", "unbind", "numvfs", "carrier", "up", "route", "vhost", "replug"])
        if kind in ("bind", "unbind") and vfs:
            vf = rng.choice(vfs)
            if kind == "unbind":
                tree.unbind(vf)
                return f"unbind {vf}"
            driver = rng.choice(["iavf", "vfio-pci", "mlx5_core"])
            tree.bind(vf, driver)
            return f"bind {vf} {driver}"
        pfs = [pf for pf in (INTEL, MLX) if pf not in self.removed]
        if kind == "numvfs" and pfs:
            pf = rng.choice(pfs)
            count = rng.choice([0, 0, 2, 8])
            _, vf_driver, vendor, _, device, _, _ = PF_DRIVERS[pf]
            tree.set_numvfs(pf, count, driver=vf_driver, vendor=vendor, device=device)
            return f"numvfs {pf} {count}"
        if kind in ("carrier", "up") and pfs:
            ifname = PF_DRIVERS[rng.choice(pfs)][6]
            state = rng.random() < 0.5
            (tree.set_carrier if kind == "carrier" else tree.set_up)(ifname, state)
            return f"{kind} {ifname} {state}"
        if kind == "route":
            names = rng.choice([("eth0",), ("ens1f0",), ("eth0", "ens2f0"), ("ens1f0v1",), ("eth0", "ens1f0v0", "ens2f0v2")])
            tree.set_default_route(*[n for n in names if (tree.sys / "class/net" / n).exists()])
            return f"default route via {names}"
        if kind == "vhost":
            node = tree.dev / "vhost-net"
            if node.exists():
                node.unlink()
            else:
                tree.add_char("vhost-net")
            return "vhost-net toggled"
        pf = rng.choice([INTEL, MLX])
        if pf in self.removed:
            pf_driver, vf_driver, vendor, device, vf_device, numa, ifname = PF_DRIVERS[pf]
            tree.add_pci(pf, vendor=vendor, device=device, driver=pf_driver, numa_node=numa, total_vfs=16, netdev=ifname)
            tree.set_numvfs(pf, rng.randint(0, 4), driver=vf_driver, vendor=vendor, device=vf_device)
            self.removed.discard(pf)
            return f"plugged {pf} back"
        tree.remove(pf)
        self.removed.add(pf)
        return f"unplugged {pf}"


async def told_after(r: Recorder, barrier: Path, change: Callable[[], str]) -> tuple[str, frozenset[str] | None]:
    """Applies one change, then a marker in a watched directory: inotify keeps order, so once
    the marker is named every event of the change has been; returns what the driver was told."""
    r.reset()
    what = change()
    barrier.touch()
    barrier.unlink()
    await r.wait(lambda: any(n is None or barrier.name in n for n in r.names("sriov")), f"the events of: {what}", timeout=5)
    names: set[str] = set()
    for told in r.names("sriov"):
        if told is None:
            return what, None
        names |= told
    return what, frozenset(names)


@pytest.mark.parametrize("seed", [1, 2, 3])
@aio
async def test_named_scans_report_what_full_scans_do_through_random_changes(
    tmp_path: Path, recorder: Callable[..., Recorder], seed: int
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the fixture's character devices need root (mknod)")
    tree = simulate.build(tmp_path / "node")
    resources = [*simulate.RESOURCE_LIST, {"resourceName": "whole", "selectors": {"drivers": ["ice", "mlx5_core"]}}]  # PFs without VFs
    live = driver_for(tree, tmp_path / "live", resources)
    live.scan()
    r = recorder(settle_s=0)
    r.engine.start(asyncio.get_running_loop())
    r.engine.subscribe("sriov", [], live.watch_paths())
    changes = Changes(tree, random.Random(seed))
    barrier = tree.sys / "bus/pci/devices/.barrier"
    history: list[str] = []
    for step in range(40):
        what, names = await told_after(r, barrier, changes.apply)
        history.append(what)
        snapshot = live.scan(names)
        r.engine.subscribe("sriov", [], live.watch_paths())
        reference = driver_for(tree, tmp_path / f"reference{step}", resources)
        expected = reference.scan()
        assert described(live, snapshot) == described(reference, expected), f"after {history}"
        assert files(tmp_path / "live/devinfo") == files(tmp_path / f"reference{step}/devinfo"), f"after {history}"
        assert live.labels() == reference.labels()


def test_a_rebind_among_1024_vfs_reads_that_vf_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of naming: the cost of a change does not grow with the node."""
    from nodedev.drivers import pci

    tree = SysfsTree(tmp_path / "node", char_devices=False)
    for p in range(4):
        pf = f"0000:{0x10 + 2 * p:02x}:00.0"
        tree.add_pci(pf, driver="ice", total_vfs=256, netdev=f"ens{p}f0")
        tree.set_numvfs(pf, 256)
    resources = [{"resourceName": "net", "selectors": {"drivers": ["iavf"]}}, {"resourceName": "dpdk", "selectors": {"drivers": ["vfio-pci"]}}]
    driver = driver_for(tree, tmp_path, resources)
    assert len(driver.scan()["intel.com/net"]) == 1024
    read: list[str] = []
    original = pci.PciTree.read_device
    monkeypatch.setattr(pci.PciTree, "read_device", lambda self, address: read.append(address) or original(self, address))
    vf = tree.vfs("0000:12:00.0")[77]
    tree.bind(vf, "vfio-pci")
    snapshot = driver.scan({"iavf", "vfio-pci", vf, "net", "ens1f0v77"})
    assert [d.id for d in snapshot["intel.com/dpdk"]] == [vf] and len(snapshot["intel.com/net"]) == 1023
    assert read == [vf], "a rebind changes nothing of the PF's"



def test_vfs_made_or_removed_named_as_uevents_name_them_read_their_pf_again(tmp_path: Path) -> None:
    """On the real /sys writing `sriov_numvfs` sends an add or remove uevent per VF and
    none for the PF, whose `virtfn*` and `sriov_numvfs` changed all the same: a PF with
    VFs is not offered, one without is."""
    tree = SysfsTree(tmp_path / "node", char_devices=False)
    pf = "0000:3b:00.0"
    tree.add_pci(pf, driver="ice", total_vfs=8, netdev="ens1f0")
    driver = driver_for(tree, tmp_path, [{"resourceName": "nic", "selectors": {"drivers": ["ice", "iavf"]}}])
    assert [d.id for d in driver.scan()["intel.com/nic"]] == [pf]
    vfs = tree.set_numvfs(pf, 4)
    assert [d.id for d in driver.scan(set(vfs))["intel.com/nic"]] == vfs, "the PF now has VFs: not offered"
    tree.set_numvfs(pf, 0)
    assert [d.id for d in driver.scan(set(vfs))["intel.com/nic"]] == [pf], "the VFs went: the PF is offered again"


def test_vfs_whose_pf_directory_vanished_are_unhealthy_when_only_the_pf_is_named(tmp_path: Path) -> None:
    """The kernel removes VFs before their PF; a tree where the PF went first (a broken
    driver, a fixture) still shows each VF as Unhealthy, naming the PF, not as it was."""
    import shutil

    tree = SysfsTree(tmp_path / "node", char_devices=False)
    pf = "0000:3b:00.0"
    tree.add_pci(pf, driver="ice", total_vfs=8, netdev="ens1f0")
    vfs = tree.set_numvfs(pf, 2)
    driver = driver_for(tree, tmp_path, [{"resourceName": "vf", "selectors": {"drivers": ["iavf"]}}])
    assert {d.health for d in driver.scan()["intel.com/vf"]} == {Health.HEALTHY}
    (tree.sys / "bus/pci/devices" / pf).unlink()
    shutil.rmtree(tree.device_dir(pf))
    devices = driver.scan({pf})["intel.com/vf"]
    assert [(d.id, d.health, d.reason) for d in devices] == [(vf, Health.UNHEALTHY, f"its PF {pf} is gone") for vf in vfs]


def test_an_rdma_device_named_alone_is_found_on_its_function_and_lost_with_it(tmp_path: Path) -> None:
    """mlx5_ib loaded after mlx5_core bound the VFs: the `infiniband` event names mlx5_2, not
    the VF it sits on; the VF becomes RDMA-capable all the same, and stops being so when it goes."""
    import shutil

    tree = SysfsTree(tmp_path / "node", char_devices=False)
    pf = "0000:5e:00.0"
    tree.add_pci(pf, vendor=0x15B3, device=0x101D, driver="mlx5_core", total_vfs=8, netdev="ens2f0")
    vf = tree.set_numvfs(pf, 2, driver="mlx5_core", vendor=0x15B3, device=0x101E)[0]
    driver = driver_for(tree, tmp_path, [{"resourceName": "rdma", "selectors": {"isRdma": True}}])
    assert driver.scan()["intel.com/rdma"] == []
    tree.add_rdma(vf, "mlx5_2", 2)
    [device] = driver.scan({"mlx5_2"})["intel.com/rdma"]
    assert device.id == vf and "/dev/infiniband/uverbs2" in {n.container_path for n in device.edits.devices}
    (tree.sys / "class/infiniband/mlx5_2").unlink()
    for sub in ("infiniband", "infiniband_verbs", "infiniband_mad"):
        shutil.rmtree(tree.device_dir(vf) / sub)
    assert driver.scan({"mlx5_2"})["intel.com/rdma"] == []


@aio
async def test_a_function_bound_to_a_driver_seen_for_the_first_time_is_found(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    """The first bind to a driver makes `bus/pci/drivers/<name>/`, unwatched until the scan
    it causes: the event names only the directory, and the functions in it are read."""
    tree = SysfsTree(tmp_path / "node", char_devices=False)
    pf = "0000:3b:00.0"
    tree.add_pci(pf, driver="ice", total_vfs=8, netdev="ens1f0")
    vf = tree.set_numvfs(pf, 2, driver=None)[0]
    live = driver_for(tree, tmp_path, [{"resourceName": "dpdk", "selectors": {"drivers": ["igb_uio"]}}])
    assert live.scan()["intel.com/dpdk"] == []
    r = recorder(settle_s=0)
    r.engine.start(asyncio.get_running_loop())
    r.engine.subscribe("sriov", [], live.watch_paths())
    what, names = await told_after(r, tree.sys / "bus/pci/devices/.barrier", lambda: (tree.bind(vf, "igb_uio"), "bound")[1])
    assert names is not None and vf not in names, "nothing but the new directory names the function"
    assert [d.id for d in live.scan(names)["intel.com/dpdk"]] == [vf]
