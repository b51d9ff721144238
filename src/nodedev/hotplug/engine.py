"""The hotplug engine: every kernel device event the daemon hears, routed on the event loop.

One engine serves the whole daemon, whatever the number of drivers, so a node
pays for one netlink socket per kind and no thread. Three channels feed it, each
a non-blocking descriptor read by `loop.add_reader`: uevents (`uevents.py`),
rtnetlink link messages (`rtnetlink.py`, opened only when a driver's `net`
match can take `link` events) and inotify on the directories drivers name in
`watch_paths()` (`paths.py`, the daemon's shared PathWatcher).

The engine only routes: the events of one moment (a SETTLE_S window) call
`on_match(driver, names)` once for each driver a subscription of which one of
them matched, with the kernel names those events concerned (None for "read
everything"), and the Inventory turns those calls into scans. A path event
names the watched directory and the entries that changed in it: on a fixture
tree laid out as sysfs is, the same names a uevent would carry. When events may have been lost (a netlink receive buffer overrun, a
socket that failed and was reopened) it calls `on_lost(reason)`, and the
Inventory rescans every driver: a full snapshot after the gap makes up for any
event missed in it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from nodedev.driver import UdevMatch
from nodedev.hotplug.paths import Changes, PathWatcher, WatchHandle, absolute, holds_devices, mount_types, within
from nodedev.hotplug.rtnetlink import LINK_ACTION, LinkChannel
from nodedev.hotplug.uevents import DEFAULT_RECEIVE_BUFFER, UDEV_CONTROL, Channel, Source, Uevent, UeventChannel, resolve_source

SETTLE_S = 0.002
"""How long matches are gathered before the drivers are told. One change often
sends several messages on two sockets within a millisecond (a veth pair: two
`add` uevents, then two RTM_NEWLINK); telling the Inventory once, after they all
arrived, means one scan that sees the final state instead of a scan of a half
made pair and a second one right after."""

REOPEN_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits between attempts to reopen a failed channel; the last one repeats."""

SYSFS = "/sys"
"""Paths that resolve under it are never watched: inotify sees nothing on sysfs; uevents are its signal."""

OnMatch = Callable[[str, frozenset[str] | None], None]


def fits(match: UdevMatch, event: Uevent, names: Sequence[str]) -> bool:
    """Whether one event is what one match asked for (the subsystem is already known to agree)."""
    if match.actions and event.action not in match.actions:
        return False
    if match.sys_name is not None and not any(fnmatch.fnmatchcase(name, match.sys_name) for name in names):
        return False
    for key, pattern in match.properties.items():
        value = event.properties.get(key)
        if value is None or not fnmatch.fnmatchcase(value, pattern):
            return False
    return True


def _entries(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:  # not there yet (watched on an ancestor), or not a directory
        return []


def under_sysfs(path: Path) -> bool:
    return within(os.path.realpath(path), SYSFS)


class _Resolver:
    """`os.path.realpath` for many paths that share parents (4,096 VF directories in one
    `devices/pci0000:00`): each parent is resolved once, and a path only when it is a link."""

    def __init__(self) -> None:
        self._parents: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        if path.parent == path or os.path.islink(path):
            return os.path.realpath(path)
        parent = self._parents.get(path.parent)
        if parent is None:
            parent = self._parents[path.parent] = os.path.realpath(path.parent)
        return os.path.join(parent, path.name)


class HotplugEngine:
    """Routes kernel device events to the drivers that asked for them. Lives on one loop.

    `subscribe()` may be called before or after `start()`; a netlink channel is
    opened only once some driver needs it. `inject()` is the single entry point of
    every netlink event, the same one the channels call, so tests and simulations
    exercise the real path. `paths` is the daemon's shared inotify watcher; without
    one the engine makes its own. All methods must be called on the loop's thread
    (or before `start()`).
    """

    def __init__(
        self,
        *,
        source: Source,
        on_match: OnMatch,
        on_lost: Callable[[str], None],
        log: logging.Logger,
        paths: PathWatcher | None = None,
        receive_buffer_size: int = DEFAULT_RECEIVE_BUFFER,
        link_events: bool = True,
        settle_s: float = SETTLE_S,
        udev_control: Path = UDEV_CONTROL,
    ) -> None:
        self.source: str = resolve_source(source, udev_control)
        self.log = log
        self._udev_control = udev_control
        self._on_match = on_match
        self._on_lost = on_lost
        self._own_paths = paths is None
        self.paths = paths if paths is not None else PathWatcher(log)
        self._buffer = receive_buffer_size
        self._link_events = link_events
        self._settle_s = settle_s
        self._pending: dict[str, set[str] | None] = {}  # driver -> names of this window; None: everything
        self._flush: asyncio.TimerHandle | None = None
        self._subscriptions: dict[str, tuple[tuple[UdevMatch, ...], tuple[Path, ...]]] = {}
        self._routes: dict[str, list[tuple[str, UdevMatch]]] = {}
        self._watched: dict[str, frozenset[Path]] = {}  # driver -> its watch paths, absolute
        self._path_drivers: dict[Path, set[str]] = {}
        self._path_handles: dict[Path, WatchHandle] = {}
        self._in_sysfs: set[Path] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: dict[str, Channel] = {}
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._failures: dict[str, int] = {}

    # -- subscriptions -------------------------------------------------------

    def subscribe(self, driver: str, matches: Sequence[UdevMatch], paths: Sequence[Path]) -> None:
        """Sets (or replaces) what one driver wants to hear about; no matches and no
        paths unsubscribes it. Called after every scan, so an unchanged subscription
        returns at once and a changed one touches only the difference."""
        wanted = (tuple(matches), tuple(paths))
        before = self._subscriptions.get(driver, ((), ()))
        if wanted == before:
            return
        if wanted == ((), ()):
            self._subscriptions.pop(driver, None)
        else:
            self._subscriptions[driver] = wanted
        if wanted[1] != before[1]:
            self._set_paths(driver, wanted[1])
        if wanted[0] != before[0]:
            self._routes = self._build_routes()
            if self._loop is not None:
                self._open_all()

    def _build_routes(self) -> dict[str, list[tuple[str, UdevMatch]]]:
        routes: dict[str, list[tuple[str, UdevMatch]]] = {}
        for name, (matches, _paths) in self._subscriptions.items():
            for match in matches:
                routes.setdefault(match.subsystem, []).append((name, match))
        return routes

    def _set_paths(self, driver: str, paths: Sequence[Path]) -> None:
        """Watches what is new and lets go of what is gone. A directory under the real /sys
        is never watched; one of device nodes (/dev) is watched for entries and modes only.

        A directory is watched only once the scan that listed it has returned, so what
        changed in it in between (a function bound while `drivers/<new driver>/` was
        being listed) would go unheard: after a driver's first subscription, each
        directory newly watched is reported once, naming itself and every entry in it."""
        new = frozenset(map(absolute, paths))
        old = self._watched.get(driver, frozenset())
        first = driver not in self._watched
        if new:
            self._watched[driver] = new
        else:
            self._watched.pop(driver, None)
        for path in old - new:
            drivers = self._path_drivers.get(path)
            if drivers is None:
                continue
            drivers.discard(driver)
            if not drivers:
                del self._path_drivers[path]
                self._path_handles.pop(path).cancel()
        types: dict[int, str] | None = None
        resolve = _Resolver()
        watched: list[Path] = []
        for path in new - old:
            if path in self._path_drivers:
                self._path_drivers[path].add(driver)
                watched.append(path)
                continue
            if path in self._in_sysfs:
                continue
            real = resolve(path)
            if within(real, SYSFS):
                self._in_sysfs.add(path)
                continue
            types = mount_types() if types is None else types
            self._path_drivers[path] = {driver}
            if self._watch(path, Changes.ENTRIES | Changes.ATTRIBUTES if holds_devices(real, types) else Changes.ALL):
                watched.append(path)
        if watched and not first:
            self.notify(driver, {name for path in watched for name in (path.name, *_entries(path))})

    def _watch(self, path: Path, changes: Changes) -> bool:
        try:
            self._path_handles[path] = self.paths.watch(path, functools.partial(self._on_path_change, path), changes)
        except OSError as err:
            self.log.error("inotify unavailable (%s); changes under %s are seen only at resync", err, path)
            del self._path_drivers[path]
            return False
        return True

    def _on_path_change(self, path: Path, names: set[str]) -> None:
        """A watched directory's change names what a uevent would: the directory
        (`<pci>` for its `driver` link replaced, `eth0` for its `carrier`
        rewritten) and the entries that changed in it (`class/net` gaining
        `eth1`). An empty set, "something may have been missed", names nothing."""
        told = frozenset({path.name, *names}) if names else None
        for driver in sorted(self._path_drivers.get(path, ())):
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("path %s: %s -> %s", path, sorted(names) or "everything", driver)
            self.notify(driver, told)

    @property
    def channels(self) -> frozenset[str]:
        """The netlink channels open now, by kind."""
        return frozenset(self._channels)

    # -- lifecycle -----------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Opens the channels the subscriptions need; raises OSError if netlink is unavailable."""
        self._loop = loop
        if self.source == "udev" and not self._udev_control.exists():
            self.log.warning(
                "hotplug source 'udev' but %s does not exist: without a running udevd no events arrive; use source 'kernel' or 'auto'",
                self._udev_control,
            )
        self.paths.start(loop)
        self._open_all(raise_errors=True)

    def close(self) -> None:
        """Closes the channels and drops this engine's path watches (and its own watcher)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._pending.clear()
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for kind in list(self._channels):
            self._close(kind)
        for watch in self._path_handles.values():
            watch.cancel()
        self._path_handles.clear()
        self._path_drivers.clear()
        self._watched.clear()
        self._subscriptions.clear()
        self._routes = {}
        if self._own_paths:
            self.paths.close()
        self._loop = None

    def _wanted(self) -> dict[str, Callable[[], Channel]]:
        wanted: dict[str, Callable[[], Channel]] = {}
        if self._routes:
            subsystems = sorted(self._routes)
            wanted[UeventChannel.kind] = lambda: UeventChannel(
                self.source, subsystems, self._buffer, self.inject, self.report_lost, self.log
            )
        if self._link_events and any(not m.actions or LINK_ACTION in m.actions for _, m in self._routes.get("net", ())):
            wanted[LinkChannel.kind] = lambda: LinkChannel(self._buffer, self.inject, self.report_lost, self.log)
        return wanted

    def _open_all(self, *, raise_errors: bool = False) -> None:
        wanted = self._wanted()
        for kind in list(self._channels):
            if kind not in wanted:
                self._close(kind)
        for kind, factory in wanted.items():
            channel = self._channels.get(kind)
            if isinstance(channel, UeventChannel):
                channel.set_subsystems(sorted(self._routes))
            elif channel is None and kind not in self._retries:
                try:
                    self._open(kind, factory)
                except OSError as err:
                    if raise_errors:
                        self.close()
                        raise
                    self._schedule_reopen(kind, err)

    def _open(self, kind: str, factory: Callable[[], Channel]) -> None:
        assert self._loop is not None
        channel = factory()
        self._channels[kind] = channel
        self._loop.add_reader(channel.fileno(), self._on_readable, kind)

    def _close(self, kind: str) -> None:
        channel = self._channels.pop(kind, None)
        if channel is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(channel.fileno())
        try:
            channel.close()
        except OSError as err:
            self.log.debug("%s: close failed: %s", kind, err)

    def _on_readable(self, kind: str) -> None:
        channel = self._channels.get(kind)
        if channel is None:
            return
        try:
            channel.drain()
        except OSError as err:
            self._fail(kind, err)

    def _fail(self, kind: str, err: OSError) -> None:
        """A broken channel is closed and reopened; whatever it missed, a full resync covers."""
        self.log.error("%s failed: %s; reopening it", kind, err)
        self._close(kind)
        self._schedule_reopen(kind, err, delay=0.0)

    def _schedule_reopen(self, kind: str, err: OSError, delay: float | None = None) -> None:
        if self._loop is None:
            return
        if delay is None:
            failures = self._failures.get(kind, 0)
            delay = REOPEN_DELAYS_S[min(failures, len(REOPEN_DELAYS_S) - 1)]
            self._failures[kind] = failures + 1
            self.log.error("%s cannot be opened: %s; retrying in %.1f s", kind, err, delay)
        self._retries[kind] = self._loop.call_later(delay, self._reopen, kind)

    def _reopen(self, kind: str) -> None:
        self._retries.pop(kind, None)
        factory = self._wanted().get(kind)
        if factory is None or kind in self._channels:
            return
        try:
            self._open(kind, factory)
        except OSError as err:
            self._schedule_reopen(kind, err)
            return
        self._failures.pop(kind, None)
        self.report_lost(f"{kind} was reopened after a failure; events in between may be missing")

    # -- events --------------------------------------------------------------

    def inject(self, event: Uevent) -> None:
        """Routes one event to each driver a match of which it fits: see `notify()`."""
        routes = self._routes.get(event.subsystem)
        if not routes:
            return
        names = event.names()
        told: set[str] = set()
        for driver, match in routes:
            if driver not in told and fits(match, event, names):
                told.add(driver)
                if self.log.isEnabledFor(logging.DEBUG):
                    self.log.debug("%s %s/%s -> %s", event.action, event.subsystem, event.sys_name, driver)
                self.notify(driver, names)

    def notify(self, driver: str, names: Iterable[str] | None) -> None:
        """Tells `driver` once the settle window closes (at once without a loop or a window),
        with the union of the names of the window; None, "everything", absorbs them."""
        if self._loop is None or self._settle_s <= 0:
            self._call_on_match(driver, None if names is None else frozenset(names))
            return
        if driver not in self._pending:
            self._pending[driver] = None if names is None else set(names)
        else:
            pending = self._pending[driver]
            if names is None:
                self._pending[driver] = None
            elif pending is not None:
                pending.update(names)
        if self._flush is None:
            self._flush = self._loop.call_later(self._settle_s, self._flush_pending)

    def _flush_pending(self) -> None:
        self._flush = None
        pending, self._pending = self._pending, {}
        for driver, names in pending.items():
            self._call_on_match(driver, None if names is None else frozenset(names))

    def _call_on_match(self, driver: str, names: frozenset[str] | None) -> None:
        try:
            self._on_match(driver, names)
        except Exception:  # a listener bug must not stop event delivery
            self.log.exception("hotplug: on_match(%r, %s) failed", driver, sorted(names) if names is not None else None)

    def report_lost(self, reason: str) -> None:
        """Events may have been dropped: every driver needs a full rescan. The overflow path."""
        self.log.warning("hotplug: %s; resyncing every driver", reason)
        try:
            self._on_lost(reason)
        except Exception:  # as in notify()
            self.log.exception("hotplug: on_lost failed")
