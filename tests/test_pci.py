"""Reading PCI functions from sysfs: fixture trees, and this machine's real /sys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodedev.drivers import pci
from nodedev.drivers.sysfs_tree import SysfsTree

PF = "0000:3b:00.0"
REAL_SYS = Path("/sys")


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    t = SysfsTree(tmp_path, char_devices=False)
    t.add_pci(PF, vendor=0x15B3, device=0x101D, driver="mlx5_core", total_vfs=4, netdev="ens1f0", numa_node=1)
    return t


def test_a_pf_and_its_vfs_are_read_whole(tree: SysfsTree) -> None:
    vfs = tree.set_numvfs(PF, 2, driver="mlx5_core", vendor=0x15B3, device=0x101E)
    tree.add_rdma(PF, "mlx5_0", 0)
    reader = pci.PciTree(tree.sys)
    assert reader.addresses() == sorted([PF, *vfs])
    pf = reader.read_device(PF)
    assert pf is not None
    assert (pf.vendor, pf.device, pf.pci_class, pf.base_class) == ("15b3", "101d", 0x020000, pci.CLASS_NETWORK)
    assert (pf.driver, pf.numa_node, pf.iommu_group, pf.iommu_group_name) == ("mlx5_core", 1, 0, None)
    assert (pf.is_pf, pf.is_vf, pf.total_vfs, pf.num_vfs, pf.virtfns) == (True, False, 4, 2, tuple(vfs))
    assert (pf.rdma_devices, pf.uverbs, pf.mad) == (("mlx5_0",), ("uverbs0",), ("issm0", "umad0"))
    vf = reader.read_device(vfs[1])
    assert vf is not None
    assert (vf.physfn, vf.is_vf, vf.is_pf, vf.device, vf.num_vfs) == (PF, True, False, "101e", 0)
    assert reader.netdevs_by_address() == {PF: ["ens1f0"], vfs[0]: ["ens1f0v0"], vfs[1]: ["ens1f0v1"]}
    assert reader.netdevs_by_address(["ens1f0v1", "missing"]) == {vfs[1]: ["ens1f0v1"]}


def test_unbound_and_vfio_and_noiommu(tree: SysfsTree) -> None:
    (vf,) = tree.set_numvfs(PF, 1, driver=None)
    reader = pci.PciTree(tree.sys)
    read = reader.read_device(vf)
    assert read is not None and read.driver is None
    tree.bind(vf, "vfio-pci")
    group = os.readlink(tree.device_dir(vf) / "iommu_group").rsplit("/", 1)[1]
    (tree.sys / "kernel/iommu_groups" / group / "name").write_text("vfio-noiommu\n")
    read = reader.read_device(vf)
    assert read is not None
    assert (read.driver, read.iommu_group, read.iommu_group_name) == ("vfio-pci", int(group), pci.NOIOMMU_GROUP_NAME)
    assert reader.netdevs_by_address() == {PF: ["ens1f0"]}


def test_a_vanished_or_garbled_device_reads_as_none(tree: SysfsTree) -> None:
    reader = pci.PciTree(tree.sys)
    assert reader.read_device("0000:99:00.0") is None
    (tree.device_dir(PF) / "vendor").write_text("garbage\n")
    assert reader.read_device(PF) is None


def test_numa_minus_one_is_none(tmp_path: Path) -> None:
    t = SysfsTree(tmp_path, char_devices=False)
    t.add_pci("0000:00:03.0", numa_node=-1)
    read = pci.PciTree(t.sys).read_device("0000:00:03.0")
    assert read is not None and read.numa_node is None and read.total_vfs is None and read.virtfns == ()


def test_pci_parent_walks_up_past_a_virtio_device(tmp_path: Path) -> None:
    t = SysfsTree(tmp_path, char_devices=False)
    t.add_pci("0000:00:03.0", driver="virtio-pci", netdev="eth0", netdev_sub="virtio2")
    assert pci.pci_parent(t.sys / "class/net/eth0/device") == "0000:00:03.0"
    assert pci.pci_parent(t.sys / "class/net/nothing/device") is None
    assert pci.PciTree(t.sys).netdevs_by_address() == {"0000:00:03.0": ["eth0"]}


def test_address_syntax() -> None:
    assert pci.is_pci_address("0000:3b:02.7")
    for bad in ("0000:3B:02.7", "3b:02.7", "0000:3b:02.8", "0000:3b:02.0x"):
        assert not pci.is_pci_address(bad), bad


def _real_network_functions() -> list[str]:
    if not (REAL_SYS / "bus/pci/devices").is_dir():
        return []
    tree = pci.PciTree(REAL_SYS)
    return [a for a in tree.addresses() if (d := tree.read_device(a)) is not None and d.base_class == pci.CLASS_NETWORK]


@pytest.mark.skipif(not _real_network_functions(), reason="this machine has no PCI network function in /sys")
def test_this_machines_real_nic_is_found_with_its_netdev() -> None:
    """The virtio NIC here is class 0x020000 and keeps its interface at `<pci>/virtio2/net`."""
    tree = pci.PciTree(REAL_SYS)
    owners = tree.netdevs_by_address()
    for address in _real_network_functions():
        device = tree.read_device(address)
        assert device is not None and device.base_class == pci.CLASS_NETWORK
        assert device.pci_class >> 8 == 0x0200, hex(device.pci_class)
        names = owners.get(address, [])
        assert names, f"{address}: no interface found through class/net/*/device"
        for name in names:
            assert os.path.realpath(REAL_SYS / "class/net" / name).startswith(os.path.realpath(tree.path(address)) + "/")
