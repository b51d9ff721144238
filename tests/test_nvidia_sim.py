"""The NVIDIA driver through its contract, on the fake NVML (nodedev.drivers.nvidia.simulate).

Each test builds a simulated node, starts the driver with a HostContext whose
rescan() sets an Event, and looks at what scan(), allocate() and
preferred_allocation() return, as the host would: a container's answer is the
scanned devices' edits joined, plus what allocate() adds for the request. Health
tests inject events into the fake's control file and wait on the rescan Event or
on a log line, never on sleep().
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

from nodedev.driver import ContainerEdits, Device, DriverError, Health, HostContext
from nodedev.drivers.nvidia import NvidiaDriver, NvidiaOptions, simulate
from nodedev.drivers.nvidia.allocate import CDI_KIND, CDI_SPEC_FILE
from nodedev.drivers.nvidia.topology import id_order

GPU = "nvidia.com/gpu"
FAST_HEALTH = {"quietPeriodSeconds": 1, "probeIntervalSeconds": 0.2}


pytestmark = pytest.mark.usefixtures("fake_nvml")


class Sim:
    """A started driver on a simulated node, and the rescans it asked for."""

    def __init__(self, node: simulate.SimulatedNode, driver: NvidiaDriver, rescans: threading.Event) -> None:
        self.node = node
        self.driver = driver
        self.rescans = rescans
        self.latest: dict[str, dict[str, Device]] = {}

    def scan(self) -> dict[str, dict[str, Device]]:
        self.latest = {resource: {d.id: d for d in devices} for resource, devices in self.driver.scan().items()}
        return self.latest

    def allocate(self, resource: str, ids: list[str]) -> ContainerEdits:
        """A container's answer as the host assembles it from the latest scan."""
        devices = [self.latest[resource][i] for i in ids]
        return ContainerEdits.merge((d.edits for d in devices), self.driver.allocate(resource, devices))

    def uuid(self, index: int) -> str:
        return self.node.gpus[index].uuid

    def until(self, check: Callable[[dict[str, dict[str, Device]]], bool], timeout: float, what: str) -> dict[str, dict[str, Device]]:
        """Scans each time the driver asks for a rescan, until `check` holds (as the host would)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.rescans.wait(left):
                raise AssertionError(f"no rescan showed {what} within {timeout} s; last scan: {self.scan()}")
            self.rescans.clear()
            snapshot = self.scan()
            if check(snapshot):
                return snapshot


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    started: list[NvidiaDriver] = []

    def start(fixture: str, **section: Any) -> Sim:
        node = simulate.prepare(simulate.resolve_fixture(fixture), tmp_path / "node")
        rescans = threading.Event()
        host = HostContext(
            sysfs_root=node.sysfs_root,
            dev_root=node.dev_root,
            proc_root=node.proc_root,
            rescan=rescans.set,
            log=logging.getLogger("test.nvidia"),
        )
        section.setdefault("health", FAST_HEALTH)
        section.setdefault("cdiRoot", str(tmp_path / "cdi"))
        clock = section.pop("clock", None)
        options = NvidiaOptions.model_validate({"enabled": True, **section})
        driver = NvidiaDriver(options, host)
        if clock is not None:
            driver.clock = clock
        driver.start()
        started.append(driver)
        return Sim(node, driver, rescans)

    yield start
    for driver in started:
        driver.stop()


class ManualClock:
    """The driver's health clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LogLines(logging.Handler):
    """Log messages as they come, to wait on (with a timeout) from the test thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.cond:
            self.lines.append(record.getMessage())
            self.cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: any(text in line for line in self.lines), timeout):
                raise AssertionError(f"no log line with {text!r} within {timeout} s; got {self.lines}")


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    logger = logging.getLogger("test.nvidia")
    handler, level = LogLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def health(devices: dict[str, Device]) -> dict[str, str]:
    return {i: d.health.value for i, d in devices.items()}


# ---------------------------------------------------------------- discovery


def test_gpu1_is_one_healthy_gpu_on_its_numa_node(sim) -> None:
    s = sim("gpu-1")
    snapshot = s.scan()
    assert list(snapshot) == [GPU]
    (device,) = snapshot[GPU].values()
    assert device.id == s.uuid(0) and device.health is Health.HEALTHY and device.numa_nodes == (0,)
    assert "NVIDIA A100 80GB PCIe" in device.reason


def test_dgx8_reports_eight_gpus_on_two_numa_nodes(sim) -> None:
    s = sim("dgx-8")
    devices = s.scan()[GPU]
    assert list(devices) == [s.uuid(i) for i in range(8)]
    assert [d.numa_nodes for d in devices.values()] == [(0,)] * 4 + [(1,)] * 4


def test_mig_mixed_names_one_resource_per_profile(sim) -> None:
    s = sim("mig", flags={"migStrategy": "mixed"})
    snapshot = s.scan()
    assert {r: len(d) for r, d in snapshot.items()} == {
        GPU: 1,
        "nvidia.com/mig-1g.10gb": 7,
        "nvidia.com/mig-3g.40gb": 1,
        "nvidia.com/mig-2g.20gb": 2,
    }
    assert list(snapshot[GPU]) == [s.uuid(2)]
    assert list(snapshot["nvidia.com/mig-1g.10gb"]) == [m.uuid for m in s.node.migs if m.parent == 0]


def test_mig_none_offers_the_three_whole_gpus(sim) -> None:
    s = sim("mig", flags={"migStrategy": "none"})
    assert list(s.scan()) == [GPU] and len(s.scan()[GPU]) == 3


def test_mig_single_refuses_mixed_hardware_at_start(sim) -> None:
    with pytest.raises(DriverError, match="migStrategy single"):
        sim("mig", flags={"migStrategy": "single"})


def test_mig_allocation_passes_the_capability_nodes(sim) -> None:
    s = sim("mig", flags={"migStrategy": "mixed", "plugin": {"passDeviceSpecs": True}})
    s.scan()
    target = next(m for m in s.node.migs if m.gpu_instance_id == 3)
    allocation = s.allocate("nvidia.com/mig-2g.20gb", [target.uuid])
    assert allocation.envs == {"NVIDIA_VISIBLE_DEVICES": target.uuid}
    gi_cap = simulate.mig_cap_minor(1, 3)
    ci_cap = simulate.mig_cap_minor(1, 3, 0)
    dev = s.node.dev_root
    assert [(d.host_path, d.container_path) for d in allocation.devices] == [
        (str(dev / "nvidiactl"), "/dev/nvidiactl"),
        (str(dev / "nvidia-uvm"), "/dev/nvidia-uvm"),
        (str(dev / "nvidia-uvm-tools"), "/dev/nvidia-uvm-tools"),
        (str(dev / "nvidia-modeset"), "/dev/nvidia-modeset"),
        (str(dev / "nvidia1"), "/dev/nvidia1"),
        (str(dev / f"nvidia-caps/nvidia-cap{gi_cap}"), f"/dev/nvidia-caps/nvidia-cap{gi_cap}"),
        (str(dev / f"nvidia-caps/nvidia-cap{ci_cap}"), f"/dev/nvidia-caps/nvidia-cap{ci_cap}"),
    ]
    assert all(d.permissions == "rw" for d in allocation.devices)


def test_index_strategy_on_mig_uses_gpu_colon_mig_indices(sim) -> None:
    s = sim("mig", flags={"migStrategy": "mixed", "plugin": {"deviceIDStrategy": "index"}})
    ids = list(s.scan()["nvidia.com/mig-2g.20gb"])
    assert s.allocate("nvidia.com/mig-2g.20gb", ids).envs["NVIDIA_VISIBLE_DEVICES"] == "1:1,1:2"


def test_missing_control_nodes_are_not_passed(sim) -> None:
    s = sim("gpu-1", flags={"plugin": {"passDeviceSpecs": True}})
    (s.node.dev_root / "nvidia-modeset").unlink()
    (s.node.dev_root / "nvidia-uvm-tools").unlink()
    s.scan()
    allocation = s.allocate(GPU, [s.uuid(0)])
    assert [d.container_path for d in allocation.devices] == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0"]


def test_time_slicing_on_dgx8(sim) -> None:
    s = sim(
        "dgx-8",
        sharing={"timeSlicing": {"renameByDefault": True, "resources": [{"name": GPU, "replicas": 10}]}},
    )
    devices = s.scan()["nvidia.com/gpu.shared"]
    assert len(devices) == 80 and f"{s.uuid(3)}::9" in devices
    allocation = s.allocate("nvidia.com/gpu.shared", [f"{s.uuid(0)}::0", f"{s.uuid(0)}::5"])
    assert allocation.envs["NVIDIA_VISIBLE_DEVICES"] == s.uuid(0)
    # distributed: four replicas land on four different GPUs
    chosen = s.driver.preferred_allocation("nvidia.com/gpu.shared", list(devices), [], 4)
    assert len({c.split("::")[0] for c in chosen}) == 4


def test_cdi_spec_is_written_at_scan_and_allocate_names_its_devices(sim, tmp_path: Path) -> None:
    s = sim("mig", flags={"migStrategy": "mixed", "plugin": {"deviceListStrategy": "cdi-cri"}})
    spec_path = tmp_path / "cdi" / CDI_SPEC_FILE
    s.scan()
    spec = json.loads(spec_path.read_text())
    names = {d["name"] for d in spec["devices"]}
    assert {s.uuid(2), "2", s.node.migs[0].uuid, "0:0"} <= names
    spec_path.unlink()
    allocation = s.allocate(GPU, [s.uuid(2)])
    assert allocation.cdi_devices == (f"{CDI_KIND}={s.uuid(2)}",) and allocation.envs == {}
    assert not spec_path.exists()  # allocate does no I/O
    s.scan()
    assert spec_path.exists()  # the next scan puts it back


def test_cdi_spec_is_rewritten_only_when_it_changes(sim, tmp_path: Path) -> None:
    s = sim("dgx-8", flags={"plugin": {"deviceListStrategy": "cdi-annotations"}})
    spec_path = tmp_path / "cdi" / CDI_SPEC_FILE
    s.scan()
    first = os.stat(spec_path)
    for _ in range(3):
        s.scan()
    again = os.stat(spec_path)
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    (s.node.dev_root / "nvidia-modeset").unlink()  # a control node goes: the spec changes
    s.scan()
    changed = os.stat(spec_path)
    assert changed.st_ino != first.st_ino  # replaced by rename, never edited in place
    assert "nvidia-modeset" not in spec_path.read_text() and "nvidia-uvm-tools" in spec_path.read_text()


def test_annotations_name_the_devices_of_the_request(sim) -> None:
    s = sim("dgx-8", flags={"plugin": {"deviceListStrategy": "cdi-annotations", "deviceIDStrategy": "index"}})
    s.scan()
    allocation = s.allocate(GPU, [s.uuid(5), s.uuid(1)])
    ((key, value),) = allocation.annotations.items()
    assert key.startswith("cdi.k8s.io/nodedev-nvidia_")
    assert value == f"{CDI_KIND}=5,{CDI_KIND}=1"
    assert allocation.envs == {} and allocation.cdi_devices == () and allocation.devices == ()


# ---------------------------------------------------------------- preferred allocation


def test_preferred_allocation_reads_the_fixture_topology(sim) -> None:
    s = sim("dgx-8")
    all_ids = list(s.scan()[GPU])
    by_index = {s.uuid(i): i for i in range(8)}

    def pick(available: list[int], required: list[int], size: int) -> list[int]:
        chosen = s.driver.preferred_allocation(GPU, [s.uuid(i) for i in available], [s.uuid(i) for i in required], size)
        return sorted(by_index[c] for c in chosen)

    assert pick(list(range(8)), [], 2) == [2, 3]
    # 0-3 and 4-7 score the same: the tie goes to the set holding the lowest ID
    assert pick(list(range(8)), [], 4) == min([0, 1, 2, 3], [4, 5, 6, 7], key=lambda g: min(id_order(s.uuid(i)) for i in g))
    assert pick(list(range(8)), [4], 2) == [4, 7]
    assert pick([0, 1, 2, 4, 5, 6, 7], [], 1) == [2]
    assert len(s.driver.preferred_allocation(GPU, all_ids, [], 8)) == 8


def same_answer_in_any_order(s: Sim, resource: str, ids: list[str], seed: int) -> None:
    """Random requests, each asked in several orders, as the kubelet's map walk lists them."""
    rng = random.Random(seed)
    for _ in range(100):
        available = rng.sample(ids, rng.randint(2, len(ids)))
        size = rng.randint(1, min(8, len(available)))
        required = rng.sample(available, rng.randint(0, min(2, size)))
        answers = {
            tuple(s.driver.preferred_allocation(resource, rng.sample(available, len(available)), rng.sample(required, len(required)), size))
            for _ in range(6)
        }
        assert len(answers) == 1, (available, required, size, answers)


@pytest.mark.parametrize("seed", range(5))
def test_preferred_allocation_ignores_the_order_of_available_ids(sim, seed: int) -> None:
    s = sim("dgx-8")
    same_answer_in_any_order(s, GPU, list(s.scan()[GPU]), seed)


@pytest.mark.parametrize("seed", range(5))
def test_preferred_replicas_ignore_the_order_of_available_ids(sim, seed: int) -> None:
    s = sim("dgx-8", sharing={"timeSlicing": {"resources": [{"name": GPU, "replicas": 10}]}})
    same_answer_in_any_order(s, GPU, list(s.scan()[GPU]), seed)


# ---------------------------------------------------------------- health


def test_critical_xid_is_unhealthy_within_a_second_then_recovers(sim) -> None:
    s = sim("dgx-8")
    s.scan()
    s.node.inject("xid 3 48")
    snapshot = s.until(lambda snap: snap[GPU][s.uuid(3)].health is Health.UNHEALTHY, 1.0, "GPU 3 Unhealthy")
    assert "Xid 48" in snapshot[GPU][s.uuid(3)].reason
    assert [i for i, h in health(snapshot[GPU]).items() if h == "Unhealthy"] == [s.uuid(3)]
    s.until(lambda snap: snap[GPU][s.uuid(3)].health is Health.HEALTHY, 4.0, "GPU 3 Healthy again")


def test_ignored_xids_change_nothing(sim) -> None:
    s = sim("dgx-8")
    s.scan()
    s.node.inject("xid 0 13")
    s.node.inject("xid 0 43")
    s.node.inject("xid 1 79")  # a barrier: events are handled in order
    snapshot = s.until(lambda snap: snap[GPU][s.uuid(1)].health is Health.UNHEALTHY, 2.0, "GPU 1 Unhealthy")
    assert snapshot[GPU][s.uuid(0)].health is Health.HEALTHY


def test_configured_xid_lists_are_honoured(sim) -> None:
    s = sim("dgx-8", health={**FAST_HEALTH, "ignoredXids": [48], "criticalXids": [13]})
    s.scan()
    s.node.inject("xid 0 48")
    s.node.inject("xid 1 13")
    snapshot = s.until(lambda snap: snap[GPU][s.uuid(1)].health is Health.UNHEALTHY, 2.0, "GPU 1 Unhealthy")
    assert snapshot[GPU][s.uuid(0)].health is Health.HEALTHY


def test_double_bit_ecc_is_critical(sim) -> None:
    s = sim("gpu-1")
    s.scan()
    s.node.inject("ecc 0 dbe")
    snapshot = s.until(lambda snap: snap[GPU][s.uuid(0)].health is Health.UNHEALTHY, 1.0, "GPU 0 Unhealthy")
    assert "double-bit ECC" in snapshot[GPU][s.uuid(0)].reason


def test_mig_xid_is_attributed_to_its_instance(sim) -> None:
    s = sim("mig", flags={"migStrategy": "mixed"})
    s.scan()
    s.node.inject("xid 0 48 9 0")
    snapshot = s.until(
        lambda snap: any(d.health is Health.UNHEALTHY for d in snap["nvidia.com/mig-1g.10gb"].values()), 1.0, "a MIG Unhealthy"
    )
    hit = next(m.uuid for m in s.node.migs if m.parent == 0 and m.gpu_instance_id == 9)
    unhealthy = [i for i, h in health(snapshot["nvidia.com/mig-1g.10gb"]).items() if h == "Unhealthy"]
    assert unhealthy == [hit]
    assert "GPU instance 9" in snapshot["nvidia.com/mig-1g.10gb"][hit].reason
    # an Xid for the whole GPU hits all its MIG devices
    s.node.inject("xid 1 79")
    snapshot = s.until(lambda snap: snap["nvidia.com/mig-3g.40gb"] and all(
        d.health is Health.UNHEALTHY for d in snap["nvidia.com/mig-2g.20gb"].values()), 1.0, "GPU 1's MIGs Unhealthy")
    assert all(d.health is Health.UNHEALTHY for d in snapshot["nvidia.com/mig-3g.40gb"].values())
    assert snapshot[GPU][s.uuid(2)].health is Health.HEALTHY


def test_lost_gpu_is_unhealthy_until_it_answers_again(sim) -> None:
    s = sim("dgx-8")
    s.scan()
    s.node.inject("lost 5")
    snapshot = s.until(lambda snap: snap[GPU][s.uuid(5)].health is Health.UNHEALTHY, 1.0, "GPU 5 Unhealthy")
    assert len(snapshot[GPU]) == 8  # still advertised, as Unhealthy
    reason = snapshot[GPU][s.uuid(5)].reason
    assert "Xid 79" in reason and "GPU is lost" in reason
    s.node.inject("recover 5")
    snapshot = s.until(lambda snap: snap[GPU][s.uuid(5)].health is Health.HEALTHY, 4.0, "GPU 5 Healthy again")
    assert set(health(snapshot[GPU]).values()) == {"Healthy"}


def test_lost_gpu_does_not_recover_while_it_stays_lost(sim) -> None:
    s = sim("gpu-1", health={"quietPeriodSeconds": 0.3, "probeIntervalSeconds": 0.1})
    s.scan()
    s.node.inject("lost 0")
    s.until(lambda snap: snap[GPU][s.uuid(0)].health is Health.UNHEALTHY, 1.0, "GPU 0 Unhealthy")
    s.node.inject("xid 0 48")  # not delivered: the lost GPU answers nothing
    # Several quiet periods later, the probe still fails, so it stays Unhealthy.
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        s.rescans.wait(max(0.0, deadline - time.monotonic()))
        s.rescans.clear()
        assert s.scan()[GPU][s.uuid(0)].health is Health.UNHEALTHY


def test_event_thread_failure_makes_every_gpu_unhealthy_and_says_why(sim) -> None:
    s = sim("dgx-8", health={"quietPeriodSeconds": 30, "probeIntervalSeconds": 0.2})
    s.scan()
    s.node.inject("fail-wait")
    snapshot = s.until(
        lambda snap: all(d.health is Health.UNHEALTHY for d in snap[GPU].values()), 1.0, "every GPU Unhealthy"
    )
    assert all("Unknown Error" in d.reason and "health monitoring" in d.reason for d in snapshot[GPU].values())


def test_event_thread_failure_recovers_after_the_quiet_period(sim) -> None:
    s = sim("gpu-1")
    s.scan()
    s.node.inject("fail-wait")
    s.until(lambda snap: snap[GPU][s.uuid(0)].health is Health.UNHEALTHY, 1.0, "GPU Unhealthy")
    s.until(lambda snap: snap[GPU][s.uuid(0)].health is Health.HEALTHY, 5.0, "GPU Healthy again")
    # and events are watched again
    s.node.inject("xid 0 48")
    s.until(lambda snap: snap[GPU][s.uuid(0)].health is Health.UNHEALTHY, 1.0, "GPU Unhealthy after Xid 48")


def test_quiet_period_null_never_recovers(sim, log_lines: LogLines) -> None:
    clock = ManualClock()
    s = sim("gpu-1", health={"quietPeriodSeconds": None, "probeIntervalSeconds": 0.1}, clock=clock)
    s.scan()
    s.node.inject("xid 0 48")
    s.until(lambda snap: snap[GPU][s.uuid(0)].health is Health.UNHEALTHY, 1.0, "GPU Unhealthy")
    clock.now += 10**6  # far past any quiet period, and a probe is due
    # The thread probes after every event wait that finds the probe due, so once it has
    # handled one event after the jump it has probed before it handles the next.
    s.node.inject("xid 0 13")
    log_lines.wait_for("Xid 13 ignored", timeout=2.0)
    s.node.inject("xid 0 31")
    log_lines.wait_for("Xid 31 ignored", timeout=2.0)
    device = s.scan()[GPU][s.uuid(0)]
    assert device.health is Health.UNHEALTHY and device.reason == "Xid 48"


def test_quiet_period_is_measured_on_the_drivers_clock(sim, log_lines: LogLines) -> None:
    """The same sequence with a quiet period that the jump passes: the probe clears the GPU."""
    clock = ManualClock()
    s = sim("gpu-1", health={"quietPeriodSeconds": 300, "probeIntervalSeconds": 0.1}, clock=clock)
    s.scan()
    s.node.inject("xid 0 48")
    s.until(lambda snap: snap[GPU][s.uuid(0)].health is Health.UNHEALTHY, 1.0, "GPU Unhealthy")
    clock.now += 300
    s.until(lambda snap: snap[GPU][s.uuid(0)].health is Health.HEALTHY, 2.0, "GPU Healthy after the quiet period")


def test_health_off_starts_no_thread(sim) -> None:
    s = sim("gpu-1", health={"enabled": False})
    assert not any(t.name == "nvidia-health" for t in threading.enumerate())
    assert "health checks off" in s.scan()[GPU][s.uuid(0)].reason


def test_stop_ends_the_health_thread_within_a_second(sim) -> None:
    s = sim("dgx-8", health={})  # default 1 s event waits
    s.scan()
    started = time.monotonic()
    s.driver.stop()
    assert time.monotonic() - started < 1.5
    assert not any(t.name == "nvidia-health" for t in threading.enumerate())


# ---------------------------------------------------------------- NVML missing or failing


def broken_fixture(tmp_path: Path) -> Path:
    path = tmp_path / "broken.conf"
    path.write_text("init_error 9\n")
    return path


def test_nvml_init_failure_names_the_library_and_the_error(sim, tmp_path: Path) -> None:
    with pytest.raises(DriverError) as err:
        sim(str(broken_fixture(tmp_path)))
    assert "libnvidia-ml.so.1" in str(err.value) and "Driver Not Loaded" in str(err.value)


def test_missing_library_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", not_found)
    host = HostContext(Path("/sys"), Path("/dev"), Path("/proc"), lambda: None, logging.getLogger("test.nvidia"))
    driver = NvidiaDriver(NvidiaOptions(enabled=True), host)
    with pytest.raises(DriverError, match=r"libnvidia-ml\.so\.1: NVML Shared Library Not Found"):
        driver.start()


def test_fail_on_init_error_false_waits_and_retries_at_rescan(
    sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    s = sim(str(broken_fixture(tmp_path)), flags={"failOnInitError": False})
    assert "no NVML" in caplog.text and "waiting" in caplog.text
    assert s.scan() == {}, "no GPU yet: nvidia.com/gpu is not registered, as NVIDIA registers no empty resource"
    monkeypatch.setenv(simulate.ENV_FIXTURE, str(simulate.resolve_fixture("gpu-1")))
    snapshot = s.scan()
    assert list(snapshot[GPU]) == [simulate.load_fixture(simulate.resolve_fixture("gpu-1")).gpus[0].uuid]


# ---------------------------------------------------------------- real hardware


def _real_nvml() -> bool:
    if simulate.ENV_FIXTURE in __import__("os").environ:
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.gpu
def test_real_gpus_are_discovered() -> None:
    if simulate._loaded or not _real_nvml():  # the fake, once loaded, answers for NVML
        pytest.skip("needs a real NVIDIA GPU and driver")
    host = HostContext(Path("/sys"), Path("/dev"), Path("/proc"), lambda: None, logging.getLogger("test.nvidia"))
    driver = NvidiaDriver(NvidiaOptions(enabled=True), host)
    driver.start()
    try:
        devices = driver.scan()[GPU]
        assert devices and all(d.id.startswith("GPU-") for d in devices)
    finally:
        driver.stop()
