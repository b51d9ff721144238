"""Driver path watches through the engine: a fixture tree changing the ways a real
node's sysfs and /dev do must reach the driver's on_match within 50 ms, naming what
a uevent would (the watched directory and the entries that changed in it), or
nothing ("read everything") when the directory itself came, went or was replaced."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nodedev.driver import UdevMatch
from nodedev.hotplug import engine, paths
from tests import test_hotplug
from tests.test_hotplug import Recorder, aio, pci
from tests.test_paths import kernel_masks

recorder = test_hotplug.recorder  # a fixture

DEADLINE_S = 0.05
"""From the change to on_match: one inotify read and the 2 ms settle window."""


def fixture_tree(root: Path) -> dict[str, Path]:
    """A PCI NIC with SR-IOV and its netdev, as a driver pointed at a fixture sysfs reads them."""
    pf = root / "sys/bus/pci/devices/0000:3b:00.0"
    pf.mkdir(parents=True)
    (pf / "sriov_numvfs").write_text("0\n")
    (pf / "sriov_totalvfs").write_text("8\n")
    (root / "sys/bus/pci/drivers/ixgbe").mkdir(parents=True)
    (root / "sys/bus/pci/drivers/vfio-pci").mkdir(parents=True)
    (pf / "driver").symlink_to("../../drivers/ixgbe")
    net = root / "sys/class/net"
    (net / "eth0").mkdir(parents=True)
    (net / "eth0/operstate").write_text("up\n")
    dev = root / "dev/vfio"
    dev.mkdir(parents=True)
    return {"pf": pf, "net": net, "eth0": net / "eth0", "dev": dev}


async def triggers(r: Recorder, what: str, change: Callable[[], object], named: set[str] | None) -> float:
    """Makes one change and waits for the driver to be told; returns the milliseconds it took.
    `named`: names the driver must be told among others (a temporary link's, say), None: none."""
    r.reset()
    started = time.perf_counter()
    change()
    await r.wait(lambda: "sriov" in r.drivers(), what, timeout=DEADLINE_S)
    elapsed = (time.perf_counter() - started) * 1000
    told = r.names("sriov")
    if named is None:
        assert told == [None], f"{what}: the directory itself changed, so the driver must read everything"
    else:
        assert len(told) == 1 and told[0] is not None and named <= told[0], f"{what}: told {told}, not {named}"
    return elapsed


def relink(link: Path, target: str) -> None:
    """What `ln -sfn` does: a new link under a temporary name, renamed over the old one."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.symlink_to(target)
    os.replace(tmp, link)


@aio
async def test_every_kind_of_fixture_tree_change_reaches_the_driver_within_50_ms(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    tree = fixture_tree(tmp_path)
    r = recorder(settle_s=engine.SETTLE_S)
    r.engine.subscribe("sriov", [], [tree["pf"], tree["net"], tree["eth0"], tree["dev"]])
    r.engine.start(asyncio.get_running_loop())
    pf, eth0, net, dev = tree["pf"], tree["eth0"], tree["net"], tree["dev"]
    address = pf.name
    changes: list[tuple[str, Callable[[], object], set[str]]] = [
        ("sriov_numvfs rewritten", lambda: (pf / "sriov_numvfs").write_text("4\n"), {address, "sriov_numvfs"}),
        ("operstate rewritten", lambda: (eth0 / "operstate").write_text("down\n"), {"eth0", "operstate"}),
        ("driver link replaced, ln -sfn style", lambda: relink(pf / "driver", "../../drivers/vfio-pci"), {address, "driver"}),
        ("driver link removed", lambda: (pf / "driver").unlink(), {address, "driver"}),
        ("driver link created", lambda: (pf / "driver").symlink_to("../../drivers/ixgbe"), {address, "driver"}),
        ("an interface appearing", lambda: (net / "eth1").mkdir(), {"net", "eth1"}),
        ("an interface vanishing", lambda: (net / "eth1").rmdir(), {"net", "eth1"}),
        ("a device node appearing", lambda: (dev / "42").touch(), {"vfio", "42"}),
        ("a device node's mode changing", lambda: (dev / "42").chmod(0o666), {"vfio", "42"}),
        ("a device node vanishing", lambda: (dev / "42").unlink(), {"vfio", "42"}),
    ]
    took = {what: await triggers(r, what, change, named) for what, change, named in changes}
    assert max(took.values()) <= DEADLINE_S * 1000, took


@aio
async def test_ln_sfn_itself_triggers(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    tree = fixture_tree(tmp_path)
    r = recorder(settle_s=engine.SETTLE_S)
    r.engine.subscribe("sriov", [], [tree["pf"]])
    r.engine.start(asyncio.get_running_loop())
    link = tree["pf"] / "driver"
    relinked = {tree["pf"].name, "driver"}
    await triggers(r, "ln -sfn", lambda: subprocess.run(["ln", "-sfn", "../../drivers/vfio-pci", str(link)], check=True, timeout=30), relinked)


@aio
async def test_a_watched_directory_removed_and_recreated_triggers_both_times(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    tree = fixture_tree(tmp_path)
    vf = tree["pf"].parent / "0000:3b:02.0"
    r = recorder(settle_s=engine.SETTLE_S)
    r.engine.subscribe("sriov", [], [vf])  # a VF that does not exist yet
    r.engine.start(asyncio.get_running_loop())
    await triggers(r, "the VF appearing", lambda: vf.mkdir(), None)
    await triggers(r, "an entry in it", lambda: (vf / "driver").symlink_to("../../drivers/vfio-pci"), {vf.name, "driver"})
    await triggers(r, "the VF vanishing", lambda: ((vf / "driver").unlink(), vf.rmdir()), None)


@aio
async def test_paths_under_the_real_sys_are_not_watched(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    """inotify sees nothing on sysfs; uevents are its signal, and a watch there would only cost."""
    if not os.path.isdir("/sys/class/net"):
        pytest.skip("no /sys here")
    (tmp_path / "link").symlink_to("/sys/class/net")
    r = recorder()
    r.engine.start(asyncio.get_running_loop())
    r.engine.subscribe("netdev", [], [Path("/sys/class/net"), Path("/sys/bus/../class"), tmp_path / "link", tmp_path])
    assert r.engine.paths.watching() == {tmp_path: tmp_path}
    r.engine.subscribe("netdev", [], [tmp_path])
    r.engine.subscribe("netdev", [], [Path("/sys/class/net"), tmp_path])
    assert r.engine.paths.watching() == {tmp_path: tmp_path}


@aio
async def test_a_path_and_a_uevent_in_one_window_tell_the_driver_both_names(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    r = recorder(settle_s=0.05)
    r.engine.subscribe("sriov", [UdevMatch("pci")], [tmp_path])
    r.engine.start(asyncio.get_running_loop())
    r.engine.inject(pci("add", "0000:3b:02.0"))
    (tmp_path / "x").touch()
    await r.wait(lambda: bool(r.matches), "the window closing")
    assert r.names("sriov") == [frozenset({"0000:3b:02.0", tmp_path.name, "x"})]


@aio
async def test_an_overflowed_inotify_queue_tells_the_driver_to_read_everything(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    """Lost path events name nothing: what was lost is not known."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many to overflow quickly")
    (tmp_path / "a").touch()
    (tmp_path / "b").touch()
    r = recorder(settle_s=0.05)
    r.engine.subscribe("sriov", [UdevMatch("pci")], [tmp_path])
    r.engine.start(asyncio.get_running_loop())
    r.engine.inject(pci("add", "0000:3b:02.0"))
    for i in range(limit + 10):  # the loop does not run meanwhile; alternating names defeats coalescing
        os.utime(tmp_path / ("a" if i % 2 else "b"))
    await r.wait(lambda: bool(r.matches), "the window closing")
    assert r.names("sriov") == [None]


@aio
async def test_device_directories_are_watched_for_entries_and_modes_but_never_writes(
    tmp_path: Path, recorder: Callable[..., Recorder]
) -> None:
    """Every write to /dev/null by any process on the node would otherwise wake the daemon
    and rescan the drivers watching /dev. A devtmpfs mounted elsewhere is the same."""
    fixture = tmp_path / "fixture-dev"
    fixture.mkdir()
    r = recorder(settle_s=engine.SETTLE_S)
    r.engine.start(asyncio.get_running_loop())
    r.engine.subscribe("kvm", [], [Path("/dev")])
    r.engine.subscribe("fixture", [], [fixture])
    masks = kernel_masks(r.engine.paths)
    entries_and_modes = paths.ENTRY_EVENTS | paths.ATTRIBUTE_EVENTS | paths.SELF_EVENTS
    assert sorted(masks) == sorted([entries_and_modes, entries_and_modes | paths.WRITE_EVENTS])
    with open("/dev/null", "w") as null:
        null.write("noise")
    (fixture / "node").write_text("x")
    await r.wait(lambda: "fixture" in r.drivers(), "the fixture write")
    assert "kvm" not in r.drivers()


def test_a_devtmpfs_mounted_elsewhere_holds_devices(tmp_path: Path) -> None:
    target = tmp_path / "hostdev"
    target.mkdir()
    if subprocess.run(["mount", "-t", "devtmpfs", "devtmpfs", str(target)], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("cannot mount a devtmpfs here")
    try:
        types = paths.mount_types()
        assert paths.holds_devices(str(target), types) and paths.holds_devices(f"{target}/vfio", types)
        assert not paths.holds_devices(str(tmp_path), types)
        assert paths.holds_devices("/dev/net", types)
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=30)


def test_the_real_dev_holds_devices_whatever_its_file_system() -> None:
    """A container's /dev is often a plain tmpfs with device nodes made in it."""
    no_mounts: dict[int, str] = {}
    assert paths.holds_devices("/dev", no_mounts) and paths.holds_devices("/dev/vfio", no_mounts)
    assert not paths.holds_devices("/devices", no_mounts) and not paths.holds_devices("/tmp/fixture/dev", no_mounts)


@aio
async def test_a_directory_watched_after_the_first_scan_is_reported_once_with_its_entries(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    """A scan lists a directory before the host can watch it: what changed in between (a
    function bound while a new `drivers/<name>/` was being listed) is told to the driver
    once the watch is in place, as if every entry had changed. Not at the first
    subscription, which follows a scan that read everything."""
    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir()
    later.mkdir()
    (first / "a").touch()
    (later / "0000:3b:02.0").touch()
    r = recorder(settle_s=0)
    r.engine.start(asyncio.get_running_loop())
    r.engine.subscribe("sriov", [], [first])
    assert r.matches == []
    r.engine.subscribe("sriov", [], [first, later])
    assert r.names("sriov") == [frozenset({"later", "0000:3b:02.0"})]
    r.reset()
    r.engine.subscribe("sriov", [], [first, later])
    assert r.matches == [], "nothing new is watched"
