"""The netlink channels through fakes: a channel opens only for what is subscribed,
and an overrun (ENOBUFS) or a broken socket, injected, always ends in on_lost, the
full resync; a reopened channel keeps delivering."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from nodedev.driver import UdevMatch
from nodedev.hotplug import HotplugEngine, engine, rtnetlink, uevents
from tests import test_hotplug
from tests.test_hotplug import LOG, Recorder, aio, rtnl_message

recorder = test_hotplug.recorder  # a fixture


class FakeMonitor:
    """Stands in for pyudev's monitor: a socketpair makes its descriptor readable, and
    poll() hands out what the test pushed (a device, or an exception to raise)."""

    def __init__(self) -> None:
        self._ours, self._theirs = socket.socketpair()
        self._ours.setblocking(False)
        self._queue: deque[object] = deque()
        self.filters: list[str] = []
        self.closed = False

    def filter_by(self, subsystem: str) -> None:
        self.filters.append(subsystem)

    def start(self) -> None:
        pass

    def fileno(self) -> int:
        return self._ours.fileno()

    def push(self, item: object) -> None:
        self._queue.append(item)
        self._theirs.send(b"!")

    def poll(self, timeout: float | None = None) -> object:
        if not self._queue:
            try:
                while self._ours.recv(4096):
                    pass
            except BlockingIOError:
                pass
            return None
        item = self._queue.popleft()
        if isinstance(item, BaseException):
            raise item
        return item


class FakeLinkSocket:
    """Stands in for the rtnetlink socket: recv() hands out pushed datagrams or raises pushed errors."""

    def __init__(self) -> None:
        self.monitor = FakeMonitor()
        self.closed = False

    def fileno(self) -> int:
        return self.monitor.fileno()

    def push(self, item: object) -> None:
        self.monitor.push(item)

    def recv(self, size: int) -> bytes:
        item = self.monitor.poll()
        if item is None:
            raise BlockingIOError(errno.EAGAIN, "no data")
        assert isinstance(item, bytes)
        return item

    def close(self) -> None:
        self.closed = True


def device(action: str, name: str) -> SimpleNamespace:
    path = f"/devices/virtual/net/{name}"
    return SimpleNamespace(action=action, subsystem="net", sys_name=name, device_path=path, properties={"INTERFACE": name})


class Fakes:
    def __init__(self) -> None:
        self.monitors: list[FakeMonitor] = []
        self.sockets: list[FakeLinkSocket] = []
        self.refuse = 0


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Fakes:
    """Every uevent monitor and rtnetlink socket the engine opens is a fake; `refuse`
    makes that many opens fail first."""
    made = Fakes()

    def open_monitor(source: str, buffer: int, log: logging.Logger) -> FakeMonitor:
        if made.refuse:
            made.refuse -= 1
            raise OSError(errno.EMFILE, "simulated: too many open files")
        made.monitors.append(FakeMonitor())
        return made.monitors[-1]

    def open_link_socket(buffer: int, log: logging.Logger) -> FakeLinkSocket:
        made.sockets.append(FakeLinkSocket())
        return made.sockets[-1]

    monkeypatch.setattr(uevents, "open_monitor", open_monitor)
    monkeypatch.setattr(rtnetlink, "open_link_socket", open_link_socket)
    monkeypatch.setattr(engine, "REOPEN_DELAYS_S", (0.01,))
    return made


async def started_fake(r: Recorder, matches: list[UdevMatch]) -> Recorder:
    r.engine.subscribe("netdev", matches, [])
    r.engine.start(asyncio.get_running_loop())
    return r


@aio
async def test_a_uevent_overrun_triggers_a_resync_and_the_monitor_keeps_listening(recorder: Callable[..., Recorder], fakes: Fakes) -> None:
    r = await started_fake(recorder(link_events=False), [UdevMatch("net")])
    fakes.monitors[0].push(OSError(errno.ENOBUFS, "No buffer space available"))
    await r.wait(lambda: bool(r.lost), "on_lost after ENOBUFS")
    assert "ENOBUFS" in r.lost[0]
    fakes.monitors[0].push(device("add", "eth0"))
    await r.wait(lambda: r.matched("netdev", "add", "eth0"), "an event after the overrun")
    assert len(fakes.monitors) == 1  # an overrun is survived, not a reason to reopen


@aio
async def test_an_overrun_pyudev_reports_as_a_bare_pollerr_triggers_a_resync(
    recorder: Callable[..., Recorder], fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyudev raises OSError with no errno on POLLERR; the socket's pending error says ENOBUFS."""
    monkeypatch.setattr(uevents, "pending_socket_error", lambda fd: errno.ENOBUFS)
    r = await started_fake(recorder(link_events=False), [UdevMatch("net")])
    fakes.monitors[0].push(OSError("Error while polling fd: 7"))
    await r.wait(lambda: bool(r.lost), "on_lost after a POLLERR carrying ENOBUFS")
    assert "ENOBUFS" in r.lost[0] and len(fakes.monitors) == 1


@aio
async def test_a_failed_monitor_is_reopened_and_triggers_a_resync(recorder: Callable[..., Recorder], fakes: Fakes) -> None:
    r = await started_fake(recorder(link_events=False), [UdevMatch("net")])
    fakes.monitors[0].push(OSError(errno.EIO, "simulated socket failure"))
    await r.wait(lambda: bool(r.lost), "on_lost after the monitor failed")
    assert "reopened" in r.lost[0] and len(fakes.monitors) == 2
    fakes.monitors[1].push(device("change", "eth0"))
    await r.wait(lambda: r.matched("netdev", "change", "eth0"), "an event heard by the reopened monitor")


@aio
async def test_a_monitor_that_cannot_be_reopened_at_once_is_retried_then_resynced(
    recorder: Callable[..., Recorder], fakes: Fakes, caplog: pytest.LogCaptureFixture
) -> None:
    r = await started_fake(recorder(link_events=False), [UdevMatch("net")])
    fakes.refuse = 2
    fakes.monitors[0].push(OSError(errno.EIO, "simulated socket failure"))
    await r.wait(lambda: bool(r.lost), "on_lost once a retry succeeded")
    assert len(fakes.monitors) == 2 and fakes.refuse == 0
    assert "cannot be opened" in caplog.text and "retrying" in caplog.text


@aio
async def test_a_link_overrun_triggers_a_resync(recorder: Callable[..., Recorder], fakes: Fakes) -> None:
    r = await started_fake(recorder(), [UdevMatch("net")])
    link = fakes.sockets[0]
    link.push(OSError(errno.ENOBUFS, "No buffer space available"))
    await r.wait(lambda: bool(r.lost), "on_lost after an rtnetlink ENOBUFS")
    assert "rtnetlink" in r.lost[0] and "ENOBUFS" in r.lost[0]
    link.push(rtnl_message(rtnetlink.RTM_NEWLINK, 9, "eth9"))
    await r.wait(lambda: r.matched("netdev", "link", "eth9"), "a link event after the overrun")
    assert r.names("netdev") == [frozenset({"eth9"})] and len(fakes.sockets) == 1


@aio
async def test_a_failed_link_socket_is_reopened_and_triggers_a_resync(recorder: Callable[..., Recorder], fakes: Fakes) -> None:
    r = await started_fake(recorder(), [UdevMatch("net")])
    fakes.sockets[0].push(OSError(errno.EIO, "simulated socket failure"))
    await r.wait(lambda: bool(r.lost), "on_lost after the rtnetlink socket failed")
    assert "rtnetlink" in r.lost[0] and "reopened" in r.lost[0]
    assert fakes.sockets[0].closed and len(fakes.sockets) == 2


@aio
async def test_udev_source_without_udevd_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture, fakes: Fakes) -> None:
    hotplug = HotplugEngine(source="udev", on_match=lambda *_: None, on_lost=lambda _: None, log=LOG, udev_control=tmp_path / "none")
    hotplug.subscribe("netdev", [UdevMatch("net")], [])
    hotplug.start(asyncio.get_running_loop())
    hotplug.close()
    assert "without a running udevd no events arrive" in caplog.text


@aio
async def test_channels_open_only_for_what_is_subscribed(tmp_path: Path, recorder: Callable[..., Recorder], fakes: Fakes) -> None:
    """A daemon with no network driver holds no rtnetlink socket, one whose network
    driver takes no `link` action holds none either, one with no udev match no monitor."""
    r = recorder()
    r.engine.subscribe("kvm", [UdevMatch("misc", "kvm")], [])
    r.engine.start(asyncio.get_running_loop())
    assert r.engine.channels == {"uevent monitor"}
    r.engine.subscribe("netdev", [UdevMatch("net", actions=frozenset({"add", "remove"}))], [])
    assert r.engine.channels == {"uevent monitor"}
    r.engine.subscribe("netdev", [UdevMatch("net", actions=frozenset({"add", "link"}))], [])
    assert r.engine.channels == {"uevent monitor", "rtnetlink link monitor"}
    r.engine.subscribe("netdev", [], [tmp_path])
    r.engine.subscribe("kvm", [], [])
    assert r.engine.channels == set()
    assert r.engine.paths.watching() == {tmp_path: tmp_path}
