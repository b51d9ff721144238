"""`--simulate sriov`: the SR-IOV node the driver ships, through the real CLI."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from nodedev import simulate as host_simulate
from nodedev.drivers.sriov import simulate
from tests.conftest import NodedevProcess, nodedev_command
from tests.kubelet import KubeletDouble

RESOURCES = {
    "intel.com/intel_sriov_netdevice": 6,
    "intel.com/mlnx_sriov_rdma": 4,
    "intel.com/sriov_dpdk": 6,
}


def test_the_driver_ships_its_node_and_returns_only_its_own_section(tmp_path: Path) -> None:
    assert host_simulate.shipped()["sriov"] == ["sriov"]
    overrides = host_simulate.prepare("sriov", tmp_path)
    section = overrides["drivers"]["sriov"]
    work = tmp_path / "sriov"
    assert (section["sysfsRoot"], section["devRoot"], section["procRoot"]) == (str(work / "sys"), str(work / "dev"), str(work / "proc"))
    assert section["deviceInfoDir"] == str(work / "devinfo"), "never the host's /var/run"
    assert simulate.simulate("gpu-1", tmp_path / "other") is None
    assert not (tmp_path / "other").exists()


def test_discover_shows_the_sriov_node(tmp_path: Path) -> None:
    result = subprocess.run(nodedev_command("discover", "--simulate", "sriov", "--json"), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["resource"]: row["devices"] for row in json.loads(result.stdout) if row["driver"] == "sriov"}
    assert {name: len(devices) for name, devices in rows.items()} == RESOURCES
    assert {d["numa"][0] for d in rows["intel.com/mlnx_sriov_rdma"]} == {1}
    assert all(d["health"] == "Healthy" for devices in rows.values() for d in devices)
    assert f"{simulate.VIRTIO} not offered: it carries the default route (eth0)" in result.stderr


def test_serve_simulates_the_node_for_the_kubelet(kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess]) -> None:
    nodedev({}, args=["--simulate", "sriov"])
    for resource, count in RESOURCES.items():
        kubelet.wait(lambda r=resource, n=count: len(kubelet.devices(r) or {}) == n, timeout=10, what=f"{resource}: {count} devices")
