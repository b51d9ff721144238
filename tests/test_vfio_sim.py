"""`--simulate vfio`: the VFIO node the driver ships, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from nodedev import simulate as host_simulate
from nodedev.drivers.vfio import simulate
from tests.conftest import NodedevProcess, nodedev_command
from tests.kubelet import KubeletDouble
from tests.test_vfio import NVME, Q1, Q2, T4, V100

RESOURCES = {T4: 3, V100: 1, NVME: 2, Q1: 2, Q2: 1}


def test_the_driver_ships_its_node_and_returns_only_its_own_section(tmp_path: Path) -> None:
    assert host_simulate.shipped()["vfio"] == ["vfio"]
    overrides = host_simulate.prepare("vfio", tmp_path)
    section = overrides["drivers"]["vfio"]
    work = (tmp_path / "vfio").resolve()
    assert (section["sysfsRoot"], section["devRoot"]) == (str(work / "sys"), str(work / "dev"))
    assert section["checkVfioApi"] is False, "no VFIO in this kernel: the simulation waives the ioctl checks"
    assert "procRoot" not in section
    assert simulate.simulate("sriov", tmp_path / "other") is None
    assert not (tmp_path / "other").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="group nodes are real character devices only for root")
def test_discover_shows_the_vfio_node(tmp_path: Path) -> None:
    result = subprocess.run(nodedev_command("discover", "--simulate", "vfio", "--json"), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["resource"]: row["devices"] for row in json.loads(result.stdout) if row["driver"] == "vfio"}
    assert {name: len(devices) for name, devices in rows.items()} == RESOURCES
    unhealthy = [d for devices in rows.values() for d in devices if d["health"] != "Healthy"]
    assert [d["reason"] for d in unhealthy] == [f"IOMMU group 5 is not viable: {simulate.HELD_AUDIO} (10de:10f8) is bound to snd_hda_intel, not vfio-pci"]
    assert {d["numa"][0] for d in rows[NVME]} == {1}
    assert "VFIO API check skipped (checkVfioApi: false)" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="group nodes are real character devices only for root")
def test_serve_simulates_the_node_for_the_kubelet(kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess]) -> None:
    nodedev({}, args=["--simulate", "vfio"])
    for resource, count in RESOURCES.items():
        kubelet.wait(lambda r=resource, n=count: len(kubelet.devices(r) or {}) == n, timeout=10, what=f"{resource}: {count} devices")
