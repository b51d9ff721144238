"""End to end: the real `nodedev serve` on a fixture tree that changes as a live SR-IOV
node does (VFs created and destroyed, a VF rebound to vfio-pci and back, the PF's
carrier lost and back, the PF unplugged), seen by the kubelet double with no restart.
The periodic resync is off, so only the fixture tree's events can explain an update."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodedev.api import deviceplugin_pb2 as pb
from nodedev.drivers.sysfs_tree import SysfsTree
from tests.conftest import NodedevProcess
from tests.kubelet import KubeletDouble, Lists

PF = "0000:3b:00.0"
NET = "intel.com/sriov_net"
DPDK = "intel.com/sriov_dpdk"
EVENT_TIMEOUT = 3.0
"""Generous for a loaded 2-core machine shared with other tests; the figures are printed."""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the fixture's character devices need root (mknod)")


def config(tree: SysfsTree, info_dir: Path) -> dict[str, Any]:
    resources = [
        {"resourceName": "sriov_net", "selectors": {"drivers": ["iavf"]}},
        {"resourceName": "sriov_dpdk", "selectors": {"drivers": ["vfio-pci"], "pfNames": ["ens1f0"]}},
    ]
    section = {
        "enabled": True,
        "sysfsRoot": str(tree.sys),
        "devRoot": str(tree.dev),
        "procRoot": str(tree.proc),
        "deviceInfoDir": str(info_dir),
        "resourceList": resources,
    }
    return {"hotplug": {"source": "auto", "resyncSeconds": 0}, "drivers": {"sriov": section}}


def healthy(*ids: str) -> dict[str, str]:
    return dict.fromkeys(ids, "Healthy")


def test_live_vf_changes_reach_the_kubelet_without_a_restart(tmp_path: Path, kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess]) -> None:
    tree = SysfsTree(tmp_path / "node")
    tree.add_pci(PF, driver="ice", total_vfs=8, netdev="ens1f0", numa_node=1)
    info_dir = tmp_path / "devinfo"
    process = nodedev(config(tree, info_dir))
    lists = Lists(kubelet, EVENT_TIMEOUT)
    kubelet.wait(lambda: lists.view(NET) == {} and lists.view(DPDK) == {}, timeout=10, what="both resources streaming empty lists")
    starts = process.line_count()

    vfs = [tree.vf_address(PF, i) for i in range(4)]
    lists.after("4 VFs created", lambda: tree.set_numvfs(PF, 4), {NET: healthy(*vfs), DPDK: {}})
    assert kubelet.devices(NET)[vfs[0]][1] == (1,), "NUMA node in the topology"
    assert sorted(os.listdir(info_dir)) == sorted(f"intel.com-sriov_net-{vf}-device.json" for vf in vfs)

    lists.after("a VF rebound to vfio-pci", lambda: tree.bind(vfs[0], "vfio-pci"), {NET: healthy(*vfs[1:]), DPDK: healthy(vfs[0])})
    response = kubelet.stub(DPDK).Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=[vfs[0]])]), timeout=5)
    (answer,) = response.container_responses
    group = os.path.basename(os.readlink(tree.device_dir(vfs[0]) / "iommu_group"))
    assert answer.envs["PCIDEVICE_INTEL_COM_SRIOV_DPDK"] == vfs[0]
    assert json.loads(answer.envs["PCIDEVICE_INTEL_COM_SRIOV_DPDK_INFO"])[vfs[0]]["vfio"]["dev-mount"] == f"/dev/vfio/{group}"
    assert sorted(d.container_path for d in answer.devices) == sorted(["/dev/vfio/vfio", f"/dev/vfio/{group}"])
    assert (info_dir / f"intel.com-sriov_dpdk-{vfs[0]}-device.json").exists()
    assert not (info_dir / f"intel.com-sriov_net-{vfs[0]}-device.json").exists()

    lists.after("the VF rebound to iavf", lambda: tree.bind(vfs[0], "iavf"), {NET: healthy(*vfs), DPDK: {}})
    lists.after("the PF's carrier lost", lambda: tree.set_carrier("ens1f0", False), {NET: dict.fromkeys(vfs, "Unhealthy"), DPDK: {}})
    process.wait_log("link is up but has no carrier", after=starts)
    lists.after("the PF's carrier back", lambda: tree.set_carrier("ens1f0", True), {NET: healthy(*vfs), DPDK: {}})
    lists.after("VFs reduced to 2", lambda: tree.set_numvfs(PF, 2), {NET: healthy(*vfs[:2]), DPDK: {}})
    lists.after("the PF unplugged", lambda: tree.remove(PF), {NET: {}, DPDK: {}})
    assert os.listdir(info_dir) == []
    print("milliseconds from the change to the kubelet's list:", {k: round(v, 1) for k, v in lists.took.items()})
    assert process.proc.poll() is None, "the daemon kept running through every change"


def real_network_function() -> str | None:
    from nodedev.drivers import pci

    tree = pci.PciTree(Path("/sys"))
    return next((a for a in tree.addresses() if (d := tree.read_device(a)) is not None and d.base_class == pci.CLASS_NETWORK), None)


def test_a_real_pci_uevent_of_a_network_function_rescans_the_driver(tmp_path: Path, kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess]) -> None:
    """On the real /sys inotify sees nothing: the driver's UdevMatch (subsystem pci,
    PCI_CLASS glob in the kernel's spelling) must catch the kernel's own event. A
    function the fixture tree hides from inotify (a class rewritten in a directory
    nobody watches) shows up only if the synthetic `bind` uevent of this machine's
    real NIC wakes the driver, naming the function: the fixture's function at the
    real NIC's address is read again, and only because the event named it."""
    address = real_network_function()
    if address is None:
        pytest.skip("this machine has no PCI network function")
    tree = SysfsTree(tmp_path / "node")
    hidden = address
    tree.add_pci(hidden, pci_class=0x030000, driver="iavf")
    process = nodedev(config(tree, tmp_path / "devinfo"))
    lists = Lists(kubelet, EVENT_TIMEOUT)
    kubelet.wait(lambda: lists.view(NET) == {}, timeout=10, what="an empty list")
    (tree.device_dir(hidden) / "class").write_text("0x020000\n")  # in no watched directory
    lists.after("a kernel bind uevent", lambda: (Path("/sys/bus/pci/devices") / address / "uevent").write_text("bind\n"), {NET: healthy(hidden)})
    assert process.proc.poll() is None
