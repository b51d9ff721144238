"""The README's config examples are configs that work: a user pastes them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from nodedev import config
from tests.conftest import nodedev_command

README = Path(__file__).resolve().parents[1] / "README.md"


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("block", [b for b in yaml_blocks() if re.match(r"^(netdev|nvidia|vfio|sriov|rdma):", b)], ids=lambda b: b.split(":")[0])
def test_each_driver_example_is_a_valid_section(block: str, tmp_path: Path) -> None:
    name, section = next(iter(yaml.safe_load(block).items()))
    if name == "nvidia":
        section.pop("enabled", None)
        section["enabled"] = False  # validated, not started: there is no NVML here
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"drivers": {name: section}}))
    config.load(path)


def test_the_simulate_example_config_runs(tmp_path: Path, fake_nvml: Path) -> None:
    block = next(b for b in yaml_blocks() if "migStrategy" in b and b.startswith("pluginDir"))
    path = tmp_path / "my-node.yaml"
    path.write_text(block)

    result = subprocess.run(nodedev_command("discover", "--simulate", "mig", "--config", str(path)), capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "nvidia.com/mig-" in result.stdout
    assert "devices.kubevirt.io/kvm" in result.stdout
