"""The vfio driver on fixture trees: what is offered under which ID, what a container gets,
group viability, health that follows the tree both ways, and PreStartContainer from sysfs."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodedev.driver import ContainerEdits, Device, DeviceNode, DriverError, Health, Snapshot
from nodedev.drivers.vfio import simulate
from nodedev.drivers.vfio.driver import VfioDriver, env_name
from nodedev.drivers.vfio.fixture import VfioFixture
from tests.test_contract import build

T4 = "nvidia.com/TU104GL_Tesla_T4"
V100 = "nvidia.com/GV100GL_Tesla_V100"
NVME = "devices.kubevirt.io/nvme"
Q1 = "nvidia.com/GRID_T4-1Q"
Q2 = "nvidia.com/GRID_T4-2Q"
T4_ENV = "PCI_RESOURCE_NVIDIA_COM_TU104GL_TESLA_T4"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the fixture's character devices need root (mknod)")


@pytest.fixture
def node(tmp_path: Path) -> VfioFixture:
    return simulate.build(tmp_path / "node")


def driver_for(node: VfioFixture, tmp_path: Path, **extra: Any) -> VfioDriver:
    section = {"enabled": True, "sysfsRoot": str(node.sys), "devRoot": str(node.dev), "checkVfioApi": False, **simulate.PERMITTED, **extra}
    driver = build("vfio", section, tmp_path)
    assert isinstance(driver, VfioDriver)
    driver.start()
    return driver


@pytest.fixture
def driver(node: VfioFixture, tmp_path: Path) -> Iterator[VfioDriver]:
    d = driver_for(node, tmp_path)
    yield d
    d.stop()


def by_id(snapshot: Snapshot, resource: str) -> dict[str, Device]:
    return {d.id: d for d in snapshot[resource]}


def health(snapshot: Snapshot, resource: str) -> dict[str, str]:
    return {d.id: d.health.value for d in snapshot[resource]}


def answer(driver: VfioDriver, resource: str, devices: list[Device]) -> ContainerEdits:
    """What the host sends: the devices' edits joined, then the driver's own."""
    return ContainerEdits.merge([d.edits for d in devices], driver.allocate(resource, devices))


def group(node: VfioFixture, name: str) -> str:
    return str(node.group_of(name))


# -- discovery ------------------------------------------------------------------------------


def test_the_simulated_node_is_offered_by_iommu_group(node: VfioFixture, driver: VfioDriver) -> None:
    snapshot = driver.scan()
    assert list(snapshot) == [T4, V100, NVME, Q1, Q2]
    t4 = by_id(snapshot, T4)
    assert sorted(t4, key=int) == [group(node, a) for a in (*simulate.T4_GPUS, simulate.HELD_GPU)], "IDs are group numbers; the T4 on nvidia is not offered"
    assert [t4[group(node, a)].health for a in simulate.T4_GPUS] == [Health.HEALTHY, Health.HEALTHY]
    assert t4[group(node, simulate.T4_GPUS[0])].numa_nodes == (0,)
    assert health(snapshot, NVME) == {group(node, a): "Healthy" for a in simulate.NVMES}
    shared = by_id(snapshot, V100)
    assert list(shared) == [group(node, simulate.SHARED_GPU)], "one device for the shared group; the bridge does not count"
    assert shared[group(node, simulate.SHARED_GPU)].healthy
    mdevs = list(simulate.MDEVS)
    assert health(snapshot, Q1) == {group(node, mdevs[0]): "Healthy", group(node, mdevs[1]): "Healthy"}
    q2 = by_id(snapshot, Q2)[group(node, mdevs[2])]
    assert f"mdev {mdevs[2]} (GRID T4-2Q, nvidia-223) on {simulate.VGPU_PARENT}" in q2.reason
    assert q2.numa_nodes == (1,), "an mdev's NUMA node is its parent's"
    assert "VFIO API check skipped" in q2.reason


def test_a_group_held_by_a_host_driver_is_listed_unhealthy_with_the_member_named(node: VfioFixture, driver: VfioDriver) -> None:
    held = by_id(driver.scan(), T4)[group(node, simulate.HELD_GPU)]
    assert held.health is Health.UNHEALTHY
    assert (
        held.reason == f"IOMMU group {group(node, simulate.HELD_GPU)} is not viable: {simulate.HELD_AUDIO} (10de:10f8) is bound to snd_hda_intel, not vfio-pci"
    )


def test_several_matching_devices_in_one_group_are_one_device(tmp_path: Path) -> None:
    node = VfioFixture(tmp_path / "node")
    shared = node.add_pci("0000:3b:00.0", vendor=0x10DE, device=0x1EB8, numa_node=0, cdev=3)
    node.add_pci("0000:3b:00.1", vendor=0x10DE, device=0x1EB8, numa_node=1, group=shared, cdev=4)
    node.add_pci("0000:3b:00.2", vendor=0x10DE, device=0x10F8, driver=None, group=shared)  # unbound: the kernel allows it
    driver = driver_for(node, tmp_path)
    (device,) = driver.scan()[T4]
    assert device.id == str(shared) and device.healthy, device.reason
    assert device.numa_nodes == (0, 1)
    edits = answer(driver, T4, [device])
    assert edits.envs == {T4_ENV: "0000:3b:00.0,0000:3b:00.1"}
    paths = [(d.container_path, d.permissions) for d in edits.devices]
    assert paths == [
        ("/dev/vfio/vfio", "mrw"),
        (f"/dev/vfio/{shared}", "mrw"),
        ("/dev/vfio/devices/vfio3", "mrw"),
        ("/dev/vfio/devices/vfio4", "mrw"),
        ("/dev/iommu", "mrw"),
    ]


def test_a_group_matching_two_entries_goes_to_the_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = VfioFixture(tmp_path / "node")
    shared = node.add_pci("0000:86:00.0", vendor=0x10DE, device=0x1DB6)
    node.add_pci("0000:86:00.1", vendor=0x10DE, device=0x1EB8, group=shared)
    with caplog.at_level(logging.WARNING):
        snapshot = driver_for(node, tmp_path).scan()
    assert [d.id for d in snapshot[T4]] == [str(shared)] and snapshot[V100] == []
    assert f"0000:86:00.0 matches {V100}, but its IOMMU group {shared} is offered as {T4}: a group is handed out whole" in caplog.text


def test_a_vfio_device_without_an_iommu_group_is_not_offered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = VfioFixture(tmp_path / "node")
    node.tree.add_pci("0000:3b:00.0", vendor=0x10DE, device=0x1EB8, driver="vfio-pci", iommu=False)
    with caplog.at_level(logging.WARNING):
        assert driver_for(node, tmp_path).scan()[T4] == []
    assert "0000:3b:00.0 (10de:1eb8) is bound to vfio-pci but has no IOMMU group: is the IOMMU on?" in caplog.text


def test_a_no_iommu_group_is_unhealthy(tmp_path: Path) -> None:
    node = VfioFixture(tmp_path / "node")
    number = node.add_pci("0000:3b:00.0", vendor=0x10DE, device=0x1EB8)
    (node.sys / "kernel" / "iommu_groups" / str(number) / "name").write_text("vfio-noiommu\n")
    (device,) = driver_for(node, tmp_path).scan()[T4]
    assert device.health is Health.UNHEALTHY and "no-IOMMU group (vfio-noiommu)" in device.reason


def test_an_mdev_type_without_a_name_file_matches_by_type_id_and_spaces_match_underscores(tmp_path: Path) -> None:
    node = VfioFixture(tmp_path / "node")
    node.add_pci("0000:00:02.0", vendor=0x8086, device=0x3E92, pci_class=0x030000, driver="i915")
    gvt = node.add_mdev("0000:00:02.0", "a297db4a-f4c2-11e6-90f6-d3b88d6c9525", "i915-GVTg_V5_4", None)
    grid = node.add_mdev("0000:00:02.0", "a297db4a-f4c2-11e6-90f6-d3b88d6c9526", "nvidia-222", "GRID_T4-1Q")
    mediated = [{"mdevNameSelector": "i915-GVTg_V5_4", "resourceName": "intel.com/gvt"}, {"mdevNameSelector": "GRID T4-1Q", "resourceName": Q1}]
    snapshot = driver_for(node, tmp_path, mediatedDevices=mediated).scan()
    assert [d.id for d in snapshot["intel.com/gvt"]] == [str(gvt)]
    (device,) = snapshot[Q1]
    assert device.id == str(grid)
    assert device.edits.envs == {"MDEV_PCI_RESOURCE_NVIDIA_COM_GRID_T4-1Q": "a297db4a-f4c2-11e6-90f6-d3b88d6c9526"}
    assert [d.container_path for d in device.edits.devices] == ["/dev/vfio/vfio", f"/dev/vfio/{grid}"]


def test_env_names_are_kubevirts() -> None:
    assert env_name("PCI_RESOURCE", "nvidia.com/TU104GL_Tesla_T4") == T4_ENV
    assert env_name("MDEV_PCI_RESOURCE", "nvidia.com/GRID_T4-1Q") == "MDEV_PCI_RESOURCE_NVIDIA_COM_GRID_T4-1Q"


# -- Allocate ------------------------------------------------------------------------------


def test_allocate_joins_groups_with_each_node_once(node: VfioFixture, driver: VfioDriver) -> None:
    t4 = by_id(driver.scan(), T4)
    first, second = (t4[group(node, a)] for a in simulate.T4_GPUS)
    edits = answer(driver, T4, [first, second])
    assert edits.envs == {T4_ENV: ",".join(simulate.T4_GPUS)}
    dev = str(node.dev)
    assert list(edits.devices) == [
        DeviceNode(f"{dev}/vfio/vfio", "/dev/vfio/vfio", "mrw"),
        DeviceNode(f"{dev}/vfio/{first.id}", f"/dev/vfio/{first.id}", "mrw"),
        DeviceNode(f"{dev}/vfio/devices/vfio0", "/dev/vfio/devices/vfio0", "mrw"),
        DeviceNode(f"{dev}/iommu", "/dev/iommu", "mrw"),
        DeviceNode(f"{dev}/vfio/{second.id}", f"/dev/vfio/{second.id}", "mrw"),
    ]


def test_a_cdev_whose_node_is_missing_is_left_out_and_iommu_with_it(node: VfioFixture, tmp_path: Path) -> None:
    (node.dev / "vfio" / "devices" / "vfio0").unlink()
    device = by_id(driver_for(node, tmp_path).scan(), T4)[group(node, simulate.T4_GPUS[0])]
    assert [d.container_path for d in device.edits.devices] == ["/dev/vfio/vfio", f"/dev/vfio/{device.id}"]
    assert device.healthy, "the legacy group node is enough"


# -- health, both ways ------------------------------------------------------------------------


def test_health_follows_the_tree_and_recovers(node: VfioFixture, driver: VfioDriver) -> None:
    gpu, shared, audio = simulate.T4_GPUS[1], group(node, simulate.SHARED_GPU), simulate.SHARED_AUDIO
    g = group(node, gpu)

    def t4() -> Device:
        return by_id(driver.scan(), T4)[g]

    node.bind(audio, "snd_hda_intel")
    v100 = by_id(driver.scan(), V100)[shared]
    assert v100.health is Health.UNHEALTHY
    assert v100.reason == f"IOMMU group {shared} is not viable: {audio} (10de:10f2) is bound to snd_hda_intel, not vfio-pci"
    node.bind(audio, "vfio-pci")
    assert by_id(driver.scan(), V100)[shared].healthy

    node.group_node(int(g)).unlink()
    assert (t4().health, t4().reason) == (Health.UNHEALTHY, f"{node.dev}/vfio/{g} is missing")
    node.group_node(int(g)).write_text("")
    assert t4().reason == f"{node.dev}/vfio/{g} is a regular file, not a character device"
    node.group_node(int(g)).unlink()
    node.tree.add_char(f"vfio/{g}", 241, int(g))
    assert t4().healthy

    node.bind(gpu, "nvidia")
    assert (t4().health, t4().reason) == (Health.UNHEALTHY, f"IOMMU group {g}: {gpu} is bound to nvidia, not vfio-pci")
    node.unbind(gpu)
    assert t4().reason == f"IOMMU group {g}: {gpu} is not bound to any driver"
    node.bind(gpu, "vfio-pci")
    assert t4().healthy, "the same group back on vfio-pci"


def test_a_removed_device_stays_unhealthy_until_it_turns_up_in_another_group(node: VfioFixture, driver: VfioDriver) -> None:
    gpu = simulate.T4_GPUS[1]
    old = group(node, gpu)
    driver.scan()
    node.remove(gpu)
    gone = by_id(driver.scan(), T4)[old]
    assert (gone.health, gone.reason) == (Health.UNHEALTHY, f"IOMMU group {old}: {gpu} was removed")
    new = node.add_pci(gpu, vendor=simulate.NVIDIA, device=simulate.T4, numa_node=0)
    t4 = health(driver.scan(), T4)
    assert old not in t4 and t4[str(new)] == "Healthy", "hot re-add renumbers the group; the old ID is forgotten"


def test_a_removed_mdev_is_unhealthy(node: VfioFixture, driver: VfioDriver) -> None:
    uuid = list(simulate.MDEVS)[0]
    g = group(node, uuid)
    driver.scan()
    node.remove_mdev(uuid)
    device = by_id(driver.scan(), Q1)[g]
    assert (device.health, device.reason) == (Health.UNHEALTHY, f"IOMMU group {g}: mdev {uuid} was removed")
    new = node.add_mdev(simulate.VGPU_PARENT, uuid, "nvidia-222", "GRID T4-1Q")
    assert health(driver.scan(), Q1) == {group(node, list(simulate.MDEVS)[1]): "Healthy", str(new): "Healthy"}


def test_a_missing_container_node_makes_everything_unhealthy(node: VfioFixture, driver: VfioDriver) -> None:
    (node.dev / "vfio" / "vfio").unlink()
    snapshot = driver.scan()
    assert {d.reason for devices in snapshot.values() for d in devices} == {f"{node.dev}/vfio/vfio is missing"}


def test_scans_never_open_a_group_node(node: VfioFixture, driver: VfioDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = os.open

    def recording(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording)
    driver.scan()
    driver.scan(changed={simulate.T4_GPUS[0]})
    assert opened, "the recorder sees the scan's reads"
    assert not [p for p in opened if p.startswith(str(node.dev))], "nothing under the dev root is opened"


# -- events -----------------------------------------------------------------------------------


def test_it_asks_for_the_events_and_paths_that_change_it(node: VfioFixture, driver: VfioDriver) -> None:
    driver.scan()
    subsystems = {(m.subsystem, m.sys_name) for m in driver.udev_matches()}
    assert {("pci", None), ("mdev", None), ("vfio", None), ("vfio-dev", None), ("misc", "vfio"), ("misc", "iommu")} <= subsystems
    pci = next(m for m in driver.udev_matches() if m.subsystem == "pci")
    assert {"bind", "unbind", "add", "remove"} <= pci.actions and not pci.properties, "a member rebound to any driver matters"
    paths = set(driver.watch_paths())
    shared = node.group_of(simulate.SHARED_GPU)
    assert {
        node.dev / "vfio",
        node.sys / "bus/pci/drivers/vfio-pci",
        node.sys / "bus/pci/devices",
        node.sys / "bus/mdev/devices",
        node.sys / f"kernel/iommu_groups/{shared}/devices",
        node.tree.device_dir(simulate.SHARED_AUDIO),
    } <= paths


# -- PreStartContainer from sysfs (checkVfioApi off; the ioctl path is in test_vfio_ioctl) ------


def test_pre_start_passes_a_viable_group_and_names_the_member_that_is_not(node: VfioFixture, driver: VfioDriver) -> None:
    driver.scan()
    shared = group(node, simulate.SHARED_GPU)
    driver.pre_start(V100, [shared])
    node.bind(simulate.SHARED_AUDIO, "snd_hda_intel")  # after the scan: only pre_start can see it
    with pytest.raises(
        DriverError, match=rf"^IOMMU group {shared} is not viable: {simulate.SHARED_AUDIO} \(10de:10f2\) is bound to snd_hda_intel, not vfio-pci$"
    ):
        driver.pre_start(V100, [shared])
    mdev = group(node, list(simulate.MDEVS)[0])
    driver.pre_start(Q1, [mdev])  # its member is the mdev itself, on vfio_mdev: viable
    with pytest.raises(DriverError, match="IOMMU group 999 is no longer found"):
        driver.pre_start(V100, ["999"])


def test_the_group_node_is_a_character_device(node: VfioFixture) -> None:
    assert stat.S_ISCHR(os.stat(node.group_node(node.group_of(simulate.T4_GPUS[0]))).st_mode)
    node.unbind(simulate.T4_GPUS[0])
    assert not node.group_node(node.group_of(simulate.T4_GPUS[0])).exists(), "the kernel drops the node with the last vfio member"


def test_this_machines_real_sys_has_nothing_to_offer_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No VFIO, no IOMMU groups here: empty lists, and the missing container node is the reason given."""
    if Path("/dev/vfio/vfio").exists():
        pytest.skip("this machine has VFIO")
    section = {"enabled": True, "sysfsRoot": "/sys", "devRoot": "/dev", **simulate.PERMITTED}
    driver = build("vfio", section, tmp_path)
    with caplog.at_level(logging.WARNING):
        driver.start()
    assert "no usable VFIO on this node, every device is Unhealthy: /dev/vfio/vfio is missing" in caplog.text
    assert driver.scan() == {T4: [], V100: [], NVME: [], Q1: [], Q2: []}
