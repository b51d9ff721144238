"""The hotplug engine without the kernel: routing through inject() (subsystem, name,
action and property filters), the names told to the inventory, the settle window,
subscriptions, and the lost-event paths driven through fake netlink channels."""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodedev.driver import UdevMatch
from nodedev.hotplug import Changes, HotplugEngine, PathWatcher, Uevent, parse_link_messages, resolve_source, rtnetlink

LOG = logging.getLogger("test.hotplug")
TIMEOUT = 5.0

Names = frozenset[str] | None


class Recorder:
    """An engine plus what it did: every event it routed, every on_match and on_lost call.

    Waiting is on an asyncio.Event set at each call, never on sleep(); every wait
    has a timeout and its failure message lists what did arrive.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.matches: list[tuple[str, Names, Uevent | None]] = []
        self.lost: list[str] = []
        self.events: list[Uevent] = []
        self._current: Uevent | None = None
        self._changed = asyncio.Event()
        kwargs.setdefault("source", "kernel")
        kwargs.setdefault("settle_s", 0)  # one call per event, so each match names its event; see the settle tests
        self.engine = HotplugEngine(on_match=self._on_match, on_lost=self._on_lost, log=LOG, **kwargs)
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

    def _on_match(self, driver: str, names: Names) -> None:
        self.matches.append((driver, names, self._current))
        self._changed.set()

    def _on_lost(self, reason: str) -> None:
        self.lost.append(reason)
        self._changed.set()

    def drivers(self) -> list[str]:
        return [driver for driver, _, _ in self.matches]

    def names(self, driver: str) -> list[Names]:
        return [names for d, names, _ in self.matches if d == driver]

    def matched(self, driver: str, action: str | None = None, name: str | None = None) -> bool:
        return any(d == driver and e is not None and action in (None, e.action) and name in (None, e.sys_name) for d, _, e in self.matches)

    async def wait(self, predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        async def until() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            seen = [(e.action, e.subsystem, e.sys_name) for e in self.events[-20:]]
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}; matches={[(d, n) for d, n, _ in self.matches][-20:]} "
                f"lost={self.lost} last events={seen}"
            ) from None

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

    def make(**kwargs: Any) -> Recorder:
        made.append(Recorder(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.engine.close()


def net(action: str, name: str, **props: str) -> Uevent:
    devpath = f"/devices/virtual/net/{name}"
    return Uevent(action=action, subsystem="net", sys_name=name, devpath=devpath, properties={"INTERFACE": name, **props})


def pci(action: str, address: str, **props: str) -> Uevent:
    return Uevent(action=action, subsystem="pci", sys_name=address, devpath=f"/devices/pci0000:00/{address}", properties=props)


# -- routing, through inject() ------------------------------------------------


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
    r.engine.inject(pci("add", "0000:00:01.0"))

    assert r.drivers() == ["netdev", "kvm", "rdma", "rdma"]


@aio
async def test_one_call_per_event_per_driver_even_when_several_matches_fit(recorder: Callable[..., Recorder]) -> None:
    r = recorder()
    r.engine.subscribe("netdev", [UdevMatch("net"), UdevMatch("net", "eth*"), UdevMatch("net", "eth1")], [])
    r.engine.inject(net("add", "eth1"))
    assert r.drivers() == ["netdev"]


@aio
async def test_a_rename_reaches_the_driver_that_knew_the_old_name_and_names_both(recorder: Callable[..., Recorder]) -> None:
    r = recorder()
    r.engine.subscribe("netdev", [UdevMatch("net", "eth*")], [])
    r.engine.inject(net("move", "renamed0", DEVPATH_OLD="/devices/virtual/net/eth3"))
    assert r.matches[0][:2] == ("netdev", frozenset({"renamed0", "eth3"}))


@aio
async def test_resubscribing_replaces_a_drivers_matches(recorder: Callable[..., Recorder]) -> None:
    r = recorder()
    r.engine.subscribe("netdev", [UdevMatch("net", "eth*")], [])
    r.engine.subscribe("netdev", [UdevMatch("net", "ens*")], [])
    r.engine.inject(net("add", "eth1"))
    r.engine.inject(net("add", "ens1"))
    assert [(d, e) for d, _, e in r.matches] == [("netdev", r.events[1])]


@aio
async def test_action_filters_pass_only_the_listed_actions(recorder: Callable[..., Recorder]) -> None:
    r = recorder()
    r.engine.subscribe("vfio", [UdevMatch("pci", actions=frozenset({"bind", "unbind"}))], [])
    r.engine.subscribe("any", [UdevMatch("pci")], [])
    for action in ("add", "change", "bind", "remove", "unbind"):
        r.engine.inject(pci(action, "0000:3b:00.0"))
    assert [e.action for d, _, e in r.matches if d == "vfio" and e is not None] == ["bind", "unbind"]
    assert len(r.names("any")) == 5


@aio
async def test_property_filters_keep_a_pci_event_from_every_driver_that_reads_pci(recorder: Callable[..., Recorder]) -> None:
    """On a busy node a GPU event must not rescan the NIC drivers, and the other way round."""
    r = recorder()
    r.engine.subscribe("sriov", [UdevMatch("pci", properties={"PCI_CLASS": "20000"})], [])
    r.engine.subscribe("nvidia", [UdevMatch("pci", properties={"PCI_CLASS": "30*", "PCI_ID": "10DE:*"})], [])
    r.engine.subscribe("vfio", [UdevMatch("pci", properties={"DRIVER": "vfio-pci"})], [])

    r.engine.inject(pci("add", "0000:3b:00.0", PCI_CLASS="20000", PCI_ID="8086:1572", DRIVER="i40e"))
    r.engine.inject(pci("add", "0000:af:00.0", PCI_CLASS="30200", PCI_ID="10DE:20B0", DRIVER="nvidia"))
    r.engine.inject(pci("add", "0000:af:00.1", PCI_CLASS="30200", PCI_ID="1002:740F"))  # not NVIDIA: PCI_ID does not fit
    r.engine.inject(pci("bind", "0000:3b:02.0", PCI_CLASS="20000", DRIVER="vfio-pci"))
    r.engine.inject(pci("add", "0000:00:1f.0", PCI_CLASS="60100"))  # an ISA bridge: nobody

    assert [(d, n) for d, n, _ in r.matches] == [
        ("sriov", frozenset({"0000:3b:00.0"})),
        ("nvidia", frozenset({"0000:af:00.0"})),
        ("sriov", frozenset({"0000:3b:02.0"})),
        ("vfio", frozenset({"0000:3b:02.0"})),
    ]


@aio
async def test_a_property_the_event_lacks_does_not_match_even_a_star(recorder: Callable[..., Recorder]) -> None:
    r = recorder()
    r.engine.subscribe("bound", [UdevMatch("pci", properties={"DRIVER": "*"})], [])
    r.engine.inject(pci("add", "0000:01:00.0"))  # no driver bound yet: no DRIVER property
    r.engine.inject(pci("bind", "0000:01:00.0", DRIVER="ixgbe"))
    assert [e.action for _, _, e in r.matches if e is not None] == ["bind"]


@aio
async def test_name_action_and_property_filters_must_all_fit(recorder: Callable[..., Recorder]) -> None:
    r = recorder()
    match = UdevMatch("net", "eth*", actions=frozenset({"add"}), properties={"ID_BUS": "pci"})
    r.engine.subscribe("netdev", [match], [])
    r.engine.inject(net("add", "eth0", ID_BUS="pci"))
    r.engine.inject(net("add", "eth1", ID_BUS="usb"))
    r.engine.inject(net("remove", "eth2", ID_BUS="pci"))
    r.engine.inject(net("add", "ens3", ID_BUS="pci"))
    assert r.names("netdev") == [frozenset({"eth0"})]


@aio
async def test_a_failing_listener_does_not_stop_delivery(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def on_match(driver: str, names: Names) -> None:
        calls.append(driver)
        if driver == "first":
            raise RuntimeError("listener bug")

    hotplug = HotplugEngine(source="kernel", on_match=on_match, on_lost=lambda _: None, log=LOG)
    hotplug.subscribe("first", [UdevMatch("net")], [])
    hotplug.subscribe("second", [UdevMatch("net")], [])
    hotplug.inject(net("add", "eth0"))
    hotplug.inject(net("remove", "eth0"))
    assert calls == ["first", "second", "first", "second"]
    assert "listener bug" in caplog.text


def test_report_lost_calls_on_lost_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    lost: list[str] = []
    hotplug = HotplugEngine(source="kernel", on_match=lambda *_: None, on_lost=lost.append, log=LOG)
    hotplug.report_lost("netlink receive buffer overrun (ENOBUFS)")
    assert lost == ["netlink receive buffer overrun (ENOBUFS)"]
    assert "ENOBUFS" in caplog.text and "resyncing every driver" in caplog.text


def test_auto_source_is_udev_only_while_a_udevd_runs(tmp_path: Path) -> None:
    control = tmp_path / "control"
    assert resolve_source("auto", control) == "kernel"
    control.touch()
    assert resolve_source("auto", control) == "udev"
    assert resolve_source("kernel", control) == "kernel"
    assert resolve_source("udev", tmp_path / "missing") == "udev"
    hotplug = HotplugEngine(source="auto", on_match=lambda *_: None, on_lost=lambda _: None, log=LOG, udev_control=control)
    assert hotplug.source == "udev"


def rtnl_message(msg_type: int, index: int, name: str) -> bytes:
    ifname = name.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(ifname), rtnetlink.IFLA_IFNAME) + ifname
    attr += b"\0" * (-len(attr) % 4)
    mtu = struct.pack("=HHI", 8, 4, 1500)  # IFLA_MTU, before the name: the parser must skip it
    body = struct.pack("=BxHiII", 0, 1, index, 0x1003, 0) + mtu + attr
    return struct.pack("=IHHII", 16 + len(body), msg_type, 0, 0, 0) + body


def test_rtnetlink_link_messages_are_parsed() -> None:
    data = rtnl_message(rtnetlink.RTM_NEWLINK, 7, "eth1") + rtnl_message(rtnetlink.RTM_DELLINK, 8, "veth-long-name")
    data += struct.pack("=IHHII", 20, 3, 0, 0, 0) + b"\0" * 4  # NLMSG_DONE: ignored
    assert list(parse_link_messages(data)) == [(rtnetlink.RTM_NEWLINK, 7, "eth1"), (rtnetlink.RTM_DELLINK, 8, "veth-long-name")]
    assert list(parse_link_messages(data[:30])) == []  # a truncated datagram yields nothing, never raises


# -- the settle window and the names it tells -----------------------------------


@aio
async def test_matches_arriving_together_are_told_once_per_driver_with_every_name(recorder: Callable[..., Recorder]) -> None:
    """With a settle window, the messages of one change (a veth pair: two uevents and
    two link messages) make one on_match per driver, after the last of them, naming
    every device they concerned."""
    r = recorder(settle_s=0.05)
    r.engine.subscribe("netdev", [UdevMatch("net")], [])
    r.engine.subscribe("kvm", [UdevMatch("misc", "kvm")], [])
    r.engine.start(asyncio.get_running_loop())
    for event in (net("add", "veth1"), net("add", "veth0"), net("link", "veth1"), Uevent("change", "misc", "kvm"), net("link", "veth0")):
        r.engine.inject(event)
    assert r.drivers() == []  # nothing yet: the window is open
    await r.wait(lambda: len(r.matches) == 2, "the window closing")
    assert [(d, n) for d, n, _ in r.matches] == [("netdev", frozenset({"veth0", "veth1"})), ("kvm", frozenset({"kvm"}))]
    r.engine.inject(net("remove", "veth0"))
    await r.wait(lambda: len(r.matches) == 3, "a later event, in a window of its own")
    assert r.matches[2][:2] == ("netdev", frozenset({"veth0"}))


@aio
async def test_everything_absorbs_the_names_of_its_window(recorder: Callable[..., Recorder]) -> None:
    """Something that names nothing (an inotify overflow): the window it falls in tells the driver to read everything."""
    r = recorder(settle_s=0.05)
    r.engine.subscribe("netdev", [UdevMatch("net")], [])
    r.engine.start(asyncio.get_running_loop())
    r.engine.inject(net("add", "eth0"))
    r.engine.notify("netdev", None)
    r.engine.inject(net("add", "eth1"))
    await r.wait(lambda: len(r.matches) == 1, "the window closing")
    assert r.names("netdev") == [None]


# -- subscriptions and channels ---------------------------------------------------


class CountingWatcher(PathWatcher):
    def __init__(self) -> None:
        super().__init__(LOG)
        self.watched: list[Path] = []
        self.cancelled: list[Path] = []

    def watch(self, directory: Path, callback: Callable[[set[str]], None], changes: Changes = Changes.ALL) -> Any:
        self.watched.append(directory)
        handle = super().watch(directory, callback, changes)
        original = handle.cancel

        def cancel() -> None:
            if handle.active:
                self.cancelled.append(directory)
            original()

        handle.cancel = cancel  # type: ignore[method-assign]
        return handle


@aio
async def test_resubscribing_after_every_scan_is_cheap_and_touches_only_the_difference(
    tmp_path: Path, recorder: Callable[..., Recorder]
) -> None:
    """The inventory subscribes again after every scan with the driver's watch_paths():
    1,000 unchanged directories must cost no inotify call, a change only its own."""
    for i in range(1010):
        (tmp_path / f"d{i}").mkdir()
    paths = CountingWatcher()
    r = recorder(paths=paths)
    r.engine.start(asyncio.get_running_loop())
    matches = [UdevMatch("pci", properties={"PCI_CLASS": "20000"})]
    r.engine.subscribe("sriov", matches, [tmp_path / f"d{i}" for i in range(1000)])
    assert len(paths.watched) == 1000

    started = time.perf_counter()
    for _ in range(20):  # new objects, equal content: what a scan hands back
        r.engine.subscribe("sriov", [UdevMatch("pci", properties={"PCI_CLASS": "20000"})], [tmp_path / f"d{i}" for i in range(1000)])
    per_call = (time.perf_counter() - started) / 20
    assert (len(paths.watched), paths.cancelled) == (1000, [])
    assert per_call < 0.02, f"an unchanged subscription of 1,000 directories took {per_call * 1000:.1f} ms"

    r.engine.subscribe("sriov", matches, [tmp_path / f"d{i}" for i in range(10, 1010)])
    assert sorted(paths.watched[1000:]) == sorted(tmp_path / f"d{i}" for i in range(1000, 1010))
    assert sorted(paths.cancelled) == sorted(tmp_path / f"d{i}" for i in range(10))
    assert len(paths.watching()) == 1000


@aio
async def test_a_directory_two_drivers_watch_stays_watched_until_both_let_go(tmp_path: Path, recorder: Callable[..., Recorder]) -> None:
    paths = CountingWatcher()
    r = recorder(paths=paths)
    r.engine.start(asyncio.get_running_loop())
    r.engine.subscribe("a", [], [tmp_path])
    r.engine.subscribe("b", [], [tmp_path])
    r.engine.subscribe("a", [], [])
    assert paths.watched == [tmp_path] and paths.cancelled == []
    (tmp_path / "x").touch()
    await r.wait(lambda: "b" in r.drivers(), "b told of the new entry")
    assert r.drivers() == ["b"]
    r.engine.subscribe("b", [], [])
    assert paths.cancelled == [tmp_path] and paths.watching() == {}


@aio
async def test_a_shared_watcher_is_left_open_by_the_engine(tmp_path: Path) -> None:
    """The daemon's plugin-directory watch shares the engine's descriptor and outlives it."""
    paths = PathWatcher(LOG)
    paths.start(asyncio.get_running_loop())
    seen: asyncio.Queue[set[str]] = asyncio.Queue()
    plugin_dir, fixture = tmp_path / "plugins", tmp_path / "fixture"
    plugin_dir.mkdir()
    fixture.mkdir()
    paths.watch(plugin_dir, seen.put_nowait, Changes.ENTRIES)
    hotplug = HotplugEngine(source="kernel", on_match=lambda *_: None, on_lost=lambda _: None, log=LOG, paths=paths)
    hotplug.subscribe("vfio", [], [fixture])
    hotplug.start(asyncio.get_running_loop())
    assert set(paths.watching()) == {plugin_dir, fixture}
    hotplug.close()
    assert set(paths.watching()) == {plugin_dir}
    (plugin_dir / "kubelet.sock").touch()
    assert await asyncio.wait_for(seen.get(), TIMEOUT) == {"kubelet.sock"}
    paths.close()


def test_importing_the_package_does_not_load_pyudev() -> None:
    """`nodedev serve` must register within 150 ms of starting; pyudev alone costs ~35 ms."""
    code = "import sys, nodedev.hotplug; print(sorted(m for m in ('pyudev', 'inotify_simple') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"
