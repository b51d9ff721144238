"""End to end: `nodedev serve` with the NVIDIA driver on the fake NVML, against the kubelet double."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodedev.api import deviceplugin_pb2 as pb
from nodedev.drivers.nvidia import simulate
from tests.kubelet import KubeletDouble

GPU = "nvidia.com/gpu"


pytestmark = pytest.mark.usefixtures("fake_nvml")


def serve(nodedev, node: simulate.SimulatedNode, **section: object):
    config = {
        "hotplug": {"resyncSeconds": 0},
        "drivers": {
            "nvidia": {
                **node.config_section(),
                "health": {"quietPeriodSeconds": 1, "probeIntervalSeconds": 0.2},
                **section,
            }
        },
    }
    env = {
        "LD_LIBRARY_PATH": str(simulate.fake_library_path().parent),
        simulate.ENV_FIXTURE: str(node.fixture),
        simulate.ENV_EVENTS: str(node.events_file),
    }
    return nodedev(config, env=env)


def test_kubelet_sees_gpus_allocates_and_follows_health(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    node = simulate.prepare(simulate.resolve_fixture("dgx-8"), tmp_path / "node")
    serve(nodedev, node, flags={"plugin": {"passDeviceSpecs": True}})
    kubelet.wait(lambda: GPU in kubelet.streaming(), timeout=10, what="nvidia.com/gpu streaming")
    uuids = [g.uuid for g in node.gpus]
    assert kubelet.devices(GPU) == {u: ("Healthy", (0,) if i < 4 else (1,)) for i, u in enumerate(uuids)}
    assert kubelet.options(GPU).get_preferred_allocation_available

    stub = kubelet.stub(GPU)
    preferred = stub.GetPreferredAllocation(
        pb.PreferredAllocationRequest(
            container_requests=[pb.ContainerPreferredAllocationRequest(available_deviceIDs=uuids, allocation_size=2)]
        ),
        timeout=5,
    )
    assert sorted(preferred.container_responses[0].deviceIDs) == sorted(uuids[2:4])

    response = stub.Allocate(
        pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=uuids[2:4])]), timeout=5
    )
    (container,) = response.container_responses
    nodes = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia2", "nvidia3"]
    assert container == pb.ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": ",".join(uuids[2:4])},
        devices=[pb.DeviceSpec(container_path=f"/dev/{n}", host_path=str(node.dev_root / n), permissions="rw") for n in nodes],
    )

    node.inject("xid 6 79")
    kubelet.wait(lambda: kubelet.devices(GPU)[uuids[6]][0] == "Unhealthy", timeout=2, what="GPU 6 Unhealthy")
    kubelet.wait(lambda: kubelet.devices(GPU)[uuids[6]][0] == "Healthy", timeout=5, what="GPU 6 Healthy again")


def test_replicas_volume_mounts_and_cdi_answer_as_nvidia_does(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    """Replicas of one GPU collapse to it once, in request order, in every list of the answer."""
    node = simulate.prepare(simulate.resolve_fixture("dgx-8"), tmp_path / "node")
    serve(
        nodedev,
        node,
        flags={"plugin": {"passDeviceSpecs": True, "deviceListStrategy": ["volume-mounts", "cdi-cri"]}},
        sharing={"timeSlicing": {"resources": [{"name": GPU, "replicas": 4}]}},
    )
    kubelet.wait(lambda: GPU in kubelet.streaming(), timeout=10, what="nvidia.com/gpu streaming")
    gpu3, gpu0 = node.gpus[3], node.gpus[0]
    ids = [f"{gpu3.uuid}::1", f"{gpu0.uuid}::0", f"{gpu3.uuid}::2"]

    response = kubelet.stub(GPU).Allocate(
        pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=ids)]), timeout=5
    )

    nodes = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia3", "nvidia0"]
    assert response.container_responses[0] == pb.ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
        mounts=[
            pb.Mount(container_path=f"/var/run/nvidia-container-devices/{g.uuid}", host_path="/dev/null") for g in (gpu3, gpu0)
        ],
        devices=[pb.DeviceSpec(container_path=f"/dev/{n}", host_path=str(node.dev_root / n), permissions="rw") for n in nodes],
        cdi_devices=[pb.CDIDevice(name=f"k8s.device-plugin.nvidia.com/gpu={g.uuid}") for g in (gpu3, gpu0)],
    )


def test_time_sliced_mig_resources_register_separately(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    node = simulate.prepare(simulate.resolve_fixture("mig"), tmp_path / "node")
    serve(
        nodedev,
        node,
        flags={"migStrategy": "mixed"},
        sharing={"timeSlicing": {"renameByDefault": True, "resources": [{"name": "nvidia.com/mig-1g.10gb", "replicas": 2}]}},
    )
    wanted = {GPU, "nvidia.com/mig-1g.10gb.shared", "nvidia.com/mig-2g.20gb", "nvidia.com/mig-3g.40gb"}
    kubelet.wait(lambda: kubelet.streaming() == wanted, timeout=10, what=f"{sorted(wanted)} streaming")
    assert len(kubelet.devices("nvidia.com/mig-1g.10gb.shared") or {}) == 14
    assert set(kubelet.devices("nvidia.com/mig-2g.20gb") or {}) == {m.uuid for m in node.migs if m.profile == "2g.20gb"}


def test_nvml_failure_is_logged_and_other_drivers_keep_serving(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    broken = tmp_path / "broken.conf"
    broken.write_text("init_error 9\n")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "vhost-net").write_text("")
    config = {
        "devRoot": str(tmp_path / "dev"),
        "hotplug": {"resyncSeconds": 0},
        "drivers": {"nvidia": {"enabled": True}, "vhost-net": {"enabled": True, "shares": 2}},
    }
    env = {"LD_LIBRARY_PATH": str(simulate.fake_library_path().parent), simulate.ENV_FIXTURE: str(broken)}
    process = nodedev(config, env=env)
    kubelet.wait(lambda: "devices.kubevirt.io/vhost-net" in kubelet.streaming(), timeout=10, what="vhost-net streaming")
    line = process.wait_log("libnvidia-ml.so.1", timeout=5)
    assert "Driver Not Loaded" in line
    assert GPU not in kubelet.streaming()


def test_a_gpu_plugged_after_start_is_served_and_one_removed_leaves(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    """The fixture's PCI directory is watched through the host's inotify: no uevent needed."""
    from tests.test_nvidia_hotplug import LATE_UUID, two_gpu_fixture

    node = simulate.prepare(two_gpu_fixture(tmp_path, second_present=False), tmp_path / "node")
    serve(nodedev, node)
    first = node.gpus[0].uuid
    kubelet.wait(lambda: set(kubelet.devices(GPU) or {}) == {first}, timeout=10, what="one GPU served")
    node.plug(1)
    kubelet.wait(lambda: set(kubelet.devices(GPU) or {}) == {first, LATE_UUID}, timeout=5, what="the plugged GPU served")
    assert kubelet.devices(GPU)[LATE_UUID] == ("Healthy", (1,))
    node.unplug(1)
    kubelet.wait(lambda: set(kubelet.devices(GPU) or {}) == {first}, timeout=5, what="the removed GPU gone")


def test_an_empty_resource_is_not_registered(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    """Mixed MIG with a time-sliced profile on a node without MIG: NVIDIA registers nvidia.com/gpu only."""
    node = simulate.prepare(simulate.resolve_fixture("gpu-1"), tmp_path / "node")
    process = serve(
        nodedev,
        node,
        flags={"migStrategy": "mixed"},
        sharing={"timeSlicing": {"resources": [{"name": "mig-1g.10gb", "replicas": 2}]}},
    )
    kubelet.wait(lambda: GPU in kubelet.streaming(), timeout=10, what="nvidia.com/gpu streaming")
    process.wait_log("serving 1 resource(s)", timeout=5)
    assert kubelet.streaming() == {GPU}


def test_mps_sharing_through_the_daemon(kubelet: KubeletDouble, nodedev, tmp_path: Path) -> None:
    node = simulate.prepare(simulate.resolve_fixture("gpu-1"), tmp_path / "node")
    mps_root = tmp_path / "mps"
    serve(
        nodedev,
        node,
        flags={"nvidiaDriverRoot": str(node.driver_root), "mpsRoot": str(mps_root)},
        sharing={"mps": {"resources": [{"name": "gpu", "replicas": 2}]}},
    )
    kubelet.wait(lambda: len(kubelet.devices(GPU) or {}) == 2, timeout=10, what="two MPS replicas served")
    ids = sorted(kubelet.devices(GPU))
    response = kubelet.stub(GPU).Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=ids[:1])]), timeout=5)
    (container,) = response.container_responses
    assert container.envs["CUDA_MPS_PIPE_DIRECTORY"] == "/mps/nvidia.com/gpu/pipe"
    assert {(m.host_path, m.container_path) for m in container.mounts} == {
        (f"{mps_root}/nvidia.com/gpu/pipe", "/mps/nvidia.com/gpu/pipe"),
        (f"{mps_root}/nvidia.com/gpu/log", "/mps/nvidia.com/gpu/log"),
        (f"{mps_root}/shm", "/dev/shm"),
    }
    assert ["nvidia-cuda-mps-control<", "set_default_active_thread_percentage", "50"] in node.calls()
