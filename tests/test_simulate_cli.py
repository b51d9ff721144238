"""`--simulate`: the whole host on the fake NVML, as someone with no GPU would try it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import nodedev_command
from tests.kubelet import KubeletDouble


def test_serve_simulate_dgx8_registers_eight_gpus(kubelet: KubeletDouble, nodedev) -> None:
    nodedev({}, args=["--simulate", "dgx-8"])

    kubelet.wait(lambda: "nvidia.com/gpu" in kubelet.streaming(), timeout=10, what="nvidia.com/gpu streaming")
    devices = kubelet.devices("nvidia.com/gpu")
    assert devices is not None and len(devices) == 8
    assert sorted(numa for _, numa in devices.values()) == [(0,)] * 4 + [(1,)] * 4
    assert {health for health, _ in devices.values()} == {"Healthy"}


def test_discover_simulate_mig_with_mixed_strategy_from_the_config(write_config) -> None:
    path = write_config({"drivers": {"nvidia": {"flags": {"migStrategy": "mixed"}}}})

    result = subprocess.run(
        nodedev_command("discover", "--simulate", "mig", "--config", str(path), "--json"), capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    counts = {row["resource"]: len(row["devices"]) for row in json.loads(result.stdout)}
    assert counts == {"nvidia.com/gpu": 1, "nvidia.com/mig-1g.10gb": 7, "nvidia.com/mig-2g.20gb": 2, "nvidia.com/mig-3g.40gb": 1}


def test_an_unknown_fixture_names_the_shipped_ones(tmp_path: Path) -> None:
    result = subprocess.run(nodedev_command("discover", "--simulate", "dgx-9"), capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "no NVML fixture 'dgx-9'" in result.stderr
    assert "(dgx-8, gpu-1, mig)" in result.stderr
