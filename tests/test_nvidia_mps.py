"""MPS sharing (issue 11, item 3): NVIDIA's config, the control daemon the driver runs
and supervises (a stand-in under the simulated driver root records what it is told),
and what Allocate adds."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from nodedev import config
from nodedev.driver import AllocationError, Health, Mount
from nodedev.drivers.nvidia import NvidiaOptions
from nodedev.drivers.nvidia.discovery import GPU, MigDevice
from nodedev.drivers.nvidia.resources import ResourceError, build_units
from tests.test_nvidia_parity import clean_environment, parse, sim
from tests.test_nvidia_sim import Sim

__all__ = ["clean_environment", "sim"]  # fixtures shared with test_nvidia_parity

GPU_RESOURCE = "nvidia.com/gpu"
CONTROL = "nvidia-cuda-mps-control"

pytestmark = pytest.mark.usefixtures("fake_nvml")


def mps(replicas: int = 4, **extra: object) -> dict[str, object]:
    return {"mps": {"resources": [{"name": "gpu", "replicas": replicas}], **extra}}


def started(sim: Callable[..., Sim], tmp_path: Path, fixture: str = "dgx-8", replicas: int = 4) -> Sim:
    return sim(fixture, flags={"mpsRoot": str(tmp_path / "mps")}, sharing=mps(replicas))


def told(s: Sim) -> list[str]:
    """What the control daemon was told through its pipe, in order."""
    return [" ".join(call[1:]) for call in s.node.calls() if call[0] == f"{CONTROL}<"]


# ---------------------------------------------------------------- config


def test_mps_config_as_nvidia_writes_it_is_accepted_with_requests_of_one_forced() -> None:
    options = parse({"flags": {"mpsRoot": "/run/nvidia/mps"}, "sharing": mps(failRequestsGreaterThanOne=False)})
    assert options.replicas == {GPU_RESOURCE: 4}
    assert "sharing.mps.failRequestsGreaterThanOne is always on, as NVIDIA's plugin forces it" in options.ignored()
    from nodedev.drivers.nvidia.allocate import AllocateSettings

    assert AllocateSettings.from_options(options).fail_requests_greater_than_one


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"sharing": mps()}, "sharing.mps needs flags.mpsRoot"),
        ({"flags": {"mpsRoot": "/run/nvidia/mps", "migStrategy": "mixed"}, "sharing": mps()}, "not supported with flags.migStrategy mixed"),
        ({"flags": {"mpsRoot": "mps"}, "sharing": mps()}, "drivers.nvidia.flags.mpsRoot"),
    ],
)
def test_mps_is_refused_where_nvidia_refuses_it(section: dict[str, object], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        parse(section)


def test_mps_wins_over_time_slicing_with_a_line_saying_so() -> None:
    options = parse({"flags": {"mpsRoot": "/run/nvidia/mps"}, "sharing": {**mps(2), "timeSlicing": {"resources": [{"name": "gpu", "replicas": 8}]}}})
    assert options.replicas == {GPU_RESOURCE: 2}
    assert any("sharing.timeSlicing ignored" in line for line in options.ignored())


def test_mps_on_mig_devices_is_refused() -> None:
    def mig_gpu(index: int) -> GPU:
        mig = MigDevice(uuid=f"MIG-{index}", index=f"{index}:0", gpu_instance=7, compute_instance=0, profile="1g.10gb", memory_mib=9856)
        return GPU(
            uuid=f"GPU-{index}",
            index=index,
            minor=index,
            bus_id=f"0000:0{index}:00.0",
            numa_node=0,
            name="A100",
            memory_mib=81920,
            mig_enabled=True,
            migs=(mig,),
        )

    options = NvidiaOptions.model_validate({"enabled": True, "flags": {"migStrategy": "single", "mpsRoot": "/run/nvidia/mps"}, "sharing": mps(2)})
    with pytest.raises(ResourceError, match="MPS is not supported for MIG devices"):
        build_units([mig_gpu(0), mig_gpu(1)], options)


# ---------------------------------------------------------------- the control daemon


def test_the_driver_starts_the_control_daemon_with_nvidias_limits(sim, tmp_path: Path) -> None:
    s = started(sim, tmp_path)
    devices = s.scan()[GPU_RESOURCE]
    assert len(devices) == 32 and all(d.health is Health.HEALTHY for d in devices.values())
    calls = s.node.calls()
    uuids = [g.uuid for g in s.node.gpus]
    assert [c[1:] for c in calls if c[0] == "nvidia-smi"] == [["-i", u, "-c", "EXCLUSIVE_PROCESS"] for u in uuids]
    pipe, log = tmp_path / "mps" / "nvidia.com" / "gpu" / "pipe", tmp_path / "mps" / "nvidia.com" / "gpu" / "log"
    assert [CONTROL, "-d"] in calls
    assert [f"{CONTROL}=", f"CUDA_MPS_PIPE_DIRECTORY={pipe}", f"CUDA_MPS_LOG_DIRECTORY={log}"] in calls
    assert pipe.is_dir() and log.is_dir()
    limits = [f"set_default_device_pinned_mem_limit {i} 20480M" for i in range(8)]  # 81920 MiB / 4 replicas
    assert told(s) == [*limits, "set_default_active_thread_percentage 25"]


def test_allocate_points_the_container_at_the_daemon(sim, tmp_path: Path) -> None:
    s = started(sim, tmp_path, "gpu-1", replicas=2)
    ids = sorted(s.scan()[GPU_RESOURCE])
    edits = s.allocate(GPU_RESOURCE, ids[:1])
    host = tmp_path / "mps"
    assert edits.envs == {
        "NVIDIA_VISIBLE_DEVICES": s.uuid(0),
        "CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe",
        "CUDA_MPS_LOG_DIRECTORY": "/mps/nvidia.com/gpu/log",
    }
    assert list(edits.mounts) == [
        Mount(f"{host}/nvidia.com/gpu/pipe", "/mps/nvidia.com/gpu/pipe"),
        Mount(f"{host}/nvidia.com/gpu/log", "/mps/nvidia.com/gpu/log"),
        Mount(f"{host}/shm", "/dev/shm"),
    ]
    with pytest.raises(AllocationError, match=r"sharing\.mps\.failRequestsGreaterThanOne allows one per container"):
        s.allocate(GPU_RESOURCE, ids)


def test_a_daemon_that_died_is_started_again_at_the_next_scan(sim, tmp_path: Path) -> None:
    s = started(sim, tmp_path, "gpu-1", replicas=2)
    s.scan()
    assert told(s)[-1] == "set_default_active_thread_percentage 50"
    (tmp_path / "mps" / "nvidia.com" / "gpu" / "pipe" / "control").unlink()  # the daemon is gone
    s.scan()
    assert [c for c in s.node.calls() if c == [CONTROL, "-d"]] == [[CONTROL, "-d"]] * 2
    assert told(s)[-1] == "set_default_active_thread_percentage 50"


def test_without_a_control_daemon_the_shared_devices_are_unhealthy_saying_why(sim, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "test.nvidia")
    control = tmp_path / "node" / "usr" / "bin" / CONTROL
    hidden = control.with_name("hidden")
    s = started(sim, tmp_path, "gpu-1", replicas=2)
    s.scan()
    control.rename(hidden)
    (tmp_path / "mps" / "nvidia.com" / "gpu" / "pipe" / "control").unlink()  # died, and cannot be started again
    devices = s.scan()[GPU_RESOURCE]
    assert {d.health for d in devices.values()} == {Health.UNHEALTHY}
    assert all(f"MPS control daemon not running: {CONTROL} not found under the driver root" in d.reason for d in devices.values())
    hidden.rename(control)
    assert {d.health for d in s.scan()[GPU_RESOURCE].values()} == {Health.HEALTHY}


def test_stop_quits_the_daemon_and_restores_the_compute_mode(sim, tmp_path: Path) -> None:
    s = started(sim, tmp_path, "gpu-1", replicas=2)
    s.scan()
    s.driver.stop()
    assert told(s)[-1] == "quit"
    assert s.node.calls()[-1] == ["nvidia-smi", "-i", s.uuid(0), "-c", "DEFAULT"]
