"""PathWatcher: the one inotify descriptor, with real file-system changes.

Each test collects the batches a callback got and waits on them with a timeout,
never with sleep(); "nothing else arrived" is checked after a later change that
must arrive, since inotify delivers in order.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nodedev.hotplug import Changes, PathWatcher, inotify, paths
from tests.test_hotplug import aio

LOG = logging.getLogger("test.paths")
TIMEOUT = 5.0


class Batches:
    """A callback that keeps every batch of names, and waits for the one a test expects."""

    def __init__(self) -> None:
        self.got: list[set[str]] = []
        self._changed = asyncio.Event()

    def __call__(self, names: set[str]) -> None:
        self.got.append(set(names))
        self._changed.set()

    def union(self) -> set[str]:
        return set().union(*self.got)

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        async def wait() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; batches: {self.got}") from None

    async def names(self, *expected: str) -> None:
        await self.until(lambda: set(expected) <= self.union(), f"names {sorted(expected)}")

    async def everything(self) -> None:
        await self.until(lambda: set() in self.got, "an empty batch (check everything)")


@pytest.fixture
def watcher() -> Iterator[Callable[[], PathWatcher]]:
    made: list[PathWatcher] = []

    def make() -> PathWatcher:
        made.append(PathWatcher(LOG))
        made[-1].start(asyncio.get_running_loop())
        return made[-1]

    yield make
    for w in made:
        w.close()


@aio
async def test_entries_created_removed_renamed_and_their_mode_changed(tmp_path: Path, watcher: Callable[[], PathWatcher]) -> None:
    batches = Batches()
    watcher().watch(tmp_path, batches)
    (tmp_path / "42").touch()
    await batches.names("42")
    (tmp_path / "42").chmod(0o600)
    (tmp_path / "42").rename(tmp_path / "43")
    await batches.names("43")
    (tmp_path / "43").unlink()
    batches.got.clear()
    (tmp_path / "44").mkdir()
    await batches.names("44")
    assert set() not in batches.got


@aio
async def test_files_rewritten_in_place_are_heard(tmp_path: Path, watcher: Callable[[], PathWatcher]) -> None:
    """sysfs-like attribute files in a fixture tree change by being rewritten, not replaced."""
    (tmp_path / "sriov_numvfs").write_text("0\n")
    (tmp_path / "operstate").write_text("up\n")
    batches = Batches()
    watcher().watch(tmp_path, batches)
    (tmp_path / "sriov_numvfs").write_text("4\n")
    await batches.names("sriov_numvfs")
    with open(tmp_path / "operstate", "r+") as f:  # written, and left open: IN_MODIFY without IN_CLOSE_WRITE
        f.write("down\n")
        f.flush()
        await batches.names("operstate")


@aio
async def test_a_probe_that_opens_a_watched_file_read_write_does_not_wake_the_watch(
    tmp_path: Path, watcher: Callable[[], PathWatcher]
) -> None:
    """devnodes opens /dev/kvm read-write for an ioctl at every scan; if closing it were an
    event, each scan would trigger the next, for ever (IN_CLOSE_WRITE: 62,000 a second)."""
    (tmp_path / "kvm").touch()
    batches = Batches()
    watcher().watch(tmp_path, batches)
    os.close(os.open(tmp_path / "kvm", os.O_RDWR))
    (tmp_path / "sentinel").touch()
    await batches.names("sentinel")
    assert batches.union() == {"sentinel"}


@aio
async def test_a_replaced_symlink_is_heard_both_ways(tmp_path: Path, watcher: Callable[[], PathWatcher]) -> None:
    """A device's `driver` link on rebind: `ln -sfn` (a new link renamed over) or unlink and symlink."""
    (tmp_path / "driver").symlink_to("../../bus/pci/drivers/ixgbe")
    batches = Batches()
    watcher().watch(tmp_path, batches)
    subprocess.run(["ln", "-sfn", "../../bus/pci/drivers/vfio-pci", str(tmp_path / "driver")], check=True, timeout=30)
    await batches.names("driver")
    assert os.readlink(tmp_path / "driver").endswith("vfio-pci")
    batches.got.clear()
    (tmp_path / "driver").unlink()
    (tmp_path / "driver").symlink_to("../../bus/pci/drivers/ixgbe")
    await batches.names("driver")


def kernel_masks(w: PathWatcher) -> list[int]:
    """The masks of the kernel's watches on this watcher's descriptor, from /proc/self/fdinfo."""
    assert w._inotify is not None
    lines = Path(f"/proc/self/fdinfo/{w._inotify.fd}").read_text().splitlines()
    return [int(line.split(" mask:")[1].split()[0], 16) for line in lines if line.startswith("inotify wd:")]


@aio
async def test_writes_reach_only_the_watches_that_asked_for_them(tmp_path: Path, watcher: Callable[[], PathWatcher]) -> None:
    """The plugin-directory watch wants sockets coming and going, not the kubelet's checkpoint writes."""
    (tmp_path / "checkpoint").write_text("{}")
    entries, everything = Batches(), Batches()
    w = watcher()
    w.watch(tmp_path, entries, Changes.ENTRIES)
    w.watch(tmp_path, everything)
    (tmp_path / "checkpoint").write_text("{}")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "kubelet.sock"))
        await entries.names("kubelet.sock")
        await everything.names("checkpoint", "kubelet.sock")
    assert entries.got == [{"kubelet.sock"}]


@aio
async def test_cancelling_one_watch_leaves_the_other_and_shrinks_the_mask(tmp_path: Path, watcher: Callable[[], PathWatcher]) -> None:
    entries, everything = Batches(), Batches()
    w = watcher()
    first = w.watch(tmp_path, entries, Changes.ENTRIES)
    handle = w.watch(tmp_path, everything)
    assert kernel_masks(w) == [paths.ENTRY_EVENTS | paths.ATTRIBUTE_EVENTS | paths.WRITE_EVENTS | paths.SELF_EVENTS]
    handle.cancel()
    handle.cancel()  # twice is fine
    assert kernel_masks(w) == [paths.ENTRY_EVENTS | paths.SELF_EVENTS]
    (tmp_path / "f").write_text("x")  # a create (entries hears it), then writes nobody asked for now
    (tmp_path / "f").write_text("y")
    (tmp_path / "g").touch()
    await entries.names("f", "g")
    assert everything.got == []
    assert entries.union() == {"f", "g"}
    first.cancel()
    assert kernel_masks(w) == [] and w.watching() == {}


@aio
async def test_a_directory_that_does_not_exist_yet_is_waited_for(tmp_path: Path, watcher: Callable[[], PathWatcher]) -> None:
    target = tmp_path / "dev" / "vfio"
    batches = Batches()
    w = watcher()
    w.watch(target, batches)
    assert w.watching() == {target: tmp_path}
    (tmp_path / "dev").mkdir()
    (tmp_path / "unrelated").mkdir()
    target.mkdir()
    await batches.everything()  # it appeared: every entry in it is new
    assert w.watching() == {target: target}
    batches.got.clear()
    (target / "7").touch()
    await batches.names("7")
    (target / "7").unlink()
    target.rmdir()
    await batches.everything()
    assert w.watching() == {target: tmp_path / "dev"}
    batches.got.clear()
    target.mkdir()  # and it is watched again when it comes back
    await batches.everything()
    (target / "8").touch()
    await batches.names("8")


@aio
async def test_a_whole_missing_path_created_at_once(tmp_path: Path, watcher: Callable[[], PathWatcher]) -> None:
    target = tmp_path / "a" / "b" / "c"
    batches = Batches()
    w = watcher()
    w.watch(target, batches)
    target.mkdir(parents=True)
    await batches.everything()
    (target / "node").touch()
    await batches.names("node")


@aio
async def test_a_directory_replaced_by_another_is_watched_again(tmp_path: Path, watcher: Callable[[], PathWatcher]) -> None:
    """`mv new dir` over an empty dir: the old inode (and its watch) goes, the new one must be armed."""
    target, new = tmp_path / "dir", tmp_path / "new"
    target.mkdir()
    new.mkdir()
    (new / "inside").touch()
    batches = Batches()
    w = watcher()
    w.watch(target, batches)
    os.rename(new, target)
    await batches.everything()
    batches.got.clear()
    (target / "later").touch()
    await batches.names("later")


@aio
async def test_a_queue_overflow_tells_every_watch_to_check_everything(tmp_path: Path, watcher: Callable[[], PathWatcher]) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many to overflow quickly")
    (tmp_path / "a").touch()
    (tmp_path / "b").touch()
    batches, other = Batches(), Batches()
    w = watcher()
    w.watch(tmp_path, batches)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    w.watch(elsewhere, other)
    for i in range(limit + 10):  # the loop does not run meanwhile; alternating names defeats coalescing
        os.utime(tmp_path / ("a" if i % 2 else "b"))
    await batches.everything()
    await other.everything()
    batches.got.clear()
    (tmp_path / "after").touch()
    await batches.names("after")


@aio
async def test_check_places_a_watch_that_could_not_be_added_and_says_so(
    tmp_path: Path, watcher: Callable[[], PathWatcher], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = inotify.Inotify.add_watch

    def full(self: inotify.Inotify, path: Path, mask: int) -> int:
        raise OSError(errno.ENOSPC, "simulated: no inotify watches left")

    monkeypatch.setattr(inotify.Inotify, "add_watch", full)
    batches = Batches()
    w = watcher()
    w.watch(tmp_path, batches)
    assert w.watching() == {tmp_path: None}
    assert "cannot watch" in caplog.text
    monkeypatch.setattr(inotify.Inotify, "add_watch", real)
    w.check()
    assert w.watching() == {tmp_path: tmp_path} and batches.got == [set()]
    (tmp_path / "x").touch()
    await batches.names("x")


@aio
async def test_check_notices_a_directory_mounted_over_unseen(tmp_path: Path, watcher: Callable[[], PathWatcher]) -> None:
    """inotify watches an inode; a bind mount over the path hides it without an event."""
    target, other = tmp_path / "dir", tmp_path / "other"
    target.mkdir()
    other.mkdir()
    batches = Batches()
    w = watcher()
    w.watch(target, batches)
    w.check()
    assert batches.got == []  # nothing wrong, nothing said
    if subprocess.run(["mount", "--bind", str(other), str(target)], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        w.check()
        assert batches.got == [set()]
        (target / "x").touch()  # lands in `other`, through the mount
        await batches.names("x")
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=30)


@aio
async def test_a_failing_callback_does_not_stop_the_others(
    tmp_path: Path, watcher: Callable[[], PathWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(names: set[str]) -> None:
        raise RuntimeError("callback bug")

    batches = Batches()
    w = watcher()
    w.watch(tmp_path, broken)
    w.watch(tmp_path, batches)
    (tmp_path / "x").touch()
    await batches.names("x")
    assert "callback bug" in caplog.text


@aio
async def test_watches_made_before_start_hear_what_happened_in_between(tmp_path: Path) -> None:
    w = PathWatcher(LOG)
    batches = Batches()
    try:
        w.watch(tmp_path, batches)
        (tmp_path / "early").touch()
        w.start(asyncio.get_running_loop())
        await batches.names("early")
    finally:
        w.close()


@aio
async def test_close_releases_the_descriptor_and_the_handles(tmp_path: Path) -> None:
    w = PathWatcher(LOG)
    w.start(asyncio.get_running_loop())
    before = len(os.listdir("/proc/self/fd"))
    handle = w.watch(tmp_path, Batches())
    assert len(os.listdir("/proc/self/fd")) == before + 1
    w.close()
    assert len(os.listdir("/proc/self/fd")) == before
    assert not handle.active and w.watching() == {}
