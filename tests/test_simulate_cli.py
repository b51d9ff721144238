"""`--simulate`: the whole host on a driver's simulated node, as someone with no GPU would try it.

`nodedev.simulate.prepare` asks the drivers for the fixture and returns a partial
config that the CLI merges over the user's file; the simulated driver gets its
own roots, and every other driver keeps the real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from nodedev import config, simulate
from nodedev.drivers.nvidia import simulate as nvidia_simulate
from tests.conftest import nodedev_command
from tests.kubelet import KubeletDouble

pytestmark = pytest.mark.usefixtures("fake_nvml")


def discover(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nodedev_command("discover", *args), capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- simulate.prepare


def test_prepare_returns_only_the_simulated_drivers_section(tmp_path: Path) -> None:
    overrides = simulate.prepare("gpu-1", tmp_path)
    work = tmp_path / "nvidia"
    assert overrides == {
        "drivers": {
            "nvidia": {
                "enabled": True,
                "sysfsRoot": str(work / "sys"),
                "devRoot": str(work / "dev"),
                "procRoot": str(work / "proc"),
                "cdiRoot": str(work / "cdi"),
                "flags": {"nvidiaDriverRoot": str(work)},
            }
        }
    }


def test_merged_config_leaves_the_top_level_roots_real(tmp_path: Path) -> None:
    user = tmp_path / "config.yaml"
    user.write_text("drivers:\n  kvm: {enabled: true}\n  nvidia: {flags: {migStrategy: mixed}}\n")
    cfg = config.load(user, simulate.prepare("mig", tmp_path / "sim"))
    assert (cfg.sysfs_root, cfg.dev_root, cfg.proc_root) == (Path("/sys"), Path("/dev"), Path("/proc"))
    nvidia = next(d for d in cfg.drivers if d.name == "nvidia")
    assert nvidia.options.dev_root == str(tmp_path / "sim" / "nvidia" / "dev")
    assert nvidia.options.flags.mig_strategy == "mixed"  # the user's keys survive the merge
    kvm = next(d for d in cfg.drivers if d.name == "kvm")
    assert kvm.options.dev_root is None


def test_an_unknown_fixture_names_itself_and_every_shipped_one(tmp_path: Path) -> None:
    with pytest.raises(simulate.SimulateError) as err:
        simulate.prepare("dgx-9", tmp_path)
    message = str(err.value)
    assert "'dgx-9'" in message and "nvidia: dgx-8, gpu-1, mig" in message and "\n" not in message


def test_a_broken_fixture_of_a_driver_names_the_driver_file_and_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.conf"
    broken.write_text("gpu 0\n  uuid GPU-1\n")  # no name, no bus_id
    with pytest.raises(simulate.SimulateError) as err:
        simulate.prepare(str(broken), tmp_path / "sim")
    assert f"drivers.nvidia: {broken}:1: GPU block: bad or missing" in str(err.value)


def test_a_missing_fake_library_is_a_simulate_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvidia_simulate, "FAKE_LIBRARY_RELPATH", Path("nowhere") / "libnvidia-ml.so.1")
    with pytest.raises(simulate.SimulateError, match=r"fake NVML library .*nowhere.* is missing"):
        simulate.prepare("gpu-1", tmp_path)


# ---------------------------------------------------------------- the command line


def test_serve_simulate_dgx8_registers_eight_gpus(kubelet: KubeletDouble, nodedev) -> None:
    nodedev({}, args=["--simulate", "dgx-8"])

    kubelet.wait(lambda: "nvidia.com/gpu" in kubelet.streaming(), timeout=10, what="nvidia.com/gpu streaming")
    devices = kubelet.devices("nvidia.com/gpu")
    assert devices is not None and len(devices) == 8
    assert sorted(numa for _, numa in devices.values()) == [(0,)] * 4 + [(1,)] * 4
    assert {health for health, _ in devices.values()} == {"Healthy"}


def test_discover_simulate_mig_with_mixed_strategy_from_the_config(write_config) -> None:
    path = write_config({"drivers": {"nvidia": {"flags": {"migStrategy": "mixed"}}}})

    result = discover("--simulate", "mig", "--config", str(path), "--json")

    assert result.returncode == 0, result.stderr
    counts = {row["resource"]: len(row["devices"]) for row in json.loads(result.stdout)}
    assert counts == {"nvidia.com/gpu": 1, "nvidia.com/mig-1g.10gb": 7, "nvidia.com/mig-2g.20gb": 2, "nvidia.com/mig-3g.40gb": 1}


def _kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _kvm_usable(), reason="needs a /dev/kvm this user can open")
def test_kvm_keeps_the_real_dev_under_simulate(write_config) -> None:
    path = write_config({"drivers": {"kvm": {"enabled": True, "shares": 2}}})

    result = discover("--simulate", "gpu-1", "--config", str(path), "--json")

    assert result.returncode == 0, result.stderr
    rows = {row["resource"]: row["devices"] for row in json.loads(result.stdout)}
    assert [d["health"] for d in rows["devices.kubevirt.io/kvm"]] == ["Healthy", "Healthy"]
    assert all(d["reason"].startswith("/dev/kvm present") for d in rows["devices.kubevirt.io/kvm"])
    assert len(rows["nvidia.com/gpu"]) == 1


def test_an_unknown_fixture_exits_2_naming_the_shipped_ones() -> None:
    result = discover("--simulate", "dgx-9")

    assert result.returncode == 2
    assert result.stderr.startswith("nodedev: --simulate: no simulated node 'dgx-9'")
    assert "nvidia: dgx-8, gpu-1, mig" in result.stderr
