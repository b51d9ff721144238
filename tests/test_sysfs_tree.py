"""The fixture builder lays trees out as the kernel does: links of the kernel's shape,
resolving where real sysfs resolves, and mutations that behave like the kernel's."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nodedev.drivers.sysfs_tree import SysfsTree

PF = "0000:3b:00.0"


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    if os.geteuid() != 0:
        pytest.skip("mknod of character devices needs root")
    t = SysfsTree(tmp_path)
    t.add_pci(PF, driver="ice", total_vfs=8, netdev="ens1f0", numa_node=1)
    return t


def test_pci_links_have_the_kernels_shapes(tree: SysfsTree) -> None:
    sys = tree.sys
    assert os.readlink(sys / "bus/pci/devices" / PF) == f"../../../devices/pci0000:00/{PF}"
    assert os.readlink(sys / "devices/pci0000:00" / PF / "driver") == "../../../bus/pci/drivers/ice"
    assert os.readlink(sys / "bus/pci/drivers/ice" / PF) == f"../../../../devices/pci0000:00/{PF}"
    assert os.readlink(sys / "devices/pci0000:00" / PF / "iommu_group") == "../../../kernel/iommu_groups/0"
    assert os.readlink(sys / "kernel/iommu_groups/0/devices" / PF) == f"../../../../devices/pci0000:00/{PF}"
    assert os.readlink(sys / "class/net/ens1f0") == f"../../devices/pci0000:00/{PF}/net/ens1f0"
    assert os.readlink(sys / "class/net/ens1f0/device") == f"../../../{PF}"
    # every link resolves inside the tree, where the kernel's would
    assert os.path.realpath(sys / "class/net/ens1f0/device") == str(tree.device_dir(PF))
    assert os.path.realpath(sys / "bus/pci/devices" / PF / "driver") == str(sys / "bus/pci/drivers/ice")
    assert (sys / "bus/pci/devices" / PF / "class").read_text() == "0x020000\n"
    assert (sys / "bus/pci/devices" / PF / "numa_node").read_text() == "1\n"
    assert (sys / "bus/pci/devices" / PF / "sriov_totalvfs").read_text() == "8\n"


def test_numvfs_makes_vfs_with_physfn_and_virtfn_links(tree: SysfsTree) -> None:
    vfs = tree.set_numvfs(PF, 3)
    assert vfs == ["0000:3c:00.0", "0000:3c:00.1", "0000:3c:00.2"]
    pf_dir = tree.device_dir(PF)
    assert (pf_dir / "sriov_numvfs").read_text() == "3\n"
    assert [os.readlink(pf_dir / f"virtfn{i}") for i in range(3)] == [f"../{vf}" for vf in vfs]
    assert os.readlink(tree.device_dir(vfs[1]) / "physfn") == f"../{PF}"
    assert os.path.realpath(tree.sys / "class/net/ens1f0v1/device") == str(tree.device_dir(vfs[1]))
    assert (tree.device_dir(vfs[0]) / "numa_node").read_text() == "1\n"
    tree.set_numvfs(PF, 1)
    assert not tree.device_dir(vfs[2]).exists() and not (pf_dir / "virtfn1").exists()
    assert not (tree.sys / "class/net/ens1f0v2").exists() and not (tree.sys / "bus/pci/devices" / vfs[2]).exists()


def test_rebinding_to_vfio_swaps_the_netdev_for_a_group_node_and_back(tree: SysfsTree) -> None:
    (vf,) = tree.set_numvfs(PF, 1)
    link = tree.device_dir(vf) / "driver"
    tree.bind(vf, "vfio-pci")
    assert os.readlink(link) == "../../../bus/pci/drivers/vfio-pci"
    assert not (tree.sys / "bus/pci/drivers/iavf" / vf).exists()
    assert not (tree.sys / "class/net/ens1f0v0").exists()
    group = os.path.basename(os.readlink(tree.device_dir(vf) / "iommu_group"))
    assert stat.S_ISCHR(os.stat(tree.dev / "vfio" / group).st_mode)
    assert stat.S_ISCHR(os.stat(tree.dev / "vfio/vfio").st_mode)
    tree.bind(vf, "iavf")
    assert (tree.sys / "class/net/ens1f0v0").is_symlink()
    tree.unbind(vf)
    assert not link.exists() and not (tree.sys / "class/net/ens1f0v0").exists()


def test_virtio_style_netdev_sits_one_level_down(tmp_path: Path) -> None:
    t = SysfsTree(tmp_path, char_devices=False)
    t.add_pci("0000:00:03.0", vendor=0x1AF4, device=0x1041, driver="virtio-pci", netdev="eth0", netdev_sub="virtio2")
    assert os.readlink(t.sys / "class/net/eth0") == "../../devices/pci0000:00/0000:00:03.0/virtio2/net/eth0"
    assert os.readlink(t.sys / "class/net/eth0/device") == "../../../virtio2"


def test_carrier_and_removal(tree: SysfsTree) -> None:
    tree.set_numvfs(PF, 2)
    net = tree.netdev_dir("ens1f0")
    tree.set_up("ens1f0", True)
    tree.set_carrier("ens1f0", False)
    assert (net / "carrier").read_text() == "0\n" and (net / "operstate").read_text() == "down\n"
    tree.set_carrier("ens1f0", True)
    assert (net / "carrier").read_text() == "1\n"
    tree.remove(PF)
    assert os.listdir(tree.sys / "bus/pci/devices") == []
    assert os.listdir(tree.sys / "class/net") == []
    assert os.listdir(tree.sys / "kernel/iommu_groups") == []


def test_rdma_function_gets_class_links_and_char_devices(tree: SysfsTree) -> None:
    tree.add_rdma(PF, "mlx5_0", 0)
    assert os.readlink(tree.sys / "class/infiniband/mlx5_0") == f"../../devices/pci0000:00/{PF}/infiniband/mlx5_0"
    assert os.path.realpath(tree.sys / "class/infiniband/mlx5_0/device") == str(tree.device_dir(PF))
    for node in ("uverbs0", "umad0", "issm0", "rdma_cm"):
        assert stat.S_ISCHR(os.stat(tree.dev / "infiniband" / node).st_mode), node


def test_default_route_file_is_in_the_kernels_format(tmp_path: Path) -> None:
    from nodedev.drivers.netdev import default_route_interfaces

    t = SysfsTree(tmp_path, char_devices=False)
    t.set_default_route("eth0")
    assert default_route_interfaces(t.proc / "net") == {"eth0"}
