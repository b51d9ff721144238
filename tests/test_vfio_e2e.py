"""End to end: the real `nodedev serve` on a VFIO fixture tree that changes as a live node does
(a group member rebound to a host driver and back, a device bound to vfio-pci later, a
group node vanishing, mdevs removed and created, a device unplugged), seen by the kubelet
double with no restart; Allocate and PreStartContainer over gRPC. The periodic resync is
off, so only the tree's own events can explain an update."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from nodedev.api import deviceplugin_pb2 as pb
from nodedev.drivers.vfio import simulate
from nodedev.drivers.vfio.fixture import VfioFixture
from tests.conftest import NodedevProcess
from tests.kubelet import KubeletDouble, Lists
from tests.test_vfio import NVME, Q1, T4, T4_ENV, V100

EVENT_TIMEOUT = 3.0
"""Generous for a loaded 2-core machine shared with other tests; the figures are printed."""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the fixture's character devices need root (mknod)")


def allocate(kubelet: KubeletDouble, resource: str, ids: list[str]) -> pb.ContainerAllocateResponse:
    request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=ids)])
    (answer,) = kubelet.stub(resource).Allocate(request, timeout=5).container_responses
    return answer


def test_live_vfio_changes_reach_the_kubelet_without_a_restart(tmp_path: Path, kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess]) -> None:
    node = simulate.build(tmp_path / "node")
    section = {"enabled": True, "sysfsRoot": str(node.sys), "devRoot": str(node.dev), "checkVfioApi": False, **simulate.PERMITTED}
    process = nodedev({"hotplug": {"source": "auto", "resyncSeconds": 0}, "drivers": {"vfio": section}})
    lists = Lists(kubelet, EVENT_TIMEOUT)
    gpu, spare = simulate.T4_GPUS
    g = {name: str(node.group_of(name)) for name in (gpu, spare, simulate.HELD_GPU, simulate.SHARED_GPU, *simulate.NVMES, *simulate.MDEVS)}
    t4 = {g[gpu]: "Healthy", g[spare]: "Healthy", g[simulate.HELD_GPU]: "Unhealthy"}
    kubelet.wait(lambda: lists.view(T4) == t4 and lists.view(V100) == {g[simulate.SHARED_GPU]: "Healthy"}, timeout=10, what="the first lists")
    starts = process.line_count()
    assert kubelet.options(T4).pre_start_required

    answer = allocate(kubelet, T4, [g[gpu], g[spare]])
    assert answer.envs[T4_ENV] == f"{gpu},{spare}"
    assert [(d.container_path, d.permissions) for d in answer.devices] == [
        ("/dev/vfio/vfio", "mrw"),
        (f"/dev/vfio/{g[gpu]}", "mrw"),
        ("/dev/vfio/devices/vfio0", "mrw"),
        ("/dev/iommu", "mrw"),
        (f"/dev/vfio/{g[spare]}", "mrw"),
    ]
    kubelet.stub(V100).PreStartContainer(pb.PreStartContainerRequest(devices_ids=[g[simulate.SHARED_GPU]]), timeout=5)

    shared = g[simulate.SHARED_GPU]
    lists.after("a group member rebound to a host driver", lambda: node.bind(simulate.SHARED_AUDIO, "snd_hda_intel"), {V100: {shared: "Unhealthy"}})
    process.wait_log(f"{simulate.SHARED_AUDIO} (10de:10f2) is bound to snd_hda_intel, not vfio-pci", after=starts)
    with pytest.raises(grpc.RpcError) as refused:
        kubelet.stub(V100).PreStartContainer(pb.PreStartContainerRequest(devices_ids=[shared]), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Unhealthy" in str(refused.value.details())
    lists.after("the member back on vfio-pci", lambda: node.bind(simulate.SHARED_AUDIO, "vfio-pci"), {V100: {shared: "Healthy"}})

    lists.after("the GPU rebound to nvidia", lambda: node.bind(spare, "nvidia"), {T4: {**t4, g[spare]: "Unhealthy"}})
    lists.after("the GPU back on vfio-pci", lambda: node.bind(spare, "vfio-pci"), {T4: t4})
    lists.after("a group node removed", lambda: node.group_node(int(g[gpu])).unlink(), {T4: {**t4, g[gpu]: "Unhealthy"}})
    lists.after("the group node back", lambda: node.tree.add_char(f"vfio/{g[gpu]}", 241, int(g[gpu])), {T4: t4})

    added: dict[str, int] = {}

    def add_nvme() -> None:
        added["group"] = node.add_pci("0000:60:00.0", vendor=simulate.SAMSUNG, device=simulate.NVME, pci_class=simulate.CLASS_NVME, numa_node=1)

    nvmes = {g[a]: "Healthy" for a in simulate.NVMES}
    kubelet.wait(lambda: lists.view(NVME) == nvmes, timeout=EVENT_TIMEOUT, what="the NVMe list")
    lists.after("an NVMe bound to vfio-pci", add_nvme, {NVME: lambda: {**nvmes, str(added["group"]): "Healthy"}})
    unplugged = {**nvmes, g[simulate.NVMES[0]]: "Unhealthy", str(added["group"]): "Healthy"}
    lists.after("an NVMe unplugged", lambda: node.remove(simulate.NVMES[0]), {NVME: unplugged})

    first, second = list(simulate.MDEVS)[:2]
    lists.after("an mdev removed", lambda: node.remove_mdev(first), {Q1: {g[first]: "Unhealthy", g[second]: "Healthy"}})
    new = "4b20d080-1b54-4048-85b3-a6a62d165c09"
    lists.after(
        "an mdev created",
        lambda: node.add_mdev(simulate.VGPU_PARENT, new, "nvidia-222", "GRID T4-1Q"),
        {Q1: lambda: {g[first]: "Unhealthy", g[second]: "Healthy", str(node.group_of(new)): "Healthy"}},
    )
    answer = allocate(kubelet, Q1, [str(node.group_of(new))])
    assert answer.envs["MDEV_PCI_RESOURCE_NVIDIA_COM_GRID_T4-1Q"] == new
    print("milliseconds from the change to the kubelet's list:", {k: round(v, 1) for k, v in lists.took.items()})
    assert process.proc.poll() is None, "the daemon kept running through every change"


def test_a_vfio_node_appearing_after_start_is_picked_up(tmp_path: Path, kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess]) -> None:
    """vfio-pci not loaded at start (no driver directory, no /dev/vfio): the first binding is seen."""
    node = VfioFixture(tmp_path / "node")
    section = {"enabled": True, "sysfsRoot": str(node.sys), "devRoot": str(node.dev), "checkVfioApi": False, **simulate.PERMITTED}
    nodedev({"hotplug": {"source": "auto", "resyncSeconds": 0}, "drivers": {"vfio": section}})
    lists = Lists(kubelet, EVENT_TIMEOUT)
    kubelet.wait(lambda: lists.view(T4) == {}, timeout=10, what="an empty list")
    lists.after("the first GPU bound to vfio-pci", lambda: node.add_pci("0000:3b:00.0", vendor=simulate.NVIDIA, device=simulate.T4), {T4: {"0": "Healthy"}})


def test_a_real_pci_uevent_rescans_the_driver(tmp_path: Path, kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess]) -> None:
    """On the real /sys inotify sees nothing: the driver's `pci` match must catch the kernel's
    own event. A change the fixture hides from inotify (a group's `name` rewritten in a
    directory nobody watches) shows up only if the synthetic `bind` uevent of one of this
    machine's real PCI functions wakes the driver."""
    real = sorted(os.listdir("/sys/bus/pci/devices")) if os.path.isdir("/sys/bus/pci/devices") else []
    if not real:
        pytest.skip("this machine has no PCI function")
    node = VfioFixture(tmp_path / "node")
    group = node.add_pci("0000:3b:00.0", vendor=simulate.NVIDIA, device=simulate.T4)
    section = {"enabled": True, "sysfsRoot": str(node.sys), "devRoot": str(node.dev), "checkVfioApi": False, **simulate.PERMITTED}
    nodedev({"hotplug": {"source": "auto", "resyncSeconds": 0}, "drivers": {"vfio": section}})
    lists = Lists(kubelet, EVENT_TIMEOUT)
    kubelet.wait(lambda: lists.view(T4) == {str(group): "Healthy"}, timeout=10, what="the first list")
    (node.sys / "kernel" / "iommu_groups" / str(group) / "name").write_text("vfio-noiommu\n")  # in no watched directory
    lists.after("a kernel bind uevent", lambda: (Path("/sys/bus/pci/devices") / real[0] / "uevent").write_text("bind\n"), {T4: {str(group): "Unhealthy"}})
