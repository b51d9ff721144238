"""Node labels: drivers' `labels()`, merged and written as a Node Feature Discovery local feature file."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodedev import config, drivers, labels
from nodedev.driver import HostContext
from nodedev.drivers.nvidia import gfd, simulate
from nodedev.drivers.nvidia.discovery import GPU, MigDevice
from nodedev.drivers.nvidia.driver import NvidiaDriver
from nodedev.drivers.nvidia.options import NvidiaOptions
from nodedev.inventory import Inventory
from tests.test_contract import IO_CALLS, build, section_for

GPU_PRESENT = "nvidia.com/gpu.present"


@pytest.fixture
def restored_environ() -> Iterator[None]:
    """A simulation sets variables (which fake library to load, and what it reads)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def driver_labels(name: str, workdir: Path, fixture: str | None = None, **extra: Any) -> dict[str, str]:
    """Starts driver `name` on its simulated node (or its contract node), scans once, returns labels()."""
    cls = drivers.load(name)
    section = {**cls.simulate(fixture, workdir), "enabled": True} if fixture else section_for(name, workdir)
    driver = build(name, {**section, **extra}, workdir)
    driver.start()
    try:
        driver.scan()
        return dict(driver.labels())
    finally:
        driver.stop()


# -- NVIDIA: GPU Feature Discovery's names and values -----------------------------------------


@pytest.mark.usefixtures("fake_nvml", "restored_environ")
def test_nvidia_labels_eight_gpus_as_gpu_feature_discovery_does(tmp_path: Path) -> None:
    assert driver_labels("nvidia", tmp_path, "dgx-8") == {
        GPU_PRESENT: "true",
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
        "nvidia.com/gpu.count": "8",
        "nvidia.com/gpu.memory": "81920",
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/gpu.sharing-strategy": "none",
    }


@pytest.mark.usefixtures("fake_nvml", "restored_environ")
def test_time_sliced_gpus_are_labelled_shared_with_their_replicas(tmp_path: Path) -> None:
    sharing = {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 4}]}}
    found = driver_labels("nvidia", tmp_path, "gpu-1", sharing=sharing)
    assert found["nvidia.com/gpu.product"] == "NVIDIA-A100-80GB-PCIe-SHARED"
    assert (found["nvidia.com/gpu.replicas"], found["nvidia.com/gpu.sharing-strategy"], found["nvidia.com/gpu.count"]) == ("4", "time-slicing", "1")


@pytest.mark.usefixtures("fake_nvml", "restored_environ")
def test_renamed_shared_gpus_keep_the_plain_product(tmp_path: Path) -> None:
    sharing = {"timeSlicing": {"renameByDefault": True, "resources": [{"name": "gpu", "replicas": 2}]}}
    found = driver_labels("nvidia", tmp_path, "gpu-1", sharing=sharing)
    assert found["nvidia.com/gpu.product"] == "NVIDIA-A100-80GB-PCIe"
    assert found["nvidia.com/gpu.replicas"] == "2"


@pytest.mark.usefixtures("fake_nvml", "restored_environ")
def test_mixed_mig_labels_each_profile_resource_and_the_strategy(tmp_path: Path) -> None:
    found = driver_labels("nvidia", tmp_path, "mig", flags={"migStrategy": "mixed"})
    assert found["nvidia.com/mig.strategy"] == "mixed"
    assert found["nvidia.com/mig-1g.10gb.product"] == "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb"
    assert found["nvidia.com/mig-1g.10gb.count"] == "7"
    assert found["nvidia.com/mig-2g.20gb.count"] == "2"
    assert found["nvidia.com/mig-3g.40gb.replicas"] == "1"
    assert found[GPU_PRESENT] == "true"


@pytest.mark.usefixtures("fake_nvml", "restored_environ")
def test_no_mig_strategy_label_without_a_mig_strategy(tmp_path: Path) -> None:
    """GFD labels mig.strategy only for single and mixed."""
    found = driver_labels("nvidia", tmp_path, "mig")
    assert "nvidia.com/mig.strategy" not in found and not any(key.startswith("nvidia.com/mig-") for key in found)


@pytest.mark.usefixtures("fake_nvml", "restored_environ")
def test_a_gpu_that_leaves_changes_the_count_at_the_next_scan(tmp_path: Path) -> None:
    node = simulate.prepare(simulate.resolve_fixture("dgx-8"), tmp_path / "node")
    host = HostContext(node.sysfs_root, node.dev_root, node.proc_root, lambda: None, logging.getLogger("test.labels"))
    driver = NvidiaDriver(NvidiaOptions.model_validate({"enabled": True, "cdiRoot": str(tmp_path / "cdi")}), host)
    driver.start()
    try:
        driver.scan()
        assert driver.labels()["nvidia.com/gpu.count"] == "8"
        node.unplug(3)
        driver.scan()
        assert driver.labels()["nvidia.com/gpu.count"] == "7"
    finally:
        driver.stop()


def _gpu(index: int, migs: tuple[MigDevice, ...] = (), name: str = "NVIDIA A100-SXM4-40GB") -> GPU:
    return GPU(f"GPU-{index}", index, index, f"0000:0{index}:00.0", 0, name, 40960, mig_enabled=bool(migs), migs=migs)


def _mig(gpu: int, slot: int, profile: str = "1g.5gb") -> MigDevice:
    return MigDevice(f"MIG-{gpu}-{slot}", f"{gpu}:{slot}", slot, 0, profile, 4864)


def test_single_mig_labels_the_gpu_resource_with_the_mig_profile() -> None:
    from nodedev.drivers.nvidia.discovery import Discovery

    gpus = (_gpu(0, (_mig(0, 0), _mig(0, 1))), _gpu(1, (_mig(1, 0),)))
    options = NvidiaOptions.model_validate({"enabled": True, "flags": {"migStrategy": "single"}})
    found = gfd.node_labels(Discovery(gpus, {}, {}), (), options)
    assert found["nvidia.com/mig.strategy"] == "single"
    assert found["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"
    assert (found["nvidia.com/gpu.count"], found["nvidia.com/gpu.memory"]) == ("3", "4864")
    # a GPU that left the bus is not counted
    assert gfd.node_labels(Discovery(gpus, {}, {}), {"0000:01:00.0"}, options)["nvidia.com/gpu.count"] == "2"
    assert gfd.node_labels(None, (), options) == {}


def test_product_names_are_sanitised_as_gfd_does() -> None:
    assert gfd.sanitise("NVIDIA  GeForce RTX 4090 (rev a1)") == "NVIDIA-GeForce-RTX-4090-rev-a1"


# -- NICs: Node Feature Discovery's names ---------------------------------------------------


@pytest.mark.usefixtures("restored_environ")
def test_sriov_labels_a_node_with_capable_and_configured_pfs(tmp_path: Path) -> None:
    assert driver_labels("sriov", tmp_path, "sriov") == {
        "feature.node.kubernetes.io/network-sriov.capable": "true",
        "feature.node.kubernetes.io/network-sriov.configured": "true",
    }


@pytest.mark.usefixtures("restored_environ")
def test_rdma_labels_a_node_with_hcas(tmp_path: Path) -> None:
    assert driver_labels("rdma", tmp_path, "infiniband") == {
        "feature.node.kubernetes.io/rdma.capable": "true",
        "feature.node.kubernetes.io/rdma.available": "true",
    }


@pytest.mark.usefixtures("restored_environ")
@pytest.mark.parametrize("name", sorted(drivers.NAMES))
def test_every_drivers_labels_are_valid_and_cost_no_io(name: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """labels() runs on the loop: no I/O, and nothing Kubernetes would refuse."""
    if name == "nvidia":
        request.getfixturevalue("fake_nvml")
    driver = build(name, section_for(name, tmp_path), tmp_path)
    driver.start()
    try:
        driver.scan()

        def no_io(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"labels() did I/O: {args!r}")

        with monkeypatch.context() as blocked:
            for module, attr in IO_CALLS:
                blocked.setattr(module, attr, no_io)
            found = dict(driver.labels())
    finally:
        driver.stop()
    assert all(labels.label_problem(k, v) is None for k, v in found.items()), found


# -- merging and the file ---------------------------------------------------------------------


def test_merge_keeps_the_first_drivers_value_and_leaves_out_invalid_labels(caplog: pytest.LogCaptureFixture) -> None:
    said: set[str] = set()
    sources = [("a", {"x.io/k": "1", "x.io/bad value": "1"}), ("b", {"x.io/k": "2", "y.io/v": "a b", "y.io/ok": ""})]
    with caplog.at_level(logging.WARNING, "nodedev.labels"):
        assert labels.merge(sources, said) == {"x.io/k": "1", "y.io/ok": ""}
        assert labels.merge(sources, said) == {"x.io/k": "1", "y.io/ok": ""}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines  # each problem once, however many scans repeat it
    assert any("driver b: label x.io/k: driver a gives '1', kept over '2'" in line for line in lines)


@pytest.mark.parametrize(
    ("key", "value"),
    [("nvidia.com/gpu.count", "8"), ("plain", "true"), ("a.b/c_d-e.f", "A100-SXM4"), ("x.io/k", "")],
)
def test_valid_labels(key: str, value: str) -> None:
    assert labels.label_problem(key, value) is None


@pytest.mark.parametrize(
    ("key", "value"),
    [("Bad_Prefix/k", "v"), ("x.io/", "v"), ("x.io/k", "-v"), ("x.io/k", "v" * 64), ("x.io/k=v", "v"), ("x.io/k", "a\nb"), ("/k", "v")],
)
def test_invalid_labels(key: str, value: str) -> None:
    assert labels.label_problem(key, value) is not None


def test_the_file_is_key_value_lines_sorted_after_a_comment() -> None:
    text = labels.render({"b.io/y": "2", "a.io/x": "1"})
    assert text.splitlines()[0].startswith("#")
    assert text.splitlines()[1:] == ["a.io/x=1", "b.io/y=2"]
    assert labels.render({}) == ""


def test_a_write_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "nodedev"
    labels.write_atomically(path, "a=1\n")
    with open(path) as old_reader:  # a reader of the old file keeps the old file
        before = os.stat(path).st_ino
        labels.write_atomically(path, "a=2\n")
        assert old_reader.read() == "a=1\n"
    assert path.read_text() == "a=2\n" and os.stat(path).st_ino != before  # a new file renamed in
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodedev"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "nodedev"
    labels.write_atomically(path, "a=1\n")

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        labels.write_atomically(path, "a=2\n")
    assert path.read_text() == "a=1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodedev"]


class Labels:
    """A driver's labels() as a test sets them."""

    def __init__(self, **values: str) -> None:
        self.values: Mapping[str, str] = values

    def __call__(self) -> list[labels.Source]:
        return [("d", self.values)]


def test_the_writer_writes_only_on_change_and_removes_the_file_at_close(tmp_path: Path) -> None:
    path = tmp_path / "features.d" / "nodedev"
    path.parent.mkdir()
    source = Labels(**{"x.io/a": "1"})

    async def run() -> None:
        writer = labels.LabelWriter(path, source)
        writer.refresh()
        await writer.flush()
        assert path.read_text().splitlines()[1:] == ["x.io/a=1"]
        first = path.stat().st_ino
        for _ in range(3):  # scans that change no label write nothing
            writer.refresh()
            await writer.flush()
        assert writer.writes == 1 and path.stat().st_ino == first
        source.values = {"x.io/a": "2", "x.io/b": "true"}
        writer.refresh()
        await writer.flush()
        assert path.read_text().splitlines()[1:] == ["x.io/a=2", "x.io/b=true"] and writer.writes == 2
        source.values = {}
        writer.refresh()
        await writer.flush()
        assert not path.exists()  # no labels: no file
        source.values = {"x.io/a": "3"}
        writer.refresh()
        await writer.flush()
        assert path.exists()
        await writer.close()
        assert not path.exists()
        writer.refresh()  # after close: nothing more
        await writer.flush()
        assert not path.exists()
        assert sorted(p.name for p in path.parent.iterdir()) == []

    asyncio.run(run())


def test_the_last_labels_win_when_they_change_during_a_write(tmp_path: Path) -> None:
    path = tmp_path / "nodedev"
    source = Labels(**{"x.io/a": "1"})

    async def run() -> None:
        writer = labels.LabelWriter(path, source)
        writer.refresh()
        source.values = {"x.io/a": "2"}
        writer.refresh()  # while the first write is in flight
        await writer.flush()
        assert path.read_text().splitlines()[1:] == ["x.io/a=2"]
        await writer.close()

    asyncio.run(run())


def test_a_missing_directory_is_said_once_and_written_when_it_appears(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "features.d" / "nodedev"
    source = Labels(**{"x.io/a": "1"})

    async def run() -> None:
        writer = labels.LabelWriter(path, source)
        with caplog.at_level(logging.INFO, "nodedev.labels"):
            for _ in range(3):
                writer.refresh()
                await writer.flush()
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
            ("INFO", f"node labels not written: {path.parent} does not exist (is Node Feature Discovery deployed?); tried again at each scan")
        ]
        assert not path.parent.exists()  # not made: NFD's worker owns it
        path.parent.mkdir()
        writer.refresh()
        await writer.flush()
        assert path.read_text().splitlines()[1:] == ["x.io/a=1"]
        await writer.close()
        assert not path.exists()

    asyncio.run(run())


@pytest.mark.usefixtures("fake_nvml", "restored_environ")
def test_the_inventory_writer_labels_a_simulated_gpu_node(tmp_path: Path) -> None:
    """As the daemon runs it: every started driver's labels after each scan, the file gone at stop."""
    section = simulate.simulate("dgx-8", tmp_path / "node")
    assert section is not None
    cfg = config.parse(yaml.safe_dump({"drivers": {"nvidia": {**section, "enabled": True}}}), tmp_path / "config.yaml")
    path = tmp_path / "nodedev"

    async def run() -> None:
        inventory = Inventory(cfg)
        writer = labels.LabelWriter.for_inventory(inventory, path)
        await inventory.start(hotplug=False)
        try:
            await writer.flush()
            lines = path.read_text().splitlines()[1:]
            assert f"{GPU_PRESENT}=true" in lines and "nvidia.com/gpu.count=8" in lines
            assert "nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB" in lines
        finally:
            await writer.close()
            await inventory.stop()
        assert not path.exists()

    asyncio.run(run())


def test_a_file_that_cannot_be_written_is_a_warning_and_tried_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "nodedev"
    path.mkdir()  # a directory in the way: the rename fails
    source = Labels(**{"x.io/a": "1"})

    async def run() -> None:
        writer = labels.LabelWriter(path, source)
        with caplog.at_level(logging.WARNING, "nodedev.labels"):
            writer.refresh()
            await writer.flush()
        assert [r.levelname for r in caplog.records] == ["WARNING"] and str(path) in caplog.records[0].getMessage()
        path.rmdir()
        writer.refresh()
        await writer.flush()
        assert path.read_text().splitlines()[1:] == ["x.io/a=1"]
        await writer.close()

    asyncio.run(run())


def test_a_driver_whose_labels_fail_leaves_the_others_labels_written(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def labels(self) -> Mapping[str, str]:
            raise RuntimeError("bug")

    class Fine:
        def labels(self) -> Mapping[str, str]:
            return {"x.io/a": "1"}

    class Runner:
        def __init__(self, name: str, driver: object) -> None:
            self.name, self.driver = name, driver

    class Stand:
        """Stands in for the inventory: its runners, and the listener the writer adds."""

        def __init__(self) -> None:
            self.runners = {"broken": Runner("broken", Broken()), "fine": Runner("fine", Fine()), "off": Runner("off", None)}
            self.listeners: list[Any] = []

        def add_listener(self, listener: Any) -> None:
            self.listeners.append(listener)

    path = tmp_path / "nodedev"
    stand = Stand()

    async def run() -> None:
        writer = labels.LabelWriter.for_inventory(stand, path)  # type: ignore[arg-type]
        with caplog.at_level(logging.WARNING, "nodedev.labels"):
            for _ in range(2):
                stand.listeners[0]("x.io/r", {}, [])  # as after a scan
                await writer.flush()
        assert path.read_text().splitlines()[1:] == ["x.io/a=1"]
        assert [r.getMessage() for r in caplog.records] == ["driver broken: labels() failed: RuntimeError('bug'); its labels left out"]
        await writer.close()

    asyncio.run(run())


# -- the daemon ------------------------------------------------------------------------------


@pytest.mark.usefixtures("fake_nvml")
def test_serve_writes_the_labels_of_a_simulated_gpu_node_and_removes_them_at_stop(kubelet, nodedev, tmp_path: Path) -> None:
    path = tmp_path / "features.d" / "nodedev"
    path.parent.mkdir()
    daemon = nodedev({"nodeFeatureFile": str(path)}, args=["--simulate", "dgx-8"])
    daemon.wait_log(f"node labels written to {path}")
    lines = path.read_text().splitlines()[1:]
    assert f"{GPU_PRESENT}=true" in lines and "nvidia.com/gpu.count=8" in lines
    assert daemon.stop() == 0
    assert not path.exists()


def test_node_feature_file_must_be_an_absolute_path_or_empty(write_config) -> None:
    assert config.load(write_config({"nodeFeatureFile": ""})).node_feature_file == ""
    assert config.load(write_config({})).node_feature_file == str(labels.DEFAULT_PATH)
    with pytest.raises(config.ConfigError, match="nodeFeatureFile: must be an absolute path"):
        config.load(write_config({"nodeFeatureFile": "features.d/nodedev"}))
