"""The hotplug engine: routing through inject(), real kernel uevents and rtnetlink
messages from real interfaces, inotify path watches, and the lost-event path."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import struct
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodedev import hotplug
from nodedev.driver import UdevMatch
from nodedev.hotplug import HotplugEngine, Uevent, parse_link_messages, resolve_source
from tests.netif import NetIfs, netifs  # noqa: F401  # netifs is a fixture

LOG = logging.getLogger("test.hotplug")
TIMEOUT = 5.0


class Recorder:
    """An engine plus what it did: every event it routed, every on_match and on_lost call.

    Waiting is on an asyncio.Event set at each call, never on sleep(); every wait
    has a timeout and its failure message lists what did arrive.
    """

    def __init__(self, **kwargs: object) -> None:
        self.matches: list[tuple[str, Uevent | None]] = []
        self.lost: list[str] = []
        self.events: list[Uevent] = []
        self._current: Uevent | None = None
        self._changed = asyncio.Event()
        kwargs.setdefault("source", "kernel")
        kwargs.setdefault("settle_s", 0)  # one call per event, so each match names its event; see the settle test
        self.engine = HotplugEngine(on_match=self._on_match, on_lost=self._on_lost, log=LOG, **kwargs)  # type: ignore[arg-type]
        original = self.engine.inject

        def spy(event: Uevent) -> None:
            self.events.append(event)
            self._current = event
            try:
                original(event)
            finally:
                self._current = None
                self._changed.set()

        self.engine.inject = spy  # type: ignore[method-assign]

    def _on_match(self, driver: str) -> None:
        self.matches.append((driver, self._current))
        self._changed.set()

    def _on_lost(self, reason: str) -> None:
        self.lost.append(reason)
        self._changed.set()

    def drivers(self) -> list[str]:
        return [driver for driver, _ in self.matches]

    def matched(self, driver: str, action: str | None = None, name: str | None = None) -> bool:
        return any(
            d == driver and (action is None or (e is not None and e.action == action)) and (name is None or (e is not None and e.sys_name == name))
            for d, e in self.matches
        )

    async def wait(self, predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        async def until() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            seen = [(e.action, e.subsystem, e.sys_name) for e in self.events[-20:]]
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; matches={self.drivers()} lost={self.lost} last events={seen}") from None

    def reset(self) -> None:
        self.matches.clear()
        self.events.clear()
        self.lost.clear()


def aio(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Runs an async test on a fresh loop (no pytest plugin needed); fixtures pass through."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@pytest.fixture
def recorder() -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(**kwargs: object) -> Recorder:
        made.append(Recorder(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.engine.close()


# -- routing, through inject() ------------------------------------------------


def net(action: str, name: str, **props: str) -> Uevent:
    return Uevent(action=action, subsystem="net", sys_name=name, devpath=f"/devices/virtual/net/{name}", properties=props)


@aio
async def test_events_reach_only_the_drivers_that_asked(recorder: Callable[..., Recorder]) -> None:
    r = recorder()
    r.engine.subscribe("netdev", [UdevMatch("net", "eth*")], [])
    r.engine.subscribe("kvm", [UdevMatch("misc", "kvm")], [])
    r.engine.subscribe("rdma", [UdevMatch("infiniband"), UdevMatch("net", "ib*")], [])

    r.engine.inject(net("add", "eth1"))
    r.engine.inject(Uevent("change", "misc", "kvm"))
    r.engine.inject(Uevent("add", "misc", "vhost-net"))
    r.engine.inject(net("add", "ib0"))
    r.engine.inject(Uevent("add", "infiniband", "mlx5_0"))
    r.engine.inject(Uevent("add", "pci", "0000:00:01.0"))

    assert r.drivers() == ["netdev", "kvm", "rdma", "rdma"]


@aio
async def test_one_call_per_event_per_driver_even_when_several_matches_fit(recorder: Callable[..., Recorder]) -> None:
    r = recorder()
    r.engine.subscribe("netdev", [UdevMatch("net"), UdevMatch("net", "eth*"), UdevMatch("net", "eth1")], [])
    r.engine.inject(net("add", "eth1"))
    assert r.drivers() == ["netdev"]


@aio
async def test_a_rename_reaches_the_driver_that_knew_the_old_name(recorder: Callable[..., Recorder]) -> None:
    r = recorder()
    r.engine.subscribe("netdev", [UdevMatch("net", "eth*")], [])
    r.engine.inject(net("move", "renamed0", DEVPATH_OLD="/devices/virtual/net/eth3"))
    assert r.drivers() == ["netdev"]


@aio
async def test_resubscribing_replaces_a_drivers_matches(recorder: Callable[..., Recorder]) -> None:
    r = recorder()
    r.engine.subscribe("netdev", [UdevMatch("net", "eth*")], [])
    r.engine.subscribe("netdev", [UdevMatch("net", "ens*")], [])
    r.engine.inject(net("add", "eth1"))
    r.engine.inject(net("add", "ens1"))
    assert r.matches == [("netdev", r.events[1])]


@aio
async def test_a_failing_listener_does_not_stop_delivery(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def on_match(driver: str) -> None:
        calls.append(driver)
        if driver == "first":
            raise RuntimeError("listener bug")

    engine = HotplugEngine(source="kernel", on_match=on_match, on_lost=lambda _: None, log=LOG)
    engine.subscribe("first", [UdevMatch("net")], [])
    engine.subscribe("second", [UdevMatch("net")], [])
    engine.inject(net("add", "eth0"))
    engine.inject(net("remove", "eth0"))
    assert calls == ["first", "second", "first", "second"]
    assert "listener bug" in caplog.text


def test_report_lost_calls_on_lost_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    lost: list[str] = []
    engine = HotplugEngine(source="kernel", on_match=lambda _: None, on_lost=lost.append, log=LOG)
    engine.report_lost("netlink receive buffer overrun (ENOBUFS)")
    assert lost == ["netlink receive buffer overrun (ENOBUFS)"]
    assert "ENOBUFS" in caplog.text and "resyncing every driver" in caplog.text


def test_auto_source_is_udev_only_while_a_udevd_runs(tmp_path: Path) -> None:
    control = tmp_path / "control"
    assert resolve_source("auto", control) == "kernel"
    control.touch()
    assert resolve_source("auto", control) == "udev"
    assert resolve_source("kernel", control) == "kernel"
    assert resolve_source("udev", tmp_path / "missing") == "udev"
    engine = HotplugEngine(source="auto", on_match=lambda _: None, on_lost=lambda _: None, log=LOG, udev_control=control)
    assert engine.source == "udev"


@aio
async def test_udev_source_without_udevd_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = HotplugEngine(source="udev", on_match=lambda _: None, on_lost=lambda _: None, log=LOG, udev_control=tmp_path / "none")
    engine.subscribe("netdev", [UdevMatch("net")], [])
    engine.start(asyncio.get_running_loop())
    engine.close()
    assert "without a running udevd no events arrive" in caplog.text


def rtnl_message(msg_type: int, index: int, name: str) -> bytes:
    ifname = name.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(ifname), hotplug.IFLA_IFNAME) + ifname
    attr += b"\0" * (-len(attr) % 4)
    mtu = struct.pack("=HHI", 8, 4, 1500)  # IFLA_MTU, before the name: the parser must skip it
    body = struct.pack("=BxHiII", 0, 1, index, 0x1003, 0) + mtu + attr
    return struct.pack("=IHHII", 16 + len(body), msg_type, 0, 0, 0) + body


def test_rtnetlink_link_messages_are_parsed() -> None:
    data = rtnl_message(hotplug.RTM_NEWLINK, 7, "eth1") + rtnl_message(hotplug.RTM_DELLINK, 8, "veth-long-name")
    data += struct.pack("=IHHII", 20, 3, 0, 0, 0) + b"\0" * 4  # NLMSG_DONE: ignored
    assert list(parse_link_messages(data)) == [(hotplug.RTM_NEWLINK, 7, "eth1"), (hotplug.RTM_DELLINK, 8, "veth-long-name")]
    assert list(parse_link_messages(data[:30])) == []  # a truncated datagram yields nothing, never raises


@aio
async def test_matches_arriving_together_are_told_once_per_driver(recorder: Callable[..., Recorder]) -> None:
    """With a settle window, the messages of one change (a veth pair: two uevents and
    two link messages) make one on_match per driver, after the last of them."""
    r = recorder(settle_s=0.05)
    r.engine.subscribe("netdev", [UdevMatch("net")], [])
    r.engine.subscribe("kvm", [UdevMatch("misc", "kvm")], [])
    r.engine.start(asyncio.get_running_loop())
    for event in (net("add", "veth1"), net("add", "veth0"), net("link", "veth1"), Uevent("change", "misc", "kvm"), net("link", "veth0")):
        r.engine.inject(event)
    assert r.drivers() == []  # nothing yet: the window is open
    await r.wait(lambda: len(r.matches) == 2, "the window closing")
    assert r.drivers() == ["netdev", "kvm"]
    r.engine.inject(net("remove", "veth0"))
    await r.wait(lambda: len(r.matches) == 3, "a later event, in a window of its own")
    assert r.drivers() == ["netdev", "kvm", "netdev"]


# -- real kernel events --------------------------------------------------------


async def started(r: Recorder, driver: str, matches: list[UdevMatch], paths: list[Path] | None = None) -> Recorder:
    r.engine.subscribe(driver, matches, paths or [])
    r.engine.start(asyncio.get_running_loop())
    return r


@aio
async def test_veth_pair_add_and_remove_are_heard(netifs: NetIfs, recorder: Callable[..., Recorder]) -> None:
    r = await started(recorder(link_events=False), "netdev", [UdevMatch("net", f"{netifs.prefix}*")])
    assert r.engine.source == "kernel"
    a, b = netifs.veth()
    await r.wait(lambda: r.matched("netdev", "add", a) and r.matched("netdev", "add", b), f"add of {a} and {b}")
    netifs.delete(a)
    await r.wait(lambda: r.matched("netdev", "remove", a) and r.matched("netdev", "remove", b), f"remove of {a} and {b}")


@aio
async def test_uevent_file_writes_are_heard(netifs: NetIfs, recorder: Callable[..., Recorder]) -> None:
    a, _ = netifs.veth()
    r = await started(recorder(link_events=False), "netdev", [UdevMatch("net", a)])
    for action in ("change", "add", "remove"):
        netifs.uevent(a, action)
        await r.wait(lambda action=action: r.matched("netdev", action, a), f"{action} of {a}")  # type: ignore[misc]


@aio
async def test_tun_tap_and_macvlan_are_heard(netifs: NetIfs, recorder: Callable[..., Recorder]) -> None:
    r = await started(recorder(link_events=False), "netdev", [UdevMatch("net", f"{netifs.prefix}*")])
    tap, tun = netifs.tap(), netifs.tun()
    parent, _ = netifs.veth()
    mac = netifs.macvlan(parent)
    for name in (tap, tun, mac):
        await r.wait(lambda name=name: r.matched("netdev", "add", name), f"add of {name}")  # type: ignore[misc]
    for name in (tap, tun, mac):
        netifs.delete(name)
    for name in (tap, tun, mac):
        await r.wait(lambda name=name: r.matched("netdev", "remove", name), f"remove of {name}")  # type: ignore[misc]


@aio
async def test_other_interfaces_and_subsystems_do_not_reach_a_narrow_driver(netifs: NetIfs, recorder: Callable[..., Recorder]) -> None:
    a, b = netifs.veth()
    r = await started(recorder(link_events=False), "narrow", [UdevMatch("net", a)])
    r.engine.subscribe("watcher", [UdevMatch("net", b)], [])
    netifs.uevent(b, "change")
    await r.wait(lambda: r.matched("watcher", "change", b), f"change of {b}")
    assert "narrow" not in r.drivers()


@aio
async def test_carrier_changes_arrive_as_link_events(netifs: NetIfs, recorder: Callable[..., Recorder]) -> None:
    """Link up/down sends no uevent at all: without rtnetlink a driver would miss it."""
    a, b = netifs.veth()
    r = await started(recorder(), "netdev", [UdevMatch("net", a)])
    netifs.up(a)
    await r.wait(lambda: r.matched("netdev", "link", a), f"link event for {a} going up")
    r.reset()
    netifs.up(b)  # only the peer changes; a's carrier comes up
    await r.wait(lambda: r.matched("netdev", "link", a), f"link event for {a} getting carrier")
    assert all(e.action == "link" for e in r.events if e.sys_name == a)


@aio
async def test_a_driver_that_drops_its_net_interest_stops_hearing_net_events(netifs: NetIfs, recorder: Callable[..., Recorder]) -> None:
    a, b = netifs.veth()
    r = await started(recorder(link_events=False), "kvm", [UdevMatch("misc", "kvm"), UdevMatch("net", a)])
    r.engine.subscribe("watcher", [UdevMatch("net", b)], [])
    r.engine.subscribe("kvm", [UdevMatch("misc", "kvm")], [])
    netifs.uevent(a, "change")
    netifs.uevent(b, "change")  # sent after a's, so heard after it
    await r.wait(lambda: r.matched("watcher", "change", b), f"change of {b}")
    assert "kvm" not in r.drivers()


@aio
async def test_channels_open_only_for_what_is_subscribed(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    """A daemon with no network driver holds no rtnetlink socket, one with no
    watched paths no inotify descriptor, one with no udev match no monitor."""
    r = await started(recorder(), "kvm", [UdevMatch("misc", "kvm")])
    assert set(r.engine._channels) == {"uevent monitor"}
    r.engine.subscribe("netdev", [UdevMatch("net")], [])
    assert set(r.engine._channels) == {"uevent monitor", "rtnetlink link monitor"}
    r.engine.subscribe("netdev", [], [tmp_path])
    r.engine.subscribe("kvm", [], [])
    assert set(r.engine._channels) == {"inotify path watch"}


# -- lost events ---------------------------------------------------------------


@aio
async def test_a_real_receive_buffer_overrun_triggers_a_resync(netifs: NetIfs, recorder: Callable[..., Recorder]) -> None:
    a, _ = netifs.veth()
    r = await started(recorder(link_events=False, receive_buffer_size=4096), "netdev", [UdevMatch("net", a)])
    # The loop does not run while this burst is written, so the tiny buffer overflows.
    for _ in range(400):
        netifs.uevent(a, "change")
    await r.wait(lambda: any("ENOBUFS" in reason for reason in r.lost), "on_lost after ENOBUFS")
    r.reset()
    netifs.uevent(a, "change")  # and the engine keeps listening
    await r.wait(lambda: r.matched("netdev", "change", a), "a change after the overrun")


@aio
async def test_a_failed_monitor_is_reopened_and_reported(netifs: NetIfs, recorder: Callable[..., Recorder], monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = netifs.veth()
    r = await started(recorder(link_events=False), "netdev", [UdevMatch("net", a)])
    failures = [OSError(errno.EIO, "simulated socket failure")]
    real_drain = hotplug._UeventChannel.drain

    def failing_drain(self: hotplug._UeventChannel) -> None:
        if failures:
            raise failures.pop()
        real_drain(self)

    monkeypatch.setattr(hotplug._UeventChannel, "drain", failing_drain)
    netifs.uevent(a, "change")
    await r.wait(lambda: any("reopened" in reason for reason in r.lost), "on_lost after the monitor failed")
    netifs.uevent(a, "change")
    await r.wait(lambda: r.matched("netdev", "change", a), "a change heard by the reopened monitor")


# -- inotify path watches -----------------------------------------------------


@aio
async def test_entries_appearing_and_vanishing_in_a_watched_directory(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    r = await started(recorder(), "vfio", [], [tmp_path])
    r.engine.subscribe("other", [], [tmp_path / "elsewhere"])
    (tmp_path / "42").touch()
    await r.wait(lambda: "vfio" in r.drivers(), "a create event")
    r.reset()
    (tmp_path / "42").unlink()
    await r.wait(lambda: "vfio" in r.drivers(), "a delete event")
    r.reset()
    (tmp_path / "43").touch()
    await r.wait(lambda: "vfio" in r.drivers(), "a second create event")
    r.reset()
    (tmp_path / "43").chmod(0o600)  # a node's mode changing: its device may be usable now
    await r.wait(lambda: "vfio" in r.drivers(), "an attrib event")
    r.reset()
    os.rename(tmp_path / "43", tmp_path / "44")
    await r.wait(lambda: "vfio" in r.drivers(), "a rename within the directory")
    assert "other" not in r.drivers()


@aio
async def test_a_directory_that_does_not_exist_yet_is_waited_for(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    target = tmp_path / "dev" / "vfio"
    r = await started(recorder(), "vfio", [], [target])
    (tmp_path / "dev").mkdir()
    (tmp_path / "unrelated").mkdir()
    target.mkdir()
    await r.wait(lambda: "vfio" in r.drivers(), f"{target} appearing")
    r.reset()
    (target / "7").touch()
    await r.wait(lambda: "vfio" in r.drivers(), f"an entry in {target}")
    r.reset()
    (target / "7").unlink()
    target.rmdir()
    await r.wait(lambda: "vfio" in r.drivers(), f"{target} vanishing")
    r.reset()
    target.mkdir()  # and it is watched again when it comes back
    (target / "8").touch()
    await r.wait(lambda: "vfio" in r.drivers(), f"{target} coming back")


@aio
async def test_a_whole_missing_path_created_at_once(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    target = tmp_path / "a" / "b" / "c"
    r = await started(recorder(), "deep", [], [target])
    target.mkdir(parents=True)
    await r.wait(lambda: "deep" in r.drivers(), "the nested path appearing")
    r.reset()
    (target / "node").touch()
    await r.wait(lambda: "deep" in r.drivers(), "an entry in the nested path")
