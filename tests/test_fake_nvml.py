"""The fake libnvidia-ml.so.1, exercised through the real pynvml bindings, and the NVIDIA
simulation that builds the trees around it (nodedev.drivers.nvidia.simulate)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from nodedev.drivers.nvidia import NvidiaDriver, simulate

XID_CRITICAL = pynvml.nvmlEventTypeXidCriticalError
NO_INSTANCE = 0xFFFFFFFF
WAIT_MS = 5000  # generous: the fake polls its control file every 10 ms


pytestmark = pytest.mark.usefixtures("fake_nvml")


class Session:
    """One nvmlInit..nvmlShutdown on a prepared node."""

    def __init__(self, node: simulate.SimulatedNode) -> None:
        self.node = node

    def handle(self, index: int) -> object:
        return pynvml.nvmlDeviceGetHandleByIndex(index)


def start(name: str, tmp_path: Path) -> Iterator[Session]:
    node = simulate.prepare(simulate.resolve_fixture(name), tmp_path / name)
    pynvml.nvmlInit()
    try:
        yield Session(node)
    finally:
        pynvml.nvmlShutdown()


@pytest.fixture
def gpu1(tmp_path: Path) -> Iterator[Session]:
    yield from start("gpu-1", tmp_path)


@pytest.fixture
def dgx(tmp_path: Path) -> Iterator[Session]:
    yield from start("dgx-8", tmp_path)


@pytest.fixture
def mig(tmp_path: Path) -> Iterator[Session]:
    yield from start("mig", tmp_path)


def wait_event(event_set: object, timeout_ms: int = WAIT_MS) -> pynvml.c_nvmlEventData_t:
    return pynvml.nvmlEventSetWait_v2(event_set, timeout_ms)


def nvlink_peers(handle: object) -> list[str]:
    """Remote bus ids of active links, the way NVIDIA's allocator walks them."""
    peers = []
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            if pynvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                continue
            peers.append(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)
        except pynvml.NVMLError_NotSupported:
            continue
    return peers


# ---- discovery ----


def test_single_gpu_discovery(gpu1: Session) -> None:
    assert pynvml.nvmlSystemGetDriverVersion() == "550.54.15"
    assert pynvml.nvmlSystemGetNVMLVersion() == "12.550.54.15"
    assert pynvml.nvmlDeviceGetCount() == 1
    h = gpu1.handle(0)
    assert pynvml.nvmlDeviceGetUUID(h) == "GPU-2a43cd68-f3a2-49c1-81a6-330fb8b294f9"
    assert pynvml.nvmlDeviceGetName(h) == "NVIDIA A100 80GB PCIe"
    assert pynvml.nvmlDeviceGetIndex(h) == 0
    assert pynvml.nvmlDeviceGetMinorNumber(h) == 0
    assert pynvml.nvmlDeviceGetCudaComputeCapability(h) == (8, 0)
    pci = pynvml.nvmlDeviceGetPciInfo(h)
    assert (pci.busId, pci.busIdLegacy) == ("00000000:07:00.0", "0000:07:00.0")
    assert (pci.domain, pci.bus, pci.device, pci.pciDeviceId) == (0, 7, 0, 0x20B510DE)
    assert pynvml.nvmlDeviceGetMemoryInfo(h).total == 81920 * 2**20
    v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    assert (v2.total, v2.free) == (81920 * 2**20, 81920 * 2**20)
    assert pynvml.nvmlDeviceGetMigMode(h) == [0, 0]
    assert pynvml.nvmlDeviceGetMaxMigDeviceCount(h) == 0
    assert nvlink_peers(h) == []


def test_handle_lookups(dgx: Session) -> None:
    uuid = pynvml.nvmlDeviceGetUUID(dgx.handle(5))
    assert pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(uuid)) == 5
    for bus_id in ("00000000:90:00.0", "0000:90:00.0", "0000:90:00.0".upper()):
        assert pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)) == 5
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000")
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetHandleByIndex(8)


def test_calls_before_init_are_uninitialized(tmp_path: Path) -> None:
    simulate.prepare(simulate.resolve_fixture("gpu-1"), tmp_path)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()


def test_init_without_fixture_says_driver_not_loaded(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    simulate.prepare(simulate.resolve_fixture("gpu-1"), tmp_path)  # loads the library
    del os.environ[simulate.ENV_FIXTURE]
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlInit()
    assert "NODEDEV_FAKE_NVML is not set" in capfd.readouterr().err


def test_bad_fixture_fails_init_naming_file_and_line(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    simulate.prepare(simulate.resolve_fixture("gpu-1"), tmp_path)
    bad = tmp_path / "bad.conf"
    bad.write_text("gpu 0\n  uuid GPU-x\n  colour green\n")
    os.environ[simulate.ENV_FIXTURE] = str(bad)
    with pytest.raises(pynvml.NVMLError_Unknown):
        pynvml.nvmlInit()
    assert f"{bad}:3: unknown GPU key 'colour'" in capfd.readouterr().err


def test_fixture_can_fail_init_like_a_missing_driver(tmp_path: Path) -> None:
    simulate.prepare(simulate.resolve_fixture("gpu-1"), tmp_path)
    fixture = tmp_path / "nodriver.conf"
    fixture.write_text("init_error 9\n")
    os.environ[simulate.ENV_FIXTURE] = str(fixture)
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlInit()


def test_reinit_switches_fixture(tmp_path: Path) -> None:
    for name, count in (("gpu-1", 1), ("dgx-8", 8), ("mig", 3)):
        simulate.prepare(simulate.resolve_fixture(name), tmp_path / name)
        pynvml.nvmlInit()
        try:
            assert pynvml.nvmlDeviceGetCount() == count
        finally:
            pynvml.nvmlShutdown()


def test_init_is_reference_counted(gpu1: Session) -> None:
    pynvml.nvmlInit()
    pynvml.nvmlShutdown()
    assert pynvml.nvmlDeviceGetCount() == 1  # still initialised once


def test_subprocess_finds_fake_through_ld_library_path(tmp_path: Path) -> None:
    node = simulate.prepare(simulate.resolve_fixture("dgx-8"), tmp_path)
    env = {**os.environ, **node.environ()}
    code = "import pynvml; pynvml.nvmlInit(); print(pynvml.nvmlDeviceGetCount())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "8"


# ---- NVLink and topology ----

DGX_NVLINKS = {
    (0, 3): 4, (0, 4): 4, (1, 2): 4, (1, 5): 4, (2, 3): 4, (4, 7): 4, (5, 6): 4, (6, 7): 4,
    (0, 1): 2, (0, 2): 2, (1, 3): 2, (2, 6): 2, (3, 7): 2, (4, 5): 2, (4, 6): 2, (5, 7): 2,
}  # fmt: skip


def test_dgx_nvlink_counts_and_remote_pci(dgx: Session) -> None:
    bus_to_index = {pynvml.nvmlDeviceGetPciInfo(dgx.handle(i)).busId: i for i in range(8)}
    for i in range(8):
        per_peer = Counter(bus_to_index[bus] for bus in nvlink_peers(dgx.handle(i)))
        expected = {b if a == i else a: n for (a, b), n in DGX_NVLINKS.items() if i in (a, b)}
        assert dict(per_peer) == expected, f"GPU {i}"
        assert sum(per_peer.values()) == 12


def test_nvlink_port_limits(dgx: Session) -> None:
    h = dgx.handle(0)
    assert pynvml.nvmlDeviceGetNvLinkState(h, 11) == 1
    with pytest.raises(pynvml.NVMLError_NotSupported):  # A100 has 12 links
        pynvml.nvmlDeviceGetNvLinkState(h, 12)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetNvLinkState(h, pynvml.NVML_NVLINK_MAX_LINKS)


def test_inactive_links_report_disabled(mig: Session) -> None:
    h = mig.handle(2)
    assert [pynvml.nvmlDeviceGetNvLinkState(h, link) for link in range(12)] == [0] * 12
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetNvLinkRemotePciInfo(h, 0)


def test_dgx_topology_levels(dgx: Session) -> None:
    def level(a: int, b: int) -> int:
        return pynvml.nvmlDeviceGetTopologyCommonAncestor(dgx.handle(a), dgx.handle(b))

    assert level(0, 0) == pynvml.NVML_TOPOLOGY_INTERNAL
    assert level(0, 1) == level(1, 0) == level(6, 7) == pynvml.NVML_TOPOLOGY_SINGLE
    assert level(0, 2) == level(1, 3) == level(4, 7) == pynvml.NVML_TOPOLOGY_NODE
    assert level(0, 4) == level(3, 7) == level(7, 0) == pynvml.NVML_TOPOLOGY_SYSTEM


# ---- MIG ----


def mig_devices(parent: object) -> list[object]:
    found = []
    for index in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(parent)):
        try:
            found.append(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, index))
        except pynvml.NVMLError_NotFound:
            continue
    return found


def test_mig_enumeration(mig: Session) -> None:
    gpu0, gpu1, gpu2 = (mig.handle(i) for i in range(3))
    assert [pynvml.nvmlDeviceGetMigMode(h) for h in (gpu0, gpu1, gpu2)] == [[1, 1], [1, 1], [0, 0]]
    assert [pynvml.nvmlDeviceGetMaxMigDeviceCount(h) for h in (gpu0, gpu1, gpu2)] == [7, 7, 0]

    first = mig_devices(gpu0)
    assert len(first) == 7
    assert [pynvml.nvmlDeviceGetGpuInstanceId(m) for m in first] == list(range(7, 14))
    assert {pynvml.nvmlDeviceGetComputeInstanceId(m) for m in first} == {0}
    assert {pynvml.nvmlDeviceGetName(m) for m in first} == {"NVIDIA A100-SXM4-80GB MIG 1g.10gb"}
    assert {pynvml.nvmlDeviceGetMemoryInfo(m).total for m in first} == {9856 * 2**20}

    second = mig_devices(gpu1)
    assert [pynvml.nvmlDeviceGetName(m).rsplit(" ", 1)[1] for m in second] == ["3g.40gb", "2g.20gb", "2g.20gb"]
    attrs = pynvml.nvmlDeviceGetAttributes(second[0])
    assert (attrs.gpuInstanceSliceCount, attrs.computeInstanceSliceCount, attrs.memorySizeMB) == (3, 3, 40192)
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu1, 3)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu1, 7)
    assert mig_devices(gpu2) == []


def test_mig_handles_relate_to_parent(mig: Session) -> None:
    parent = mig.handle(1)
    child = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 1)
    assert pynvml.nvmlDeviceIsMigDeviceHandle(child).value == 1
    assert pynvml.nvmlDeviceIsMigDeviceHandle(parent).value == 0
    back = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(child)
    assert pynvml.nvmlDeviceGetUUID(back) == pynvml.nvmlDeviceGetUUID(parent)
    uuid = pynvml.nvmlDeviceGetUUID(child)
    assert uuid == "MIG-53dd44a0-7568-4750-ad4d-a2e293eea3a1"
    by_uuid = pynvml.nvmlDeviceGetHandleByUUID(uuid)
    assert pynvml.nvmlDeviceGetGpuInstanceId(by_uuid) == 3
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetGpuInstanceId(parent)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(parent)


# ---- events ----


def registered_set(*handles: object, mask: int = XID_CRITICAL) -> object:
    event_set = pynvml.nvmlEventSetCreate()
    for handle in handles:
        pynvml.nvmlDeviceRegisterEvents(handle, mask, event_set)
    return event_set


def test_wait_times_out_without_events(gpu1: Session) -> None:
    event_set = registered_set(gpu1.handle(0))
    try:
        with pytest.raises(pynvml.NVMLError_Timeout):
            wait_event(event_set, 30)
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_injected_xid_reaches_a_waiting_thread_once(dgx: Session) -> None:
    event_set = registered_set(*(dgx.handle(i) for i in range(8)))
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(wait_event, event_set)
            # other threads keep querying while one sits in the wait
            assert pynvml.nvmlDeviceGetCount() == 8
            dgx.node.inject("xid 3 48")
            data = waiting.result(timeout=WAIT_MS / 1000 + 5)
        assert pynvml.nvmlDeviceGetIndex(data.device) == 3
        assert (data.eventType, data.eventData) == (XID_CRITICAL, 48)
        assert (data.gpuInstanceId, data.computeInstanceId) == (NO_INSTANCE, NO_INSTANCE)
        with pytest.raises(pynvml.NVMLError_Timeout):
            wait_event(event_set, 30)
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_events_respect_registration_mask_and_device(dgx: Session) -> None:
    event_set = registered_set(dgx.handle(0))
    pynvml.nvmlDeviceRegisterEvents(dgx.handle(1), pynvml.nvmlEventTypeDoubleBitEccError, event_set)
    try:
        dgx.node.inject("xid 2 31")  # GPU 2 is not registered
        dgx.node.inject("ecc 0 dbe")  # GPU 0 is registered for Xid only
        dgx.node.inject("ecc 1 sbe")  # GPU 1 is registered for DBE only
        dgx.node.inject("ecc 1 dbe")
        data = wait_event(event_set)
        assert pynvml.nvmlDeviceGetIndex(data.device) == 1
        assert data.eventType == pynvml.nvmlEventTypeDoubleBitEccError
        with pytest.raises(pynvml.NVMLError_Timeout):
            wait_event(event_set, 30)
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_events_before_registration_are_not_delivered(gpu1: Session) -> None:
    gpu1.node.inject("xid 0 13")
    event_set = registered_set(gpu1.handle(0))
    try:
        with pytest.raises(pynvml.NVMLError_Timeout):
            wait_event(event_set, 30)
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_unsupported_event_types_are_refused(gpu1: Session) -> None:
    assert pynvml.nvmlDeviceGetSupportedEventTypes(gpu1.handle(0)) == 0x11F
    event_set = pynvml.nvmlEventSetCreate()
    try:
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceRegisterEvents(gpu1.handle(0), pynvml.nvmlEventTypePowerSourceChange, event_set)
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_mig_xid_carries_instance_ids(mig: Session) -> None:
    event_set = registered_set(mig.handle(0))
    try:
        mig.node.inject("xid 0 43 9 0")
        data = wait_event(event_set)
        assert pynvml.nvmlDeviceGetUUID(data.device) == pynvml.nvmlDeviceGetUUID(mig.handle(0))
        assert (data.eventData, data.gpuInstanceId, data.computeInstanceId) == (43, 9, 0)
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_lost_gpu_then_recover(dgx: Session) -> None:
    h = dgx.handle(2)
    event_set = registered_set(h)
    try:
        dgx.node.inject("lost 2")
        data = wait_event(event_set)
        assert (data.eventType, data.eventData) == (XID_CRITICAL, 79)
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            pynvml.nvmlDeviceGetUUID(h)
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            pynvml.nvmlDeviceGetHandleByIndex(2)
        assert pynvml.nvmlDeviceGetCount() == 8
        assert pynvml.nvmlDeviceGetName(dgx.handle(3)) == "NVIDIA A100-SXM4-80GB"

        dgx.node.inject("recover 2")
        assert pynvml.nvmlDeviceGetUUID(h) == "GPU-73de8c59-36d6-4d09-a847-9eb43168cab3"
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_fail_wait_makes_the_next_wait_fail(gpu1: Session) -> None:
    event_set = registered_set(gpu1.handle(0))
    try:
        gpu1.node.inject("fail-wait health thread should die")
        with pytest.raises(pynvml.NVMLError_Unknown):
            wait_event(event_set)
        with pytest.raises(pynvml.NVMLError_Timeout):
            wait_event(event_set, 30)
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_bad_control_line_is_reported_and_skipped(gpu1: Session, capfd: pytest.CaptureFixture[str]) -> None:
    event_set = registered_set(gpu1.handle(0))
    try:
        gpu1.node.inject("xid 9 48")  # no GPU 9
        gpu1.node.inject("xid 0 48")
        assert wait_event(event_set).eventData == 48
        assert "ignoring bad control line" in capfd.readouterr().err
    finally:
        pynvml.nvmlEventSetFree(event_set)


# ---- simulate ----


def test_resolve_fixture_names_and_paths(tmp_path: Path) -> None:
    assert simulate.resolve_fixture("dgx-8") == simulate.FIXTURES_DIR / "dgx-8.conf"
    own = tmp_path / "own.conf"
    own.write_text("# my node\n\ngpu 0\n  uuid GPU-1\n")
    assert simulate.resolve_fixture(str(own)) == own
    with pytest.raises(simulate.FixtureError, match=r"dgx-8, gpu-1, mig"):
        simulate.resolve_fixture("dgx-9")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "netdev eth0\n", "\x00\xff\xfe"])
def test_files_that_are_not_nvml_fixtures_are_left_to_other_drivers(tmp_path: Path, text: str) -> None:
    other = tmp_path / "other.conf"
    other.write_bytes(text.encode("latin-1"))
    assert simulate.find_fixture(str(other)) is None
    assert NvidiaDriver.simulate(str(other), tmp_path / "work") is None
    assert not (tmp_path / "work").exists()  # nothing built, nothing loaded


def test_the_driver_lists_and_builds_its_simulations(tmp_path: Path) -> None:
    assert list(NvidiaDriver.simulations()) == ["dgx-8", "gpu-1", "mig"]
    section = NvidiaDriver.simulate("gpu-1", tmp_path)
    assert section == {
        "enabled": True,
        "sysfsRoot": str(tmp_path / "sys"),
        "devRoot": str(tmp_path / "dev"),
        "procRoot": str(tmp_path / "proc"),
        "cdiRoot": str(tmp_path / "cdi"),
        "flags": {"nvidiaDriverRoot": str(tmp_path)},
    }
    assert (tmp_path / "dev" / "nvidia0").exists()
    assert os.environ[simulate.ENV_FIXTURE] == str(simulate.FIXTURES_DIR / "gpu-1.conf")


def test_prepare_builds_sysfs_and_dev_trees(tmp_path: Path) -> None:
    node = simulate.prepare(simulate.resolve_fixture("dgx-8"), tmp_path)
    gpu7 = node.sysfs_root / "bus" / "pci" / "devices" / "0000:bd:00.0"
    assert (gpu7 / "numa_node").read_text() == "1\n"
    assert (gpu7 / "vendor").read_text() == "0x10de\n"
    assert (gpu7 / "device").read_text() == "0x20b2\n"
    assert (gpu7 / "class").read_text() == "0x030200\n"
    assert (gpu7 / "driver").resolve() == (node.sysfs_root / "bus" / "pci" / "drivers" / "nvidia").resolve()
    assert (node.sysfs_root / "bus" / "pci" / "devices" / "0000:07:00.0" / "numa_node").read_text() == "0\n"
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia0", "nvidia7"):
        assert (node.dev_root / name).exists(), name
    assert not (node.dev_root / "nvidia-caps").exists()
    assert node.events_file.read_text() == ""
    assert os.environ[simulate.ENV_FIXTURE] == str(simulate.FIXTURES_DIR / "dgx-8.conf")
    assert os.environ[simulate.ENV_EVENTS] == str(node.events_file)


def test_prepare_builds_mig_capability_files(tmp_path: Path) -> None:
    node = simulate.prepare(simulate.resolve_fixture("mig"), tmp_path)
    gi = node.proc_root / "driver" / "nvidia" / "capabilities" / "gpu1" / "mig" / "gi3"
    gi_minor = simulate.mig_cap_minor(1, 3)
    ci_minor = simulate.mig_cap_minor(1, 3, 0)
    assert (gi_minor, ci_minor) == (3 + 135 + 27, 3 + 135 + 27 + 1)
    assert f"DeviceFileMinor: {gi_minor}\n" in (gi / "access").read_text()
    assert f"DeviceFileMinor: {ci_minor}\n" in (gi / "ci0" / "access").read_text()
    for minor in (1, 2, gi_minor, ci_minor):
        assert (node.dev_root / "nvidia-caps" / f"nvidia-cap{minor}").exists()
    minors = (node.proc_root / "driver" / "nvidia-caps" / "mig-minors").read_text().splitlines()
    assert minors[:4] == ["config 1", "monitor 2", "gpu0/gi0/access 3", "gpu0/gi0/ci0/access 4"]
    assert f"gpu1/gi3/ci0/access {ci_minor}" in minors
