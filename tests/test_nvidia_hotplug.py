"""GPUs that arrive or leave after start (issue 11, item 5): the fake NVML's plug/unplug,
and the driver following them without a restart."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

from nodedev.driver import Health, HostContext, UdevMatch
from nodedev.drivers.nvidia import NvidiaDriver, NvidiaOptions, simulate
from nodedev.hotplug.engine import fits
from nodedev.hotplug.uevents import Uevent
from tests.test_nvidia_sim import Sim

GPU = "nvidia.com/gpu"
LATE_UUID = "GPU-5e1a7c3b-0d2f-4b8e-9a61-7f3c2d1e0b9a"
LATE_BUS = "0000:8a:00.0"
LATE_GPU = f"""
gpu 1
  uuid {LATE_UUID}
  name NVIDIA A100 80GB PCIe
  bus_id 00000000:8A:00.0
  minor 1
  pci_device_id 0x20B510DE
  memory_total_mib 81920
  numa_node 1
  mig_mode 0 0
  supported_events 0x11F
  present {{present}}
"""

pytestmark = pytest.mark.usefixtures("fake_nvml")


def two_gpu_fixture(tmp_path: Path, *, second_present: bool) -> Path:
    """gpu-1's A100, and a second A100 that is on the bus at start or not."""
    path = tmp_path / "two.conf"
    path.write_text(simulate.resolve_fixture("gpu-1").read_text() + LATE_GPU.format(present=int(second_present)))
    return path


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    started: list[NvidiaDriver] = []

    def start(fixture: Path, **section: Any) -> Sim:
        node = simulate.prepare(fixture, tmp_path / "node")
        rescans = threading.Event()
        host = HostContext(node.sysfs_root, node.dev_root, node.proc_root, rescans.set, logging.getLogger("test.nvidia"))
        health = {"quietPeriodSeconds": 60, "probeIntervalSeconds": 0.1}
        driver = NvidiaDriver(NvidiaOptions.model_validate({**node.config_section(), "health": health, **section}), host)
        driver.start()
        started.append(driver)
        return Sim(node, driver, rescans)

    yield start
    for driver in started:
        driver.stop()


# ---------------------------------------------------------------- the fake


def test_fake_lists_a_plugged_gpu_from_the_next_init_and_loses_an_unplugged_one_at_once(tmp_path: Path) -> None:
    node = simulate.prepare(two_gpu_fixture(tmp_path, second_present=False), tmp_path / "node")
    assert not (node.sysfs_root / "bus" / "pci" / "devices" / LATE_BUS).exists()
    pynvml.nvmlInit()
    try:
        assert pynvml.nvmlDeviceGetCount() == 1
        with pytest.raises(pynvml.NVMLError_NotFound):
            pynvml.nvmlDeviceGetHandleByUUID(LATE_UUID)
        node.plug(1)
        assert (node.sysfs_root / "bus" / "pci" / "devices" / LATE_BUS / "vendor").read_text() == "0x10de\n"
        assert pynvml.nvmlDeviceGetCount() == 1, "NVML lists GPUs as of its initialisation"
    finally:
        pynvml.nvmlShutdown()
    pynvml.nvmlInit()
    try:
        assert pynvml.nvmlDeviceGetCount() == 2
        late = pynvml.nvmlDeviceGetHandleByIndex(1)
        assert pynvml.nvmlDeviceGetUUID(late) == LATE_UUID
        assert pynvml.nvmlDeviceGetIndex(late) == 1
        first = pynvml.nvmlDeviceGetHandleByIndex(0)
        node.unplug(0)
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            pynvml.nvmlDeviceGetMemoryInfo(first)
        assert pynvml.nvmlDeviceGetCount() == 2
    finally:
        pynvml.nvmlShutdown()
    pynvml.nvmlInit()
    try:
        assert pynvml.nvmlDeviceGetCount() == 1, "indices stay dense: the late GPU is index 0 now"
        assert pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(0)) == LATE_UUID
    finally:
        pynvml.nvmlShutdown()


def test_unplug_queues_xid_79_for_the_event_thread(tmp_path: Path) -> None:
    node = simulate.prepare(two_gpu_fixture(tmp_path, second_present=True), tmp_path / "node")
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(1)
        events = pynvml.nvmlEventSetCreate()
        pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, events)
        node.unplug(1, pci_gone=False)
        data = pynvml.nvmlEventSetWait_v2(events, 5000)
        assert (data.eventType, data.eventData) == (pynvml.nvmlEventTypeXidCriticalError, 79)
        assert (node.sysfs_root / "bus" / "pci" / "devices" / LATE_BUS).exists()
        pynvml.nvmlEventSetFree(events)
    finally:
        pynvml.nvmlShutdown()


# ---------------------------------------------------------------- the driver


def test_the_driver_asks_for_nvidia_pci_events_only() -> None:
    options = NvidiaOptions.model_validate({"enabled": True})
    host = HostContext(Path("/sys"), Path("/dev"), Path("/proc"), lambda: None, logging.getLogger("test.nvidia"))
    (match,) = NvidiaDriver(options, host).udev_matches()
    assert isinstance(match, UdevMatch) and match.subsystem == "pci"

    def event(action: str, pci_id: str) -> Uevent:
        return Uevent(action=action, subsystem="pci", sys_name=LATE_BUS, properties={"PCI_ID": pci_id})

    assert fits(match, event("add", "10DE:20B5"), [LATE_BUS])
    assert fits(match, event("bind", "10DE:20B5"), [LATE_BUS])
    assert fits(match, event("remove", "10DE:20B5"), [LATE_BUS])
    assert not fits(match, event("add", "8086:1572"), [LATE_BUS])


def test_a_gpu_that_arrives_is_listed_and_watched_without_a_restart(sim, tmp_path: Path) -> None:
    s = sim(two_gpu_fixture(tmp_path, second_present=False))
    assert list(s.scan()[GPU]) == [s.uuid(0)]
    s.node.plug(1)
    snapshot = s.driver.scan({LATE_BUS})  # what the host passes for the uevent
    devices = {d.id: d for d in snapshot[GPU]}
    assert list(devices) == [s.uuid(0), LATE_UUID]
    assert devices[LATE_UUID].health is Health.HEALTHY and devices[LATE_UUID].numa_nodes == (1,)
    s.scan()
    s.rescans.clear()
    s.node.inject("xid 1 48")
    s.until(lambda snap: snap[GPU][LATE_UUID].health is Health.UNHEALTHY, 2, "the new GPU Unhealthy after its Xid")


def test_a_full_rescan_finds_an_arrived_gpu_too(sim, tmp_path: Path) -> None:
    """A fixture tree sends no uevents: the host's watch on the PCI directory causes a full scan."""
    s = sim(two_gpu_fixture(tmp_path, second_present=False))
    assert s.node.sysfs_root / "bus" / "pci" / "devices" in s.driver.watch_paths()
    s.scan()
    s.node.plug(1)
    assert list(s.scan()[GPU]) == [s.uuid(0), LATE_UUID]


def test_an_uevent_for_another_device_does_not_reinitialise_nvml(sim, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "test.nvidia")
    s = sim(two_gpu_fixture(tmp_path, second_present=False))
    s.scan()
    s.node.plug(1)
    assert [d.id for d in s.driver.scan({"0000:00:1f.0"})[GPU]] == [s.uuid(0)], "only the named addresses are looked at"
    assert "initialising NVML again" not in caplog.text


def test_a_removed_gpu_is_unhealthy_at_once_and_leaves_when_its_pci_device_goes(sim, tmp_path: Path) -> None:
    s = sim(two_gpu_fixture(tmp_path, second_present=True))
    assert list(s.scan()[GPU]) == [s.uuid(0), LATE_UUID]
    s.rescans.clear()
    s.node.unplug(1, pci_gone=False)
    s.until(lambda snap: snap[GPU][LATE_UUID].health is Health.UNHEALTHY, 2, "the unplugged GPU Unhealthy")
    assert "79" in s.latest[GPU][LATE_UUID].reason or "lost" in s.latest[GPU][LATE_UUID].reason
    snapshot = s.scan()
    assert snapshot[GPU][s.uuid(0)].health is Health.HEALTHY and LATE_UUID in snapshot[GPU], "still on the bus: stays, Unhealthy"
    simulate.remove_pci_device(s.node.sysfs_root, LATE_BUS)
    assert [d.id for d in s.driver.scan({LATE_BUS})[GPU]] == [s.uuid(0)]
    s.node.inject("xid 0 48")
    s.rescans.clear()
    s.until(lambda snap: snap[GPU][s.uuid(0)].health is Health.UNHEALTHY, 2, "the remaining GPU still watched")


def test_a_resource_whose_last_gpu_left_stays_registered_empty(sim, tmp_path: Path) -> None:
    s = sim(simulate.resolve_fixture("gpu-1"))
    assert list(s.scan()[GPU]) == [s.uuid(0)]
    s.node.unplug(0)
    assert s.scan() == {GPU: {}}


def test_a_gpu_nvml_never_lists_costs_one_reinitialisation(sim, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An NVIDIA GPU on the bus that NVML does not list (NVML's own view, or a race with the
    driver's bind) is tried once, and again only after its PCI device went and came back."""
    caplog.set_level(logging.INFO, "test.nvidia")
    s = sim(two_gpu_fixture(tmp_path, second_present=False))
    simulate.add_pci_device(s.node.sysfs_root, s.node.gpus[1])  # on the bus, unknown to NVML

    def reinits() -> int:
        return sum("initialising NVML again" in r.getMessage() for r in caplog.records)

    for _ in range(3):
        assert [d.id for d in s.driver.scan()[GPU]] == [s.uuid(0)]
    assert reinits() == 1
    simulate.remove_pci_device(s.node.sysfs_root, LATE_BUS)
    s.driver.scan({LATE_BUS})
    s.node.plug(1)
    assert [d.id for d in s.driver.scan({LATE_BUS})[GPU]] == [s.uuid(0), LATE_UUID]
    assert reinits() == 2
