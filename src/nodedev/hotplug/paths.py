"""One inotify descriptor for every directory the daemon watches, read on the event loop.

The daemon watches the kubelet's plugin directory (a restarting kubelet wipes
our sockets) and the drivers watch fixture trees and bind-mounted /dev trees,
where devices come and go with no uevent we could hear. All of them share one
`PathWatcher`, so a node pays for one descriptor and one reader however many
directories are watched.

A watched directory that does not exist yet (/dev/vfio before vfio loads) is
waited for on its nearest existing ancestor; each step of its path appearing
moves the watch down. A callback gets the names of the entries an event batch
concerned, or an EMPTY set meaning "something may have been missed, check
everything": the queue overflowed, or the directory itself appeared, vanished or
was replaced (every entry in it changed with it).

What is watched is the caller's choice (`Changes`): the plugin directory wants
its entries only, a fixture tree its entries and files, a /dev tree its entries
and their modes but never writes (device I/O).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from nodedev.hotplug.inotify import (
    IN_ATTRIB,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    IN_UNMOUNT,
    Inotify,
)

ENTRY_EVENTS = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
"""Entries appearing, vanishing, or renamed (`ln -sfn` renames a temporary link over the old one)."""
ATTRIBUTE_EVENTS = IN_ATTRIB
"""An entry's mode, owner or times changed (a device node made usable by chmod)."""
WRITE_EVENTS = IN_MODIFY
"""A file in the directory written or truncated (`echo 4 > sriov_numvfs`, `operstate`).

Not IN_CLOSE_WRITE: it fires on closing any descriptor opened for writing, written
to or not, so a scan that probes a watched node read-write (devnodes' ioctl on
/dev/kvm) would trigger its own rescan forever: 62,000 a second, measured. Every
write and truncation fires IN_MODIFY, so the last one of a rewrite is always heard."""
SELF_EVENTS = IN_DELETE_SELF | IN_MOVE_SELF
"""The watched directory itself removed or moved away: its watch is lost."""
GONE_EVENTS = SELF_EVENTS | IN_IGNORED | IN_UNMOUNT
ANCESTOR_EVENTS = IN_CREATE | IN_MOVED_TO | SELF_EVENTS
"""On the nearest existing parent of a missing directory: waiting for the next step of its path."""

ARM_ATTEMPTS = 64
"""Tries to place one watch while the path under it keeps changing; then `check()` retries."""

Callback = Callable[[set[str]], None]


class Changes(enum.Flag):
    """What a watch is told about: the entries of a directory, and the files in it."""

    ENTRIES = enum.auto()
    """Created, removed, renamed, replaced."""
    ATTRIBUTES = enum.auto()
    """Mode, owner or times changed."""
    WRITES = enum.auto()
    """Contents written or truncated. Never for a directory of device nodes: every write
    to /dev/null by any process on the node would wake the daemon."""
    ALL = ENTRIES | ATTRIBUTES | WRITES

    def mask(self) -> int:
        return (
            (ENTRY_EVENTS if Changes.ENTRIES in self else 0)
            | (ATTRIBUTE_EVENTS if Changes.ATTRIBUTES in self else 0)
            | (WRITE_EVENTS if Changes.WRITES in self else 0)
        )


class WatchHandle:
    """One caller's interest in one directory. `cancel()` ends it; safe to call twice.

    Plain classes here, not dataclasses: building those costs milliseconds of start-up.
    """

    def __init__(self, directory: Path, callback: Callback, mask: int, watcher: PathWatcher) -> None:
        self.directory = directory
        self.callback = callback
        self.mask = mask
        self._watcher: PathWatcher | None = watcher

    def __repr__(self) -> str:
        return f"WatchHandle({str(self.directory)!r}, mask={self.mask:#x}, active={self.active})"

    @property
    def active(self) -> bool:
        return self._watcher is not None

    def cancel(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher._cancel(self)


class _Target:
    """A directory someone asked for, and where it is watched now."""

    __slots__ = ("armed", "handles", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handles: list[WatchHandle] = []
        self.armed: Path | None = None
        """The target itself, its nearest existing ancestor, or None if no watch could be placed."""

    def mask(self) -> int:
        mask = SELF_EVENTS
        for handle in self.handles:
            mask |= handle.mask
        return mask


class _Dir:
    """A kernel watch: its descriptor, the mask this path wants, and the directory's
    (st_dev, st_ino) when it was placed, so `check()` notices a directory replaced unseen."""

    __slots__ = ("identity", "mask", "wd")

    def __init__(self, wd: int, mask: int, identity: tuple[int, int] | None) -> None:
        self.wd = wd
        self.mask = mask
        self.identity = identity


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _nearest_existing(path: Path) -> Path | None:
    """The path itself if it exists (a directory or not), else its nearest existing directory."""
    if os.path.exists(path):
        return path
    for parent in path.parents:
        if os.path.isdir(parent):
            return parent
    return None


DEV = "/dev"
DEVICE_FILESYSTEMS = frozenset({"devtmpfs"})


def mount_types(mountinfo: Path = Path("/proc/self/mountinfo")) -> dict[int, str]:
    """st_dev -> file system type, for every mount this process sees."""
    try:
        text = mountinfo.read_text()
    except OSError:
        return {}
    types: dict[int, str] = {}
    for line in text.splitlines():
        before, _, after = line.partition(" - ")
        fields = before.split()
        major, _, minor = fields[2].partition(":") if len(fields) > 2 else ("", "", "")
        if after and major.isdigit() and minor.isdigit():
            types.setdefault(os.makedev(int(major), int(minor)), after.split()[0])
    return types


def absolute(path: Path) -> Path:
    """The path made absolute and free of `..`; most already are, and building a Path costs."""
    if isinstance(path, Path) and path.is_absolute() and ".." not in path.parts:
        return path
    return Path(os.path.abspath(path))


def within(real: str, root: str) -> bool:
    """Whether the resolved path `real` is `root` or under it."""
    return real == root or real.startswith(root.rstrip("/") + "/")


def holds_devices(real: str, types: Mapping[int, str]) -> bool:
    """Whether the resolved path `real` is a directory of device nodes (the real /dev, or
    a devtmpfs mounted elsewhere), where writes are device I/O and must not be watched."""
    if within(real, DEV):
        return True
    existing = _nearest_existing(Path(real))
    try:
        device = os.stat(existing).st_dev if existing is not None else None
    except OSError:
        return False
    return device is not None and types.get(device) in DEVICE_FILESYSTEMS


def _next_step(target: Path, ancestor: Path) -> str:
    return target.relative_to(ancestor).parts[0]


class PathWatcher:
    """Watches directories for their entries and files changing; callbacks run on the loop.

    `watch()` may be called before `start()`: the kernel queues events until the
    loop reads them. The descriptor is opened with the first watch, so a process
    that never watches holds none. All methods must be called on the loop's
    thread (or before `start()`).
    """

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.log = log or logging.getLogger("nodedev.paths")
        self._inotify: Inotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._targets: dict[Path, _Target] = {}
        self._armed_at: dict[Path, set[Path]] = {}  # watched directory -> the targets placed on it
        self._dirs: dict[Path, _Dir] = {}
        self._wd_dirs: dict[int, set[Path]] = {}  # one wd per inode: two paths to one directory share it
        self._warned: set[Path] = set()

    # -- the public side ---------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts reading on `loop`. Idempotent, so an engine may start a shared watcher too."""
        if self._loop is loop:
            return
        if self._loop is not None and self._inotify is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._inotify.fd)
        self._loop = loop
        if self._inotify is not None:
            loop.add_reader(self._inotify.fd, self._on_readable)

    def watch(self, directory: Path, callback: Callback, changes: Changes = Changes.ALL) -> WatchHandle:
        """Calls `callback(names)` on the loop with the entries of `directory` that changed
        in the ways `changes` names, or with an empty set when anything may have changed.
        Raises OSError only if no inotify descriptor can be had."""
        self._open()
        path = absolute(directory)
        handle = WatchHandle(path, callback, changes.mask(), self)
        target = self._targets.get(path)
        if target is None:
            target = self._targets[path] = _Target(path)
        target.handles.append(handle)
        if target.armed is None:
            self._arm([path])
        else:
            self._sync(target.armed)
        return handle

    def watching(self) -> dict[Path, Path | None]:
        """Each watched directory and where its watch sits now (itself, an ancestor, or nowhere)."""
        return {path: target.armed for path, target in self._targets.items()}

    def check(self) -> None:
        """The backstop: re-places every watch that is missing, misplaced or on a directory
        replaced unseen (a bind mount over it), and calls those handles with an empty set."""
        stale = [d for d, info in self._dirs.items() if _identity(d) != info.identity]
        for directory in stale:
            self._forget(directory, remove=True)
        suspects = [t.path for t in self._targets.values() if t.armed is None or t.armed in stale or _nearest_existing(t.path) != t.armed]
        if suspects:
            self.log.warning("inotify: %d watch(es) were lost or misplaced; checking them", len(suspects))
            self._arm(suspects)
            self._deliver({h: None for p in suspects if p in self._targets for h in self._targets[p].handles})

    def close(self) -> None:
        """Stops reading and drops every watch; the handles become inactive."""
        for target in self._targets.values():
            for handle in target.handles:
                handle._watcher = None
        self._targets.clear()
        self._armed_at.clear()
        self._dirs.clear()
        self._wd_dirs.clear()
        self._shut()
        self._loop = None

    # -- the descriptor ----------------------------------------------------------

    def _open(self) -> None:
        if self._inotify is None:
            self._inotify = Inotify()
            if self._loop is not None:
                self._loop.add_reader(self._inotify.fd, self._on_readable)

    def _shut(self) -> None:
        inotify, self._inotify = self._inotify, None
        if inotify is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(inotify.fd)
        inotify.close()

    def _on_readable(self) -> None:
        assert self._inotify is not None
        pending: dict[WatchHandle, set[str] | None] = {}
        rearm: set[Path] = set()
        try:
            for wd, mask, name in self._inotify.read():
                self._route(wd, mask, name, pending, rearm)
        except OSError as err:
            self.log.error("inotify: reading failed (%s); opening a new descriptor", err)
            self._reset()
            return
        if rearm:
            self._after_rearm(rearm, pending)
        self._deliver(pending)

    def _reset(self) -> None:
        """A broken descriptor: a fresh one, every watch placed again, everyone told to check."""
        self._shut()
        self._dirs.clear()
        self._wd_dirs.clear()
        self._armed_at.clear()
        for target in self._targets.values():
            target.armed = None
        self._open()
        self._arm(list(self._targets))
        self._deliver({h: None for t in self._targets.values() for h in t.handles})

    # -- routing events ------------------------------------------------------------

    def _route(self, wd: int, mask: int, name: str, pending: dict[WatchHandle, set[str] | None], rearm: set[Path]) -> None:
        if mask & IN_Q_OVERFLOW:
            self.log.warning("inotify: event queue overflow, path changes were dropped; checking everything")
            for target in self._targets.values():
                for handle in target.handles:
                    pending[handle] = None
            rearm.update(self._targets)
            return
        for directory in list(self._wd_dirs.get(wd, ())):
            targets = [self._targets[p] for p in self._armed_at.get(directory, ()) if p in self._targets]
            if mask & GONE_EVENTS:
                self._forget(directory, remove=not mask & IN_IGNORED)
                rearm.update(t.path for t in targets)
            for target in targets:
                if target.path == directory:
                    for handle in target.handles:
                        if mask & GONE_EVENTS or (mask & handle.mask and not name):
                            pending[handle] = None  # the directory itself changed: every entry may have
                        elif mask & handle.mask:
                            names = pending.setdefault(handle, set())
                            if names is not None:
                                names.add(name)
                elif mask & ANCESTOR_EVENTS and name == _next_step(target.path, directory):
                    rearm.add(target.path)

    def _after_rearm(self, paths: set[Path], pending: dict[WatchHandle, set[str] | None]) -> None:
        """Targets that appeared or vanished in the re-arming changed wholesale: check everything."""
        for path in self._arm(paths):
            for handle in self._targets[path].handles:
                pending[handle] = None

    def _deliver(self, pending: dict[WatchHandle, set[str] | None]) -> None:
        for handle, names in pending.items():
            if not handle.active:  # cancelled by an earlier callback of this batch
                continue
            try:
                handle.callback(set() if names is None else names)
            except Exception:  # one caller's bug must not stop the others' events
                self.log.exception("inotify: the callback for %s failed", handle.directory)

    # -- placing watches -------------------------------------------------------------

    def _arm(self, paths: Iterable[Path]) -> set[Path]:
        """Places each target on itself if it exists, else on its nearest existing ancestor.

        Returns the targets that appeared, vanished or could no longer be watched.
        A directory that vanishes between the check and the watch is placed again
        one level up; one whose next step appears just after the watch on its
        ancestor was placed moves down at once, since no event will say so.
        """
        work = list(dict.fromkeys(paths))
        before: dict[Path, bool] = {}
        budget = ARM_ATTEMPTS * (len(work) + 1)
        while work and budget > 0:
            budget -= 1
            target = self._targets.get(work.pop())
            if target is None:
                continue
            before.setdefault(target.path, target.armed == target.path)
            where = _nearest_existing(target.path)
            self._place(target, where)
            if where is None:
                continue
            code = self._sync(where)
            if code in (errno.ENOENT, errno.ENOTDIR):
                work.extend(self._armed_at.get(where, ()))
                for path in self._armed_at.get(where, set()).copy():
                    self._place(self._targets[path], None)
            elif code:
                for path in self._armed_at.get(where, set()).copy():
                    self._place(self._targets[path], None)
            elif where != target.path and self._step_appeared(target.path, where):
                work.append(target.path)
        for path in work:
            self.log.warning("inotify: %s keeps changing; its watch is placed again at the next check", path)
        return {p for p, was in before.items() if p in self._targets and (self._targets[p].armed == p) != was}

    @staticmethod
    def _step_appeared(target: Path, ancestor: Path) -> bool:
        """Whether the next step below `ancestor` exists now, as what `_nearest_existing` needs."""
        step = ancestor / _next_step(target, ancestor)
        return os.path.exists(step) if step == target else os.path.isdir(step)

    def _place(self, target: _Target, where: Path | None) -> None:
        old = target.armed
        if old == where:
            return
        target.armed = where
        if where is not None:
            self._armed_at.setdefault(where, set()).add(target.path)
        if old is not None:
            at = self._armed_at.get(old)
            if at is not None:
                at.discard(target.path)
                if not at:
                    del self._armed_at[old]
            self._sync(old)

    def _wanted(self, directory: Path) -> int:
        mask = 0
        for path in self._armed_at.get(directory, ()):
            target = self._targets.get(path)
            if target is not None:
                mask |= target.mask() if path == directory else ANCESTOR_EVENTS
        return mask

    def _sync(self, directory: Path) -> int:
        """Makes the kernel's watch on `directory` fit its targets; returns 0 or the errno."""
        wanted = self._wanted(directory)
        current = self._dirs.get(directory)
        if not wanted:
            if current is not None:
                self._forget(directory, remove=True)
            return 0
        if current is not None and current.mask == wanted:
            return 0
        assert self._inotify is not None
        sharing = self._wd_dirs.get(current.wd, set()) - {directory} if current is not None else set()
        kernel_mask = wanted
        for other in sharing:
            kernel_mask |= self._dirs[other].mask
        try:
            wd = self._inotify.add_watch(directory, kernel_mask)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTDIR) and directory not in self._warned:
                self._warned.add(directory)
                self.log.warning("inotify: cannot watch %s: %s; its changes are seen only at resync", directory, err)
            if current is not None:
                self._forget(directory, remove=False)
            return err.errno or errno.EIO
        if current is not None and current.wd != wd:  # replaced by a new directory we had not heard of
            self._forget(directory, remove=True)
            current = None
        others = self._wd_dirs.setdefault(wd, set()) - {directory}
        if others and current is None:  # a second path to a watched inode: keep what the others asked for
            union = kernel_mask
            for other in others:
                union |= self._dirs[other].mask
            if union != kernel_mask:
                self._inotify.add_watch(directory, union)
        self._wd_dirs[wd].add(directory)
        self._dirs[directory] = _Dir(wd, wanted, _identity(directory))
        self._warned.discard(directory)
        return 0

    def _forget(self, directory: Path, *, remove: bool) -> None:
        info = self._dirs.pop(directory, None)
        if info is None:
            return
        paths = self._wd_dirs.get(info.wd)
        if paths is not None:
            paths.discard(directory)
            if paths:
                return  # another path to the same inode still wants the watch
            del self._wd_dirs[info.wd]
        if remove and self._inotify is not None:
            self._inotify.rm_watch(info.wd)

    def _cancel(self, handle: WatchHandle) -> None:
        target = self._targets.get(handle.directory)
        if target is None:
            return
        target.handles = [h for h in target.handles if h is not handle]
        if target.handles:
            if target.armed is not None:
                self._sync(target.armed)
            return
        del self._targets[target.path]
        self._place(target, None)
