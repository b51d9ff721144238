"""The hotplug engine with the real kernel: uevents and rtnetlink messages from real
interfaces (veth, tun/tap, macvlan), filters on real event properties, the names
told to the inventory, and a real netlink receive buffer overrun."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from nodedev.driver import UdevMatch
from tests import netif, test_hotplug
from tests.netif import NetIfs
from tests.test_hotplug import Recorder, aio

netifs = netif.netifs  # fixtures
recorder = test_hotplug.recorder


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
async def test_the_names_told_are_the_interfaces_the_kernel_events_concerned(netifs: NetIfs, recorder: Callable[..., Recorder]) -> None:
    """With the default settle window, what the inventory hears is (driver, names): the
    union over the window of the interfaces its events named, uevents and link messages."""
    r = await started(recorder(settle_s=0.002), "netdev", [UdevMatch("net", f"{netifs.prefix}*")])
    a, b = netifs.veth()

    def told() -> set[str]:
        return set().union(*(n for n in r.names("netdev") if n is not None))

    await r.wait(lambda: {a, b} <= told(), f"{a} and {b} named")
    assert None not in r.names("netdev") and told() == {a, b}


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
async def test_real_events_are_filtered_on_their_properties_and_actions(netifs: NetIfs, recorder: Callable[..., Recorder]) -> None:
    """Kernel net uevents carry INTERFACE and IFINDEX; a filter on them, or on the
    action, passes only what it names. The last event is one every driver takes, so
    once it arrived anything that should have been filtered out would have been seen."""
    a, b = netifs.veth()
    index = (Path("/sys/class/net") / a / "ifindex").read_text().strip()
    r = await started(recorder(link_events=False), "by-interface", [UdevMatch("net", properties={"INTERFACE": a})])
    r.engine.subscribe("by-index", [UdevMatch("net", properties={"IFINDEX": index})], [])
    r.engine.subscribe("removals", [UdevMatch("net", f"{netifs.prefix}*", actions=frozenset({"remove"}))], [])
    r.engine.subscribe("last", [UdevMatch("net", b, actions=frozenset({"move"}))], [])
    netifs.uevent(b, "change")
    netifs.uevent(a, "change")
    netifs.uevent(b, "remove")
    netifs.uevent(b, "move")
    await r.wait(lambda: r.matched("last", "move", b), f"the move of {b}")
    seen = [(d, e.action, e.sys_name) for d, _, e in r.matches if e is not None]
    assert seen == [("by-interface", "change", a), ("by-index", "change", a), ("removals", "remove", b), ("last", "move", b)]


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
async def test_link_events_can_be_filtered_by_interface(netifs: NetIfs, recorder: Callable[..., Recorder]) -> None:
    a, b = netifs.veth()
    r = await started(recorder(), "a-links", [UdevMatch("net", actions=frozenset({"link"}), properties={"INTERFACE": a})])
    r.engine.subscribe("b-links", [UdevMatch("net", actions=frozenset({"link"}), properties={"INTERFACE": b})], [])
    netifs.up(b)
    await r.wait(lambda: r.matched("b-links", "link", b), f"link event for {b}")
    assert "a-links" not in r.drivers()


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
