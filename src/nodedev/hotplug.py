"""The hotplug engine: every kernel device event the daemon hears, on the event loop.

One engine serves the whole daemon, whatever the number of drivers, so a node
pays for one netlink socket and one inotify descriptor, and no thread. Three
channels feed it, each a non-blocking descriptor read by `loop.add_reader`:

* uevents, through one pyudev netlink monitor. Source `udev` hears devices after
  udevd has set them up (nodes created, names final); `kernel` hears the raw
  kernel broadcast, the only choice where no udevd runs (a container, a minimal
  VM). `auto` picks `udev` exactly when udevd's control socket exists.
* rtnetlink link messages (RTM_NEWLINK/RTM_DELLINK), opened only when a driver
  subscribes to the `net` subsystem. A link losing its carrier or going down
  sends no uevent at all, so without them a network driver would see a pulled
  cable only at the next periodic resync. They arrive as `Uevent(action="link")`.
* inotify on the directories drivers name in `watch_paths()`, for device nodes
  that come and go with no uevent we could hear (a fixture tree, a bind mount).

The engine only routes: the events of one moment (a SETTLE_S window) call
`on_match(driver)` once for each driver whose subscription one of them matches,
and the Inventory turns those calls into coalesced rescans. When events may have been lost (a netlink receive buffer overrun, an
inotify queue overflow, a socket that failed and was reopened) it calls
`on_lost(reason)`, and the Inventory rescans every driver: a full snapshot
after the gap makes up for any event missed in it.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import inotify_simple
import pyudev

from nodedev.driver import UdevMatch

Source = Literal["auto", "udev", "kernel"]

UDEV_CONTROL = Path("/run/udev/control")
"""Exists while a udevd runs; without one, the `udev` netlink group stays silent."""

DEFAULT_RECEIVE_BUFFER = 8 << 20
"""Bytes of socket buffer per netlink channel. A uevent is a few hundred bytes, so
8 MiB holds tens of thousands: a burst of hotplugged VFs while a scan runs fits."""

DRAIN_LIMIT = 256
"""Messages handled per wake-up before the loop gets a turn; the descriptor stays
readable, so the rest are read on the next turn."""

SETTLE_S = 0.002
"""How long matches are gathered before the drivers are told. One change often
sends several messages on two sockets within a millisecond (a veth pair: two
`add` uevents, then two RTM_NEWLINK); telling the Inventory once, after they all
arrived, means one scan that sees the final state instead of a scan of a half
made pair and a second one a rescan-spacing later."""

REOPEN_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits between attempts to reopen a failed channel; the last one repeats."""


@dataclass(frozen=True, slots=True)
class Uevent:
    """One device event, from the kernel, from rtnetlink, or injected by a test.

    `properties` are the uevent's KEY=value pairs (INTERFACE, IFINDEX, DEVNAME,
    DEVPATH_OLD on a rename, ...); routing needs only the other fields.
    """

    action: str
    subsystem: str
    sys_name: str
    devpath: str = ""
    properties: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_pyudev(cls, device: pyudev.Device) -> Uevent:
        return cls(
            action=device.action or "",
            subsystem=device.subsystem or "",
            sys_name=device.sys_name or "",
            devpath=device.device_path or "",
            properties=dict(device.properties),
        )

    def names(self) -> tuple[str, ...]:
        """The kernel names this event concerns: a rename concerns the old name too,
        because a driver that served the device under its old name must drop it."""
        old = self.properties.get("DEVPATH_OLD")
        if old:
            old_name = old.rsplit("/", 1)[-1]
            if old_name != self.sys_name:
                return (self.sys_name, old_name)
        return (self.sys_name,)


def resolve_source(source: Source, control: Path = UDEV_CONTROL) -> Literal["udev", "kernel"]:
    if source == "auto":
        return "udev" if control.exists() else "kernel"
    return source


def _set_receive_buffer(sock: socket.socket, size: int) -> None:
    """SO_RCVBUFFORCE passes net.core.rmem_max (we run as root); plain SO_RCVBUF is
    the fallback, capped by the sysctl, for a daemon without CAP_NET_ADMIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _pending_socket_error(fd: int) -> int:
    """Reads (and clears) a socket's pending error. pyudev's poll() reports POLLERR
    without an errno, and on a netlink socket that error is almost always ENOBUFS."""
    try:
        with socket.fromfd(fd, socket.AF_NETLINK, socket.SOCK_RAW) as sock:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return 0


class _Channel(Protocol):
    """An open descriptor the engine reads on the loop. `drain()` raises OSError when
    the channel is broken and must be reopened; an overrun it reports and survives."""

    kind: str

    def fileno(self) -> int: ...

    def drain(self) -> None: ...

    def close(self) -> None: ...


class _UeventChannel:
    """The pyudev netlink monitor, filtered by libudev to the subscribed subsystems."""

    kind = "uevent monitor"

    def __init__(self, source: str, subsystems: Sequence[str], buffer: int, engine: HotplugEngine) -> None:
        self._engine = engine
        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
        try:
            self._monitor.set_receive_buffer_size(buffer)
        except OSError as err:
            engine.log.warning("uevent monitor: cannot set a %d byte receive buffer: %s", buffer, err)
        self._filtered: set[str] = set()
        self.set_subsystems(subsystems)
        self._monitor.start()  # also makes the descriptor non-blocking

    def set_subsystems(self, subsystems: Sequence[str]) -> None:
        """Filters in libudev (and in the kernel for udevd's messages), so unrelated
        devices never reach Python. Filters only grow: a subsystem no driver wants
        any more costs a wake-up, and routing drops its events."""
        for subsystem in subsystems:
            if subsystem not in self._filtered:
                self._monitor.filter_by(subsystem)
                self._filtered.add(subsystem)

    def fileno(self) -> int:
        return self._monitor.fileno()

    def drain(self) -> None:
        for _ in range(DRAIN_LIMIT):
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as err:
                code = err.errno or _pending_socket_error(self.fileno())
                if code == errno.ENOBUFS:
                    self._engine.report_lost("uevent monitor: netlink receive buffer overrun (ENOBUFS), events were dropped")
                    continue
                if code and not err.errno:
                    raise OSError(code, f"uevent monitor: {os.strerror(code)}") from err
                raise
            if device is None:
                return
            try:
                event = Uevent.from_pyudev(device)
            except Exception as err:  # noqa: BLE001 - one unreadable event must not stop the others
                self._engine.log.warning("uevent monitor: cannot read an event: %s", err)
                continue
            self._engine.inject(event)

    def close(self) -> None:
        # libudev closes the socket when the last reference goes; drop ours now.
        self._monitor = None  # type: ignore[assignment]


RTMGRP_LINK = 1
RTM_NEWLINK = 16
RTM_DELLINK = 17
IFLA_IFNAME = 3
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, (pad), type, index, flags, change
_RTATTR = struct.Struct("=HH")  # length, type


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_link_messages(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(message type, ifindex, ifname) of each RTM_NEWLINK/RTM_DELLINK in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return
        body = offset + _NLMSGHDR.size
        if msg_type in (RTM_NEWLINK, RTM_DELLINK) and length >= _NLMSGHDR.size + _IFINFOMSG.size:
            _family, _type, index, _ifflags, _change = _IFINFOMSG.unpack_from(data, body)
            name = _link_name(data, body + _IFINFOMSG.size, offset + length)
            if name:
                yield msg_type, index, name
        offset += _align4(length)


def _link_name(data: bytes, offset: int, end: int) -> str:
    while offset + _RTATTR.size <= end:
        length, attr_type = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            return ""
        if attr_type == IFLA_IFNAME:
            return data[offset + _RTATTR.size : offset + length].split(b"\0", 1)[0].decode(errors="replace")
        offset += _align4(length)
    return ""


class _LinkChannel:
    """rtnetlink link messages, for the state changes (carrier, up/down) that send no uevent."""

    kind = "rtnetlink link monitor"

    def __init__(self, buffer: int, engine: HotplugEngine) -> None:
        self._engine = engine
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        try:
            _set_receive_buffer(self._sock, buffer)
        except OSError as err:
            engine.log.warning("rtnetlink: cannot set a %d byte receive buffer: %s", buffer, err)
        self._sock.bind((0, RTMGRP_LINK))

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> None:
        for _ in range(DRAIN_LIMIT):
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                self._engine.report_lost("rtnetlink: receive buffer overrun (ENOBUFS), link changes were dropped")
                continue
            for msg_type, index, name in parse_link_messages(data):
                what = "NEWLINK" if msg_type == RTM_NEWLINK else "DELLINK"
                self._engine.inject(
                    Uevent(action="link", subsystem="net", sys_name=name, properties={"RTM": what, "IFINDEX": str(index)})
                )

    def close(self) -> None:
        self._sock.close()


_IN = inotify_simple.flags
ENTRY_MASK = _IN.CREATE | _IN.DELETE | _IN.MOVED_FROM | _IN.MOVED_TO | _IN.ATTRIB | _IN.DELETE_SELF | _IN.MOVE_SELF
"""On a watched directory itself: any entry appearing, vanishing or changing mode."""
ANCESTOR_MASK = _IN.CREATE | _IN.MOVED_TO | _IN.DELETE_SELF | _IN.MOVE_SELF
"""On the nearest existing parent of a missing directory: waiting for the next step of its path."""


class _PathChannel:
    """One inotify descriptor for every watched directory of every driver.

    A directory that does not exist yet (/dev/vfio before vfio loads) is waited
    for on its nearest existing ancestor; each step of its path appearing moves
    the watch down, and the directory itself appearing or vanishing notifies its
    drivers, since every entry in it appeared or vanished with it.
    """

    kind = "inotify path watch"

    def __init__(self, targets: Mapping[Path, frozenset[str]], engine: HotplugEngine) -> None:
        self._engine = engine
        self._inotify = inotify_simple.INotify(nonblocking=True)
        self._targets: dict[Path, frozenset[str]] = {}
        self._armed: dict[Path, Path] = {}  # target -> the directory watched for it
        self._wd_dir: dict[int, Path] = {}
        self._dir_wd: dict[Path, int] = {}
        self._dir_mask: dict[Path, int] = {}
        self.set_targets(targets)

    def set_targets(self, targets: Mapping[Path, frozenset[str]]) -> None:
        self._targets = dict(targets)
        for target in list(self._armed):
            if target not in self._targets:
                del self._armed[target]
        for target in self._targets:
            self._arm(target)
        self._sync_watches()

    def fileno(self) -> int:
        return self._inotify.fileno()

    def drain(self) -> None:
        notify: set[str] = set()
        rearm: set[Path] = set()
        for event in self._inotify.read(timeout=0):
            if event.mask & _IN.Q_OVERFLOW:
                self._engine.report_lost("inotify: event queue overflow, path changes were dropped")
                rearm.update(self._targets)
                continue
            directory = self._wd_dir.get(event.wd)
            if directory is None:
                continue
            gone = event.mask & (_IN.IGNORED | _IN.DELETE_SELF | _IN.MOVE_SELF | _IN.UNMOUNT)
            if gone:
                self._forget(directory, remove=not event.mask & _IN.IGNORED)
            for target, armed in self._armed.items():
                if armed != directory:
                    continue
                if target == directory:
                    notify |= self._targets[target]
                    if gone:
                        rearm.add(target)
                elif gone or self._next_step(target, directory) == event.name:
                    rearm.add(target)
        for target in rearm:
            before = self._armed.get(target)
            after = self._arm(target)
            # It appeared or vanished (or can no longer be watched at all): rescan.
            if (before == target) != (after == target) or after is None:
                notify |= self._targets[target]
        if rearm:
            self._sync_watches()
        for driver in sorted(notify):
            self._engine.notify(driver, "path")

    @staticmethod
    def _next_step(target: Path, ancestor: Path) -> str:
        return target.relative_to(ancestor).parts[0]

    def _arm(self, target: Path) -> Path | None:
        """Points the target at itself if it exists, else at its nearest existing ancestor."""
        for candidate in (target, *target.parents):
            if candidate.is_dir() or (candidate == target and candidate.exists()):
                self._armed[target] = candidate
                return candidate
        self._armed.pop(target, None)
        return None

    def _sync_watches(self) -> None:
        """Adds, changes and removes inotify watches to fit `_armed`; a directory that
        vanished between the check and the watch is armed again one level up."""
        for _attempt in range(64):
            wanted: dict[Path, int] = {}
            for target, directory in self._armed.items():
                mask = ENTRY_MASK if directory == target else ANCESTOR_MASK
                wanted[directory] = wanted.get(directory, 0) | mask
            for directory in [d for d in self._dir_wd if d not in wanted]:
                self._forget(directory, remove=True)
            retry = False
            for directory, mask in wanted.items():
                if self._dir_mask.get(directory) == mask:
                    continue
                try:
                    wd = self._inotify.add_watch(directory, mask)
                except OSError as err:
                    if err.errno not in (errno.ENOENT, errno.ENOTDIR):
                        self._engine.log.warning("inotify: cannot watch %s: %s; changes under it are seen only at resync", directory, err)
                        self._drop_targets_at(directory)
                        retry = True
                        continue
                    for target, armed in list(self._armed.items()):
                        if armed == directory:
                            self._arm(target)
                    retry = True
                    continue
                self._wd_dir[wd] = directory
                self._dir_wd[directory] = wd
                self._dir_mask[directory] = mask
            if not retry:
                return

    def _drop_targets_at(self, directory: Path) -> None:
        for target, armed in list(self._armed.items()):
            if armed == directory:
                del self._armed[target]

    def _forget(self, directory: Path, *, remove: bool) -> None:
        wd = self._dir_wd.pop(directory, None)
        self._dir_mask.pop(directory, None)
        if wd is None:
            return
        self._wd_dir.pop(wd, None)
        if remove:
            try:
                self._inotify.rm_watch(wd)
            except OSError:
                pass  # already gone with its directory

    def close(self) -> None:
        self._inotify.close()



class HotplugEngine:
    """Routes kernel device events to the drivers that asked for them. Lives on one loop.

    `subscribe()` may be called before or after `start()`; a channel is opened only
    once some driver needs it, so a daemon with only path-watching drivers holds no
    netlink socket. `inject()` is the single entry point of every event, the same
    one the monitor's reader calls, so tests and simulations exercise the real path.
    All methods must be called on the loop's thread (or before `start()`).
    """

    def __init__(
        self,
        *,
        source: Source,
        on_match: Callable[[str], None],
        on_lost: Callable[[str], None],
        log: logging.Logger,
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
        self._buffer = receive_buffer_size
        self._link_events = link_events
        self._settle_s = settle_s
        self._pending: dict[str, str] = {}  # driver -> what woke it, in arrival order
        self._flush: asyncio.TimerHandle | None = None
        self._matches: dict[str, tuple[UdevMatch, ...]] = {}
        self._paths: dict[str, tuple[Path, ...]] = {}
        self._routes: dict[str, list[tuple[str, str | None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: dict[str, _Channel] = {}
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._failures: dict[str, int] = {}

    # -- subscriptions -------------------------------------------------------

    def subscribe(self, driver: str, matches: Sequence[UdevMatch], paths: Sequence[Path]) -> None:
        """Sets (or replaces) what one driver wants to hear about."""
        self._matches[driver] = tuple(matches)
        self._paths[driver] = tuple(Path(os.path.abspath(p)) for p in paths)
        routes: dict[str, list[tuple[str, str | None]]] = {}
        for name, driver_matches in self._matches.items():
            for match in driver_matches:
                routes.setdefault(match.subsystem, []).append((name, match.sys_name))
        self._routes = routes
        if self._loop is not None:
            self._open_all()

    def _subsystems(self) -> list[str]:
        return sorted(self._routes)

    def _path_targets(self) -> dict[Path, frozenset[str]]:
        targets: dict[Path, set[str]] = {}
        for driver, paths in self._paths.items():
            for path in paths:
                targets.setdefault(path, set()).add(driver)
        return {path: frozenset(drivers) for path, drivers in targets.items()}

    # -- lifecycle -----------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Opens the channels the subscriptions need; raises OSError if netlink is unavailable."""
        self._loop = loop
        if self.source == "udev" and not self._udev_control.exists():
            self.log.warning(
                "hotplug source 'udev' but %s does not exist: without a running udevd no events arrive; "
                "use source 'kernel' or 'auto'",
                self._udev_control,
            )
        self._open_all(raise_errors=True)

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._pending.clear()
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for kind in list(self._channels):
            self._close(kind)
        self._loop = None

    def _wanted(self) -> dict[str, Callable[[], _Channel]]:
        wanted: dict[str, Callable[[], _Channel]] = {}
        if self._routes:
            wanted[_UeventChannel.kind] = lambda: _UeventChannel(self.source, self._subsystems(), self._buffer, self)
        if self._link_events and "net" in self._routes:
            wanted[_LinkChannel.kind] = lambda: _LinkChannel(self._buffer, self)
        targets = self._path_targets()
        if targets:
            wanted[_PathChannel.kind] = lambda: _PathChannel(targets, self)
        return wanted

    def _open_all(self, *, raise_errors: bool = False) -> None:
        wanted = self._wanted()
        for kind in list(self._channels):
            if kind not in wanted:
                self._close(kind)
        for kind, factory in wanted.items():
            channel = self._channels.get(kind)
            if isinstance(channel, _UeventChannel):
                channel.set_subsystems(self._subsystems())
            elif isinstance(channel, _PathChannel):
                channel.set_targets(self._path_targets())
            elif channel is None and kind not in self._retries:
                try:
                    self._open(kind, factory)
                except OSError as err:
                    if raise_errors:
                        self.close()
                        raise
                    self._schedule_reopen(kind, err)

    def _open(self, kind: str, factory: Callable[[], _Channel]) -> None:
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
        """Routes one event to each driver it matches: `on_match(driver)` once per driver
        per settle window (SETTLE_S; `settle_s=0` or no started loop: once per event)."""
        routes = self._routes.get(event.subsystem)
        if not routes:
            return
        names = event.names()
        matched: list[str] = []
        for driver, pattern in routes:
            if driver in matched:
                continue
            if pattern is None or any(fnmatch.fnmatchcase(name, pattern) for name in names):
                matched.append(driver)
        for driver in matched:
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("%s %s/%s -> %s", event.action, event.subsystem, event.sys_name, driver)
            self.notify(driver, event.action)

    def notify(self, driver: str, what: str) -> None:
        """Tells `driver` once the settle window closes (at once without a loop or window)."""
        if self._loop is None or self._settle_s <= 0:
            self._call_on_match(driver, what)
            return
        self._pending.setdefault(driver, what)
        if self._flush is None:
            self._flush = self._loop.call_later(self._settle_s, self._flush_pending)

    def _flush_pending(self) -> None:
        self._flush = None
        pending, self._pending = self._pending, {}
        for driver, what in pending.items():
            self._call_on_match(driver, what)

    def _call_on_match(self, driver: str, what: str) -> None:
        try:
            self._on_match(driver)
        except Exception:  # noqa: BLE001 - a listener bug must not stop event delivery
            self.log.exception("hotplug: on_match(%r) failed after a %s event", driver, what)

    def report_lost(self, reason: str) -> None:
        """Events may have been dropped: every driver needs a full rescan. The overflow path."""
        self.log.warning("hotplug: %s; resyncing every driver", reason)
        try:
            self._on_lost(reason)
        except Exception:  # noqa: BLE001 - as in notify()
            self.log.exception("hotplug: on_lost failed")
