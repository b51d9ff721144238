"""The netdev driver's scans: narrowed to the interfaces an event named, an interface
vanishing in the middle of one, and the uplink under a bridge, VLAN or macvlan in a
private network namespace. Fixture trees, real interfaces under the real /sys, and
namespaces; the helpers are test_netdev.py's."""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import pytest

from nodedev.driver import Health, Snapshot
from tests import netif, test_netdev
from tests.netif import FixtureNet, NetIfs, NetNs
from tests.test_netdev import ALL, count_reads, device, driver, ids, mine, real_driver

netifs = netif.netifs  # fixtures: pytest finds them by these names
netns = netif.netns
sysfs = test_netdev.sysfs


# -- an interface vanishing in the middle of a scan ---------------------------------------


def vanish_at_driver_lookup(monkeypatch: pytest.MonkeyPatch, name: str, vanish: Any) -> list[str]:
    """Calls `vanish()` once, when the scan looks up `name`'s driver link: after its
    `type` was read and before its flags, operstate and carrier are."""
    real_readlink = os.readlink
    done: list[str] = []

    def readlink(path: Any, *, dir_fd: int | None = None) -> str:
        where = str(path) if dir_fd is None else os.path.join(real_readlink(f"/proc/self/fd/{dir_fd}"), str(path))
        if not done and f"/{name}/" in where:
            done.append(where)
            vanish()
        return real_readlink(path) if dir_fd is None else real_readlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "readlink", readlink)
    return done


@pytest.mark.parametrize("how", ["deleted", "renamed"])
def test_an_interface_vanishing_mid_scan_is_dropped_not_offered_half_read(
    sysfs: FixtureNet, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    for name in ("eth1", "eth2", "eth3"):
        sysfs.add(name, up=False, operstate="down")
    d = driver(ALL, sysfs.root)
    vanish = (lambda: sysfs.remove("eth2")) if how == "deleted" else (lambda: sysfs.rename("eth2", "eth9"))
    hit = vanish_at_driver_lookup(monkeypatch, "eth2", vanish)
    assert ids(d.scan()) == ["eth1", "eth3"]
    assert hit, "the scan never reached eth2"
    monkeypatch.undo()
    assert ids(d.scan(changed={"eth2", "eth9"})) == (["eth1", "eth3"] if how == "deleted" else ["eth1", "eth3", "eth9"])


def test_a_real_interface_deleted_mid_scan_is_dropped(netifs: NetIfs, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = netifs.veth()
    hit = vanish_at_driver_lookup(monkeypatch, a, lambda: netifs.delete(a))  # takes its peer b along
    found = mine(netifs, real_driver(netifs).scan())
    assert hit, f"the scan never reached {a}"
    assert a not in found  # b may be in: it is offered as read, if it was read before a


# -- scans narrowed to the changed interfaces ---------------------------------------------


@pytest.fixture
def many(sysfs: FixtureNet) -> FixtureNet:
    for i in range(200):
        sysfs.add(f"eth{i:03d}")
    return sysfs


def same(a: Snapshot, b: Snapshot) -> bool:
    """Equal devices and equal edits (Device equality leaves the edits out)."""
    return a == b and all(x.edits == y.edits for r in a for x, y in zip(a[r], b[r], strict=True))


def test_a_changed_scan_reads_only_the_named_interfaces_yet_returns_them_all(many: FixtureNet, monkeypatch: pytest.MonkeyPatch) -> None:
    d = driver(ALL, many.root)
    assert len(ids(d.scan())) == 200
    many.add("eth200")  # new
    many.set("eth005", "operstate", "notpresent")  # changed
    many.remove("eth007")  # removed
    many.rename("eth009", "eth999")  # renamed: the event names both
    seen = count_reads(monkeypatch)
    snap = d.scan(changed={"eth200", "eth005", "eth007", "eth009", "eth999"})
    assert sorted(seen) == ["eth005", "eth200", "eth999"]
    assert same(snap, driver(ALL, many.root).scan())
    names = ids(snap)
    assert len(names) == 200 and "eth200" in names and "eth999" in names and "eth007" not in names and "eth009" not in names
    assert device(snap, "nodedev.io/all", "eth005").health is Health.UNHEALTHY


def test_interfaces_not_named_keep_what_was_read_before(many: FixtureNet, monkeypatch: pytest.MonkeyPatch) -> None:
    d = driver(ALL, many.root)
    d.scan()
    many.set("eth003", "operstate", "notpresent")  # no event named it (yet)
    seen = count_reads(monkeypatch)
    assert device(d.scan(changed={"eth001"}), "nodedev.io/all", "eth003").health is Health.HEALTHY
    assert seen == ["eth001"]
    assert device(d.scan(), "nodedev.io/all", "eth003").health is Health.UNHEALTHY  # None: read everything
    assert len(seen) == 1 + 200


def test_interfaces_appearing_or_vanishing_unnamed_are_still_listed(many: FixtureNet, monkeypatch: pytest.MonkeyPatch) -> None:
    d = driver(ALL, many.root)
    d.scan()
    many.add("eth500")
    many.remove("eth002")
    seen = count_reads(monkeypatch)
    names = ids(d.scan(changed=set()))
    assert seen == ["eth500"]
    assert "eth500" in names and "eth002" not in names and len(names) == 200


def test_nothing_changed_reads_nothing_and_gives_the_same_snapshot(many: FixtureNet, monkeypatch: pytest.MonkeyPatch) -> None:
    d = driver(ALL, many.root)
    first = d.scan()
    seen = count_reads(monkeypatch)
    assert same(d.scan(changed=set()), first)
    assert seen == []


def test_the_first_scan_reads_everything_whatever_it_is_told(sysfs: FixtureNet, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("eth1", "eth2", "eth3"):
        sysfs.add(name)
    seen = count_reads(monkeypatch)
    assert ids(driver(ALL, sysfs.root).scan(changed={"eth2"})) == ["eth1", "eth2", "eth3"]
    assert sorted(seen) == ["eth1", "eth2", "eth3"]


def test_the_uplink_exclusion_is_recomputed_at_every_scan_without_rereading(sysfs: FixtureNet, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("eth1", "eth2", "eth3", "eth4"):
        sysfs.add(name)
    sysfs.add("br0", lower=("eth1",))
    d = driver(ALL, sysfs.root)
    assert ids(d.scan()) == ["br0", "eth1", "eth2", "eth3", "eth4"]
    seen = count_reads(monkeypatch)
    sysfs.routes(ipv4_default=["br0"])  # a default route appears: no link event at all
    assert ids(d.scan(changed=set())) == ["eth2", "eth3", "eth4"]
    (sysfs.net / "br0" / "lower_eth3").symlink_to(sysfs.net / "eth3")  # eth3 joins the uplink bridge
    assert ids(d.scan(changed={"eth3"})) == ["eth2", "eth4"]
    sysfs.routes()
    assert ids(d.scan(changed=set())) == ["br0", "eth1", "eth2", "eth3", "eth4"]
    assert seen == ["eth3"]


def test_a_real_changed_scan_reads_only_the_new_pair(netifs: NetIfs, monkeypatch: pytest.MonkeyPatch) -> None:
    d = real_driver(netifs)
    first, _ = netifs.veth()
    d.scan()
    a, b = netifs.veth()
    seen = count_reads(monkeypatch)
    assert set(mine(netifs, d.scan(changed={a, b}))) == {first, _, a, b}
    assert sorted(seen) == sorted([a, b])


def test_one_interface_added_among_1000_real_ones_costs_one_read(netifs: NetIfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hotplug benchmark's shape: 1,000 ifb interfaces made in `ip -batch` bursts."""
    group = 1000 + secrets.randbelow(60000)
    made = netifs.ifbs(1000, group=group)
    d = real_driver(netifs)
    assert set(mine(netifs, d.scan())) == set(made)
    (extra,) = netifs.ifbs(1)
    seen = count_reads(monkeypatch)
    assert set(mine(netifs, d.scan(changed={extra}))) == {*made, extra}
    assert seen == [extra]
    netifs.delete_group(group)
    assert set(mine(netifs, d.scan(changed=set(made)))) == {extra}
    assert not any(netif.exists(name) for name in made)


# -- the uplink in a network namespace of its own ------------------------------------


NETNS_SCAN = """
import json, logging
from pathlib import Path
from nodedev.driver import HostContext
from nodedev.drivers.netdev import NetdevDriver, NetdevOptions
options = NetdevOptions.model_validate({"enabled": True, "resourceList": [{"resourceName": "all"}]})
host = HostContext(sysfs_root=Path("/sys"), dev_root=Path("/dev"), proc_root=Path("/proc"), rescan=lambda: None, log=logging.getLogger("x"))
print(json.dumps([d.id for d in NetdevDriver(options, host).scan()["nodedev.io/all"]]))
"""

TOPOLOGIES = {
    "bridge": (["link add br0 type bridge", "link set va master br0", "link set br0 up"], "br0"),
    "vlan": (["link add link va name va.100 type vlan id 100", "link set va.100 up"], "va.100"),
    "macvlan": (["link add link va name mv0 type macvlan mode bridge", "link set mv0 up"], "mv0"),
    "vlan-on-bridge": (
        ["link add br0 type bridge", "link set va master br0", "link set br0 up"]
        + ["link add link br0 name br0.7 type vlan id 7", "link set br0.7 up"],
        "br0.7",
    ),
    "macvlan-on-bridge": (
        ["link add br0 type bridge", "link set va master br0", "link set br0 up"]
        + ["link add link br0 name mv0 type macvlan mode bridge", "link set mv0 up"],
        "mv0",
    ),
}


@pytest.mark.parametrize("family", ["0.0.0.0/0", "::/0"], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_the_uplink_under_a_bridge_or_vlan_is_never_offered_with_its_lower_devices(netns: NetNs, topology: str, family: str) -> None:
    """In a namespace of its own, with a default route the test controls: the real
    /proc/net route tables and the real `lower_*` links of /sys, read by the driver.
    va is the uplink's lowest device; its peer vb and the pair vc/vd are offered."""
    commands, uplink = TOPOLOGIES[topology]
    netns.batch(["link add va type veth peer name vb", "link add vc type veth peer name vd", "link set va up", "link set vb up"])
    try:
        netns.batch(commands)
    except RuntimeError as err:
        if "Unknown device type" in str(err):
            pytest.skip(f"this kernel cannot make the links of {topology!r}: {err}")
        raise
    netns.batch([f"route add {family} dev {uplink}"])
    assert json.loads(netns.run_python(NETNS_SCAN)) == ["vb", "vc", "vd"]
    netns.ip("route", "del", family, "dev", uplink)
    assert uplink in json.loads(netns.run_python(NETNS_SCAN))


def test_a_vlan_uplink_over_a_bridge_excludes_the_whole_stack_in_a_fixture(sysfs: FixtureNet) -> None:
    """The sysfs shape the kernel gives a VLAN on a bridge (for kernels built without
    802.1Q, where the namespace test above is skipped): each upper device has a
    `lower_<name>` link to the device below it."""
    for name in ("va", "vb", "vc"):
        sysfs.add(name)
    sysfs.add("br0", lower=("va",))
    sysfs.add("br0.7", lower=("br0",))
    sysfs.routes(ipv6_default=["br0.7"])
    assert ids(driver(ALL, sysfs.root).scan()) == ["vb", "vc"]
