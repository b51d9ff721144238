"""`--simulate sriov`: a node with two SR-IOV NICs, built with `sysfs_tree` under the workdir.

  * 0000:3b:00.0, Intel E810 (8086:1592, ice), `ens1f0`, NUMA 0, 8 VFs (8086:1889):
    VFs 0-5 on iavf (interfaces ens1f0v0..5), VFs 6-7 on vfio-pci.
  * 0000:5e:00.0, Mellanox ConnectX-6 Dx (15b3:101d, mlx5_core), `ens2f0`, NUMA 1,
    RDMA-capable (mlx5_0), 8 VFs (15b3:101e): VFs 0-3 on mlx5_core, each with its
    own RDMA device (mlx5_2..5), VFs 4-7 on vfio-pci.
  * 0000:00:03.0, a virtio NIC whose `eth0` (at `virtio2/net`) carries the default
    route: found, and never offered.

The section returned points only this driver's roots at the tree and writes the CNI
device-info files under the workdir, never under /var/run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nodedev.drivers.sysfs_tree import SysfsTree

NAME = "sriov"
INTEL_PF = "0000:3b:00.0"
MLX_PF = "0000:5e:00.0"
VIRTIO = "0000:00:03.0"

RESOURCE_LIST: list[dict[str, Any]] = [
    {"resourceName": "intel_sriov_netdevice", "selectors": {"vendors": ["8086"], "drivers": ["iavf"]}},
    {"resourceName": "mlnx_sriov_rdma", "selectors": {"vendors": ["15b3"], "drivers": ["mlx5_core"], "isRdma": True}},
    {"resourceName": "sriov_dpdk", "selectors": [{"drivers": ["vfio-pci"], "pfNames": ["ens1f0"]}, {"drivers": ["vfio-pci"]}]},
]


def build(root: Path) -> SysfsTree:
    """The tree described above, under `root` (char devices as files when not root)."""
    tree = SysfsTree(root, char_devices=os.geteuid() == 0)
    tree.add_pci(VIRTIO, vendor=0x1AF4, device=0x1041, driver="virtio-pci", netdev="eth0", netdev_sub="virtio2")
    tree.set_default_route("eth0")
    tree.add_pci(INTEL_PF, vendor=0x8086, device=0x1592, driver="ice", numa_node=0, total_vfs=64, netdev="ens1f0")
    tree.add_pci(MLX_PF, vendor=0x15B3, device=0x101D, driver="mlx5_core", numa_node=1, total_vfs=16, netdev="ens2f0")
    tree.add_rdma(MLX_PF, "mlx5_0", 0)
    for vf in tree.set_numvfs(INTEL_PF, 8, driver="iavf", vendor=0x8086, device=0x1889)[6:]:
        tree.bind(vf, "vfio-pci")
    for index, vf in enumerate(tree.set_numvfs(MLX_PF, 8, driver="mlx5_core", vendor=0x15B3, device=0x101E)):
        if index < 4:
            tree.add_rdma(vf, f"mlx5_{index + 2}", index + 2)
        else:
            tree.bind(vf, "vfio-pci")
    tree.add_char("vhost-net")
    tree.add_char("net/tun")
    return tree


def simulate(fixture: str, workdir: Path) -> dict[str, Any] | None:
    if fixture != NAME:
        return None
    tree = build(Path(workdir))
    return {
        "enabled": True,
        "sysfsRoot": str(tree.sys),
        "devRoot": str(tree.dev),
        "procRoot": str(tree.proc),
        "deviceInfoDir": str(Path(workdir) / "devinfo"),
        "resourceList": RESOURCE_LIST,
    }
