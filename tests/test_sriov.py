"""The sriov driver on fixture trees (and this machine's /sys): what is offered under which
resource, what a container gets, the CNI device-info files, and link health."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from nodedev.driver import ContainerEdits, Device, DeviceNode, Driver, Health
from nodedev.drivers.sriov import simulate
from nodedev.drivers.sriov.devinfo import file_name as device_info_name
from nodedev.drivers.sriov.driver import SriovDriver, env_name
from nodedev.drivers.sysfs_tree import SysfsTree
from tests.test_contract import build

INTEL, MLX = simulate.INTEL_PF, simulate.MLX_PF
NET = "intel.com/intel_sriov_netdevice"
RDMA = "intel.com/mlnx_sriov_rdma"
DPDK = "intel.com/sriov_dpdk"


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    if os.geteuid() != 0:
        pytest.skip("the fixture's character devices need root (mknod)")
    return simulate.build(tmp_path / "node")


def driver_for(tree: SysfsTree, tmp_path: Path, resources: list[dict[str, Any]] | None = None, **extra: Any) -> SriovDriver:
    section = {
        "enabled": True,
        "sysfsRoot": str(tree.sys),
        "devRoot": str(tree.dev),
        "procRoot": str(tree.proc),
        "deviceInfoDir": str(tmp_path / "devinfo"),
        "resourceList": simulate.RESOURCE_LIST if resources is None else resources,
        **extra,
    }
    driver = build("sriov", section, tmp_path)
    assert isinstance(driver, SriovDriver)
    return driver


def ids(snapshot: Any, resource: str) -> list[str]:
    return [d.id for d in snapshot[resource]]


def by_id(snapshot: Any, resource: str) -> dict[str, Device]:
    return {d.id: d for d in snapshot[resource]}


def answer(driver: Driver[Any], resource: str, devices: list[Device]) -> ContainerEdits:
    """What the host sends: the devices' edits joined, then the driver's own."""
    return ContainerEdits.merge([d.edits for d in devices], driver.allocate(resource, devices))


# -- discovery ----------------------------------------------------------------------------


def test_the_simulated_node_is_split_as_configured(tree: SysfsTree, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    intel, mlx = tree.vfs(INTEL), tree.vfs(MLX)
    with caplog.at_level(logging.WARNING):
        snapshot = driver_for(tree, tmp_path).scan()
    assert ids(snapshot, NET) == intel[:6]
    assert ids(snapshot, RDMA) == mlx[:4]
    assert ids(snapshot, DPDK) == intel[6:] + mlx[4:]
    offered = {d.id for devices in snapshot.values() for d in devices}
    assert INTEL not in offered and MLX not in offered, "a PF with VFs is not offered"
    assert simulate.VIRTIO not in offered
    assert f"{simulate.VIRTIO} not offered: it carries the default route (eth0)" in caplog.text
    assert by_id(snapshot, NET)[intel[0]].numa_nodes == (0,) and by_id(snapshot, RDMA)[mlx[0]].numa_nodes == (1,)


def test_the_default_route_exclusion_is_said_once_and_follows_the_route(tree: SysfsTree, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    resources = [{"resourceName": "any"}]
    driver = driver_for(tree, tmp_path, resources)
    with caplog.at_level(logging.WARNING):
        driver.scan()
        driver.scan()
    assert caplog.text.count("carries the default route") == 1
    assert simulate.VIRTIO not in ids(driver.scan(), "intel.com/any")
    tree.set_default_route()
    assert simulate.VIRTIO in ids(driver.scan(), "intel.com/any")


def test_an_earlier_entry_claims_a_device_once(tree: SysfsTree, tmp_path: Path) -> None:
    resources = [{"resourceName": "first", "selectors": {"pciAddresses": [tree.vfs(INTEL)[0]]}}, {"resourceName": "rest", "selectors": {"vendors": ["8086"]}}]
    snapshot = driver_for(tree, tmp_path, resources).scan()
    assert ids(snapshot, "intel.com/first") == [tree.vfs(INTEL)[0]]
    assert ids(snapshot, "intel.com/rest") == tree.vfs(INTEL)[1:]


def test_pf_names_and_root_devices_take_vf_ranges(tree: SysfsTree, tmp_path: Path) -> None:
    resources = [
        {"resourceName": "by_name", "selectors": {"pfNames": ["ens1f0#0,2-3"]}},
        {"resourceName": "by_root", "selectors": {"rootDevices": [f"{MLX}#6-7"]}},
        {"resourceName": "whole_pf", "selectors": {"pfNames": ["ens2f0"]}},
    ]
    snapshot = driver_for(tree, tmp_path, resources).scan()
    intel, mlx = tree.vfs(INTEL), tree.vfs(MLX)
    assert ids(snapshot, "intel.com/by_name") == [intel[0], intel[2], intel[3]]
    assert ids(snapshot, "intel.com/by_root") == mlx[6:]
    assert ids(snapshot, "intel.com/whole_pf") == mlx[:6]


def test_link_types_rdma_drivers_devices_and_selector_lists(tree: SysfsTree, tmp_path: Path) -> None:
    resources = [
        {"resourceName": "ether_vfio", "selectors": {"linkTypes": ["ether"], "drivers": ["vfio-pci"], "pfNames": ["ens2f0"]}},
        {"resourceName": "ib", "selectors": {"linkTypes": ["infiniband"]}},
        {"resourceName": "rdma", "selectors": {"isRdma": True}},
        {"resourceName": "two", "selectors": [{"devices": ["1889"], "drivers": ["vfio-pci"]}, {"devices": ["101e"], "drivers": ["vfio-pci"]}]},
        {"resourceName": "ether", "selectors": {"linkTypes": ["ether"]}},
    ]
    snapshot = driver_for(tree, tmp_path, resources).scan()
    intel, mlx = tree.vfs(INTEL), tree.vfs(MLX)
    assert ids(snapshot, "intel.com/ether_vfio") == mlx[4:], "VFs without an interface take their PF's link type"
    assert ids(snapshot, "intel.com/ib") == []
    assert ids(snapshot, "intel.com/rdma") == mlx[:4]
    assert ids(snapshot, "intel.com/two") == intel[6:]
    assert ids(snapshot, "intel.com/ether") == intel[:6]


def test_a_pf_without_vfs_is_offered_and_accelerators_are_class_0x12(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path / "node", char_devices=False)
    tree.add_pci("0000:10:00.0", driver="ice", total_vfs=8, netdev="ens9", numa_node=0)
    tree.add_pci("0000:20:00.0", vendor=0x8086, device=0x0D90, pci_class=0x120000, driver="vfio-pci", numa_node=1)
    resources = [{"resourceName": "pf", "selectors": {"pfNames": ["ens9"]}}, {"resourceName": "fec", "deviceType": "accelerator", "excludeTopology": True}]
    driver = driver_for(tree, tmp_path, resources)
    snapshot = driver.scan()
    assert ids(snapshot, "intel.com/pf") == ["0000:10:00.0"]
    assert [(d.id, d.numa_nodes) for d in snapshot["intel.com/fec"]] == [("0000:20:00.0", ())]
    tree.set_numvfs("0000:10:00.0", 2)
    assert ids(driver.scan(), "intel.com/pf") == tree.vfs("0000:10:00.0")


# -- what a container gets -------------------------------------------------------------


def test_allocate_envs_info_and_vfio_nodes(tree: SysfsTree, tmp_path: Path) -> None:
    driver = driver_for(tree, tmp_path)
    snapshot = driver.scan()
    vfio = snapshot[DPDK][:2]
    edits = answer(driver, DPDK, vfio)
    key = "PCIDEVICE_INTEL_COM_SRIOV_DPDK"
    assert edits.envs[key] == f"{vfio[0].id},{vfio[1].id}"
    groups = [os.path.basename(os.readlink(tree.device_dir(d.id) / "iommu_group")) for d in vfio]
    assert list(edits.devices) == [
        DeviceNode(str(tree.dev / "vfio/vfio"), "/dev/vfio/vfio"),
        DeviceNode(str(tree.dev / "vfio" / groups[0]), f"/dev/vfio/{groups[0]}"),
        DeviceNode(str(tree.dev / "vfio" / groups[1]), f"/dev/vfio/{groups[1]}"),
    ]
    info = json.loads(edits.envs[key + "_INFO"])
    assert list(info) == [vfio[0].id, vfio[1].id]
    assert info[vfio[0].id] == {"generic": {"deviceID": vfio[0].id}, "vfio": {"mount": "/dev/vfio/vfio", "dev-mount": f"/dev/vfio/{groups[0]}"}}
    assert env_name("intel.com/a.b-c") == "PCIDEVICE_INTEL_COM_A_B_C"


def test_a_noiommu_group_maps_the_host_node_to_the_plain_group_number(tree: SysfsTree, tmp_path: Path) -> None:
    vf = tree.vfs(INTEL)[6]
    group = os.path.basename(os.readlink(tree.device_dir(vf) / "iommu_group"))
    (tree.sys / "kernel/iommu_groups" / group / "name").write_text("vfio-noiommu\n")
    driver = driver_for(tree, tmp_path)
    device = by_id(driver.scan(), DPDK)[vf]
    assert DeviceNode(str(tree.dev / "vfio" / f"noiommu-{group}"), f"/dev/vfio/{group}") in device.edits.devices


def test_rdma_devices_get_their_char_devices_and_info(tree: SysfsTree, tmp_path: Path) -> None:
    driver = driver_for(tree, tmp_path)
    device = driver.scan()[RDMA][0]
    ib = tree.dev / "infiniband"
    assert list(device.edits.devices) == [
        DeviceNode(str(ib / "uverbs2"), "/dev/infiniband/uverbs2"),
        DeviceNode(str(ib / "issm2"), "/dev/infiniband/issm2"),
        DeviceNode(str(ib / "umad2"), "/dev/infiniband/umad2"),
        DeviceNode(str(ib / "rdma_cm"), "/dev/infiniband/rdma_cm"),
    ]
    info = json.loads(driver.allocate(RDMA, [device]).envs["PCIDEVICE_INTEL_COM_MLNX_SRIOV_RDMA_INFO"])[device.id]
    assert info["rdma"] == {
        "rdma_dev": "mlx5_2",
        "uverbs": "/dev/infiniband/uverbs2",
        "issm": "/dev/infiniband/issm2",
        "umad": "/dev/infiniband/umad2",
        "rdma_cm": "/dev/infiniband/rdma_cm",
    }


def test_vhost_net_only_when_both_nodes_exist_and_additional_info(tree: SysfsTree, tmp_path: Path) -> None:
    vf = tree.vfs(INTEL)[0]
    extra = {"*": {"a": "1", "b": "2"}, vf: {"b": "3"}}
    resources = [{"resourceName": "vhost", "selectors": {"pciAddresses": [vf], "needVhostNet": True}, "additionalInfo": extra}]
    driver = driver_for(tree, tmp_path, resources)
    device = driver.scan()["intel.com/vhost"][0]
    assert [n.container_path for n in device.edits.devices] == ["/dev/vhost-net", "/dev/net/tun"]
    info = json.loads(driver.allocate("intel.com/vhost", [device]).envs["PCIDEVICE_INTEL_COM_VHOST_INFO"])[vf]
    assert info["vhost"] == {"net-mount": "/dev/vhost-net", "tun-mount": "/dev/net/tun"}
    assert info["extra"] == {"a": "1", "b": "3"}
    (tree.dev / "net/tun").unlink()
    device = driver.scan()["intel.com/vhost"][0]
    assert device.edits.devices == ()
    assert "vhost" not in json.loads(driver.allocate("intel.com/vhost", [device]).envs["PCIDEVICE_INTEL_COM_VHOST_INFO"])[vf]


# -- device-info files --------------------------------------------------------------------


def test_device_info_files_are_written_at_scan_and_removed_when_the_device_leaves(tree: SysfsTree, tmp_path: Path) -> None:
    driver = driver_for(tree, tmp_path)
    directory = tmp_path / "devinfo"
    stale = directory / device_info_name(NET, "0000:99:00.0")
    directory.mkdir()
    stale.write_text("{}")
    other = directory / "other.com-x-0000:99:00.0-device.json"
    other.write_text("{}")
    driver.scan()
    vf = tree.vfs(MLX)[0]
    path = directory / device_info_name(RDMA, vf)
    assert path.name == f"intel.com-mlnx_sriov_rdma-{vf}-device.json"
    assert json.loads(path.read_text()) == {"type": "pci", "version": "1.1.0", "pci": {"pci-address": vf, "rdma-device": "mlx5_2"}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert len(list(directory.glob("intel.com-*-device.json"))) == 16
    assert not stale.exists() and other.exists(), "stale files of our resources go, others' stay"
    inode = path.stat().st_ino
    driver.scan()
    assert path.stat().st_ino == inode, "an unchanged file is not rewritten"
    tree.set_numvfs(MLX, 0)
    driver.scan()
    assert not path.exists()
    assert (directory / device_info_name(RDMA, MLX)).exists(), "the PF, now without VFs, is offered itself"
    assert len(list(directory.glob("intel.com-*-device.json"))) == 9
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


def test_allocate_reads_nothing(tree: SysfsTree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver = driver_for(tree, tmp_path)
    devices = driver.scan()[RDMA]

    def no_io(*args: object, **kwargs: object) -> None:
        raise AssertionError("I/O in allocate")

    monkeypatch.setattr("builtins.open", no_io)
    monkeypatch.setattr(os, "open", no_io)
    monkeypatch.setattr(os, "stat", no_io)
    assert "PCIDEVICE_INTEL_COM_MLNX_SRIOV_RDMA_INFO" in driver.allocate(RDMA, devices).envs


# -- health -------------------------------------------------------------------------------


def test_vfs_follow_their_pfs_link(tree: SysfsTree, tmp_path: Path) -> None:
    driver = driver_for(tree, tmp_path)
    tree.set_carrier("ens1f0", False)
    snapshot = driver.scan()
    for device in snapshot[NET] + [d for d in snapshot[DPDK] if d.id in tree.vfs(INTEL)]:
        assert device.health is Health.UNHEALTHY and device.reason.startswith("PF ens1f0: link is up but has no carrier"), device
    assert all(d.healthy for d in snapshot[RDMA])
    tree.set_carrier("ens1f0", True)
    assert all(d.healthy for d in driver.scan()[NET])
    tree.set_up("ens1f0", False)
    assert all(d.healthy for d in driver.scan()[NET]), "an administratively down PF is not a fault"


def test_a_vf_whose_pf_is_gone_is_unhealthy(tree: SysfsTree, tmp_path: Path) -> None:
    driver = driver_for(tree, tmp_path)
    (tree.sys / "bus/pci/devices" / INTEL).unlink()
    device = by_id(driver.scan(), NET)[tree.vfs(INTEL)[0]]
    assert (device.health, device.reason) == (Health.UNHEALTHY, f"its PF {INTEL} is gone")


# -- events -------------------------------------------------------------------------------


def test_events_and_watched_paths(tree: SysfsTree, tmp_path: Path) -> None:
    driver = driver_for(tree, tmp_path)
    driver.scan()
    matches = {(m.subsystem, tuple(sorted(m.actions)), tuple(m.properties.items())) for m in driver.udev_matches()}
    assert ("pci", ("add", "bind", "remove", "unbind"), (("PCI_CLASS", "2????"),)) in matches
    assert ("net", ("add", "link", "move", "remove"), ()) in matches
    watched = set(driver.watch_paths())
    drivers = tree.sys / "bus/pci/drivers"
    assert {tree.sys / "bus/pci/devices", tree.sys / "class/net", drivers, drivers / "iavf", drivers / "vfio-pci", tree.device_dir(INTEL)} <= watched
    assert tree.device_dir(tree.vfs(MLX)[7]) not in watched, "a VF's rebind is seen in bus/pci/drivers, not by one watch per VF"
    assert tree.netdev_dir("ens1f0") in watched and tree.proc / "net" in watched


# -- this machine -------------------------------------------------------------------------


def test_on_this_machines_sys_the_default_route_nic_is_found_and_not_offered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from nodedev.drivers import netdev, pci

    routed = netdev.default_route_interfaces(Path("/proc/net"))
    owners = pci.PciTree(Path("/sys")).netdevs_by_address()
    carrying = [a for a, names in owners.items() if set(names) & routed]
    if not carrying:
        pytest.skip("no PCI function here carries the default route")
    section = {"enabled": True, "deviceInfoDir": str(tmp_path / "devinfo"), "resourceList": [{"resourceName": "all"}]}
    driver = build("sriov", section, tmp_path)
    with caplog.at_level(logging.WARNING):
        snapshot = driver.scan()
    for address in carrying:
        assert address not in ids(snapshot, "intel.com/all")
        assert f"{address} not offered: it carries the default route" in caplog.text
    assert driver.watch_paths() == (), "the real /sys and /proc send events; nothing to watch"


def test_a_renamed_pf_interface_moves_its_vfs_to_the_entry_naming_it(tree: SysfsTree, tmp_path: Path) -> None:
    resources = [{"resourceName": "old", "selectors": {"pfNames": ["ens1f0"]}}, {"resourceName": "new", "selectors": {"pfNames": ["uplink1"]}}]
    driver = driver_for(tree, tmp_path, resources)
    assert ids(driver.scan(), "intel.com/old") == tree.vfs(INTEL)
    tree.remove_netdev("ens1f0")
    tree.add_netdev(INTEL, "uplink1")
    snapshot = driver.scan()
    assert (ids(snapshot, "intel.com/old"), ids(snapshot, "intel.com/new")) == ([], tree.vfs(INTEL))


def test_on_the_real_sys_a_scan_rereads_the_functions_its_events_name(tree: SysfsTree, tmp_path: Path) -> None:
    """Where uevents name the device (the real /sys), only named and new functions are
    read again; a full scan (`changed` None) reads everything."""
    driver = driver_for(tree, tmp_path, [{"resourceName": "net", "selectors": {"drivers": ["iavf"]}}])
    driver.scan()
    driver._fixture_sysfs = False  # as on sysfs, where directory times say nothing
    vf, other = tree.vfs(INTEL)[0], tree.vfs(INTEL)[1]
    tree.bind(vf, "vfio-pci")
    assert vf in ids(driver.scan(changed={other}), "intel.com/net"), "not named: the last reading stands"
    assert vf not in ids(driver.scan(changed={vf}), "intel.com/net")
    tree.bind(vf, "iavf")
    assert vf in ids(driver.scan(None), "intel.com/net")


def test_a_node_with_nothing_to_offer_gets_no_device_info_directory(tree: SysfsTree, tmp_path: Path) -> None:
    driver = driver_for(tree, tmp_path, [{"resourceName": "none", "selectors": {"vendors": ["ffff"]}}])
    assert driver.scan() == {"intel.com/none": []}
    assert not (tmp_path / "devinfo").exists()
