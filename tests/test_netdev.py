"""The netdev driver: selectors, claiming order, link types, NUMA, health, per-device
edits, config and the uplink exclusion, on fixture trees and on real interfaces under
the real /sys. Scans narrowed to the changed interfaces, interfaces vanishing mid-scan
and the uplink in private network namespaces are in test_netdev_scan.py, which uses
the helpers here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from nodedev import config as nodedev_config
from nodedev import drivers
from nodedev.driver import ContainerEdits, Device, Health, HostContext, Snapshot, UdevMatch
from nodedev.drivers import netdev
from nodedev.drivers.netdev import NetdevDriver, NetdevOptions, env_name
from tests import netif
from tests.netif import FixtureNet, NetIfs, wait_link

netifs = netif.netifs  # fixtures: pytest finds them by these names

ACTIONS = frozenset({"add", "remove", "move", "link"})


@pytest.fixture
def sysfs(tmp_path: Path) -> FixtureNet:
    return FixtureNet(tmp_path)


def driver(resources: list[dict[str, Any]], sysfs_root: Path, **options: Any) -> NetdevDriver:
    """A driver on `sysfs_root`; routes from the real /proc with the real /sys, else from
    the fixture proc tree beside it."""
    opts = NetdevOptions.model_validate({"enabled": True, "resourceList": resources, **options})
    proc_root = Path("/proc") if sysfs_root == Path("/sys") else sysfs_root.parent / "proc"
    host = HostContext(
        sysfs_root=sysfs_root, dev_root=Path("/dev"), proc_root=proc_root, rescan=lambda: None, log=logging.getLogger("test.netdev")
    )
    return NetdevDriver(opts, host)


ALL = [{"resourceName": "all"}]


def ids(snapshot: Snapshot, resource: str = "nodedev.io/all") -> list[str]:
    return [d.id for d in snapshot[resource]]


def device(snapshot: Snapshot, resource: str, name: str) -> Device:
    return next(d for d in snapshot[resource] if d.id == name)


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the interfaces the driver reads from now on, in order."""
    seen: list[str] = []
    real = netdev.read_interface

    def counting(net: Path, name: str) -> netdev.Interface | None:
        seen.append(name)
        return real(net, name)

    monkeypatch.setattr(netdev, "read_interface", counting)
    return seen


# -- selection -------------------------------------------------------------------


def test_empty_selectors_offer_every_interface_but_loopback(sysfs: FixtureNet) -> None:
    sysfs.add("lo", arphrd=772, operstate="unknown")
    sysfs.add("loop2", arphrd=772, operstate="unknown")  # a second loopback-type link
    sysfs.add("eth1")
    sysfs.add("ib0", arphrd=32)
    assert ids(driver(ALL, sysfs.root).scan()) == ["eth1", "ib0"]


def test_selector_values_are_ored_and_keys_anded(sysfs: FixtureNet) -> None:
    sysfs.add("eth1", driver="ixgbe")
    sysfs.add("eth2", driver="mlx5_core")
    sysfs.add("eth3", driver="i40e")
    sysfs.add("ens4", driver="mlx5_core")
    sysfs.add("ib0", arphrd=32, driver="mlx5_core")
    selectors = {"ifNames": ["eth*", "ib?"], "drivers": ["mlx5_core", "ixgbe"], "linkTypes": ["ether"]}
    snap = driver([{"resourceName": "fast", "selectors": selectors}], sysfs.root).scan()
    assert ids(snap, "nodedev.io/fast") == ["eth1", "eth2"]


def test_an_interface_goes_to_the_first_entry_that_selects_it(sysfs: FixtureNet) -> None:
    for name in ("eth1", "eth2", "eth3"):
        sysfs.add(name)
    resources = [
        {"resourceName": "special", "resourcePrefix": "example.com", "selectors": {"ifNames": ["eth2"]}},
        {"resourceName": "rest", "selectors": {}},
        {"resourceName": "never", "selectors": {"ifNames": ["eth*"]}},
    ]
    snap = driver(resources, sysfs.root).scan()
    assert ids(snap, "example.com/special") == ["eth2"]
    assert ids(snap, "nodedev.io/rest") == ["eth1", "eth3"]
    assert ids(snap, "nodedev.io/never") == []  # served, with no devices


def test_virtual_interfaces_never_match_a_drivers_selector(sysfs: FixtureNet) -> None:
    sysfs.add("veth0")  # no device/ link: a virtual interface
    sysfs.add("eth1", driver="virtio_net")
    snap = driver([{"resourceName": "nics", "selectors": {"drivers": ["virtio_net", "veth"]}}], sysfs.root).scan()
    assert ids(snap, "nodedev.io/nics") == ["eth1"]


def test_link_types_by_name_or_number(sysfs: FixtureNet) -> None:
    sysfs.add("eth1")
    sysfs.add("ib0", arphrd=32)
    sysfs.add("tun0", arphrd=65534)
    sysfs.add("sit1", arphrd=776)
    sysfs.add("odd0", arphrd=1000)  # no name known for it
    resources = [
        {"resourceName": "ib", "selectors": {"linkTypes": ["infiniband"]}},
        {"resourceName": "l3", "selectors": {"linkTypes": ["none", "sit"]}},
        {"resourceName": "odd", "selectors": {"linkTypes": ["1000"]}},
        {"resourceName": "eth", "selectors": {"linkTypes": ["1"]}},
    ]
    snap = driver(resources, sysfs.root).scan()
    assert ids(snap, "nodedev.io/ib") == ["ib0"]
    assert ids(snap, "nodedev.io/l3") == ["sit1", "tun0"]
    assert ids(snap, "nodedev.io/odd") == ["odd0"]
    assert ids(snap, "nodedev.io/eth") == ["eth1"]


def test_numa_node_comes_from_the_parent_device(sysfs: FixtureNet) -> None:
    sysfs.add("eth0", driver="ice", numa=1)
    sysfs.add("eth1", driver="ice", numa=-1)
    sysfs.add("eth2", driver="ice")
    sysfs.add("veth9")
    snap = driver(ALL, sysfs.root).scan()
    assert [(d.id, d.numa_nodes) for d in snap["nodedev.io/all"]] == [("eth0", (1,)), ("eth1", ()), ("eth2", ()), ("veth9", ())]


def test_no_class_net_directory_means_no_devices(tmp_path: Path) -> None:
    assert driver(ALL, tmp_path / "empty" / "sys").scan() == {"nodedev.io/all": []}


def test_names_no_entry_can_select_are_never_read(sysfs: FixtureNet, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("eth1", "veth1", "veth2", "ens3"):
        sysfs.add(name)
    seen = count_reads(monkeypatch)
    resources = [{"resourceName": "a", "selectors": {"ifNames": ["eth*"]}}, {"resourceName": "b", "selectors": {"ifNames": ["ens3"]}}]
    snap = driver(resources, sysfs.root).scan()
    assert (ids(snap, "nodedev.io/a"), ids(snap, "nodedev.io/b")) == (["eth1"], ["ens3"])
    assert sorted(seen) == ["ens3", "eth1"]


# -- the node's own uplink ---------------------------------------------------------


def test_interfaces_carrying_a_default_route_and_their_lower_devices_are_never_offered(sysfs: FixtureNet) -> None:
    sysfs.routes(ipv4_default=["bond0"], ipv6_default=["ens7"])
    with (sysfs.proc_net / "route").open("a") as table:  # not a default route
        table.write("eth9\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    for name in ("eth1", "eth2", "eth3", "eth9", "ens7"):
        sysfs.add(name)
    sysfs.add("bond0", lower=("eth1", "eth2"))
    assert ids(driver(ALL, sysfs.root).scan()) == ["eth3", "eth9"]
    assert ids(driver(ALL, sysfs.root, excludeDefaultRoute=False).scan()) == ["bond0", "ens7", "eth1", "eth2", "eth3", "eth9"]


def test_the_hosts_default_route_interface_is_not_offered() -> None:
    uplinks = [line.split()[0] for line in Path("/proc/net/route").read_text().splitlines()[1:] if line.split()[1] == "00000000"]
    if not uplinks:
        pytest.skip("this host has no IPv4 default route")
    snap = driver(ALL, Path("/sys")).scan()
    assert not set(uplinks) & set(ids(snap))


# -- health ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "expected", "reason"),
    [
        ({"operstate": "up"}, Health.HEALTHY, "operstate up"),
        ({"operstate": "unknown"}, Health.HEALTHY, "operstate unknown"),  # tun, some virtual links
        ({"operstate": "down", "up": False}, Health.HEALTHY, "administratively down, carrier not checked"),
        ({"operstate": "down", "carrier": False}, Health.UNHEALTHY, "link is up but has no carrier (operstate down)"),
        ({"operstate": "notpresent"}, Health.UNHEALTHY, "operstate notpresent (hardware missing)"),
        (
            {"operstate": "lowerlayerdown", "carrier": False},
            Health.UNHEALTHY,
            "operstate lowerlayerdown (its lower device or peer is down)",
        ),
        ({"operstate": "dormant"}, Health.HEALTHY, "operstate dormant"),
    ],
)
def test_health_follows_what_a_pod_taking_the_link_would_get(
    sysfs: FixtureNet, state: dict[str, Any], expected: Health, reason: str
) -> None:
    sysfs.add("eth1", **state)
    dev = device(driver(ALL, sysfs.root).scan(), "nodedev.io/all", "eth1")
    assert (dev.health, dev.reason) == (expected, reason)


# -- edits, events, watched paths, config -----------------------------------------------------


def test_each_interface_carries_its_env_and_a_request_joins_them(sysfs: FixtureNet) -> None:
    for name in ("eth1", "eth2"):
        sysfs.add(name)
    sysfs.add("ib0", arphrd=32)
    resources = [
        {"resourceName": "fast-nic", "resourcePrefix": "example.com", "selectors": {"linkTypes": ["ether"]}},
        {"resourceName": "ib_ports"},
    ]
    d = driver(resources, sysfs.root)
    snap = d.scan()
    eth1, eth2 = snap["example.com/fast-nic"]
    assert eth1.edits == ContainerEdits(envs={"NETDEV_EXAMPLE_COM_FAST_NIC": "eth1"})
    merged = ContainerEdits.merge([eth2.edits, eth1.edits], d.allocate("example.com/fast-nic", [eth2, eth1]))
    assert merged == ContainerEdits(envs={"NETDEV_EXAMPLE_COM_FAST_NIC": "eth2,eth1"})
    assert snap["nodedev.io/ib_ports"][0].edits == ContainerEdits(envs={"NETDEV_NODEDEV_IO_IB_PORTS": "ib0"})
    assert not NetdevDriver.implements("allocate")
    assert env_name("a.b-c/d.e-f") == "NETDEV_A_B_C_D_E_F"


def test_declared_resources_use_the_default_prefix() -> None:
    resource_list = [{"resourceName": "a"}, {"resourceName": "b", "resourcePrefix": "x.io"}]
    opts = NetdevOptions.model_validate({"enabled": True, "resourceList": resource_list})
    assert NetdevDriver.declared_resources(opts) == ["nodedev.io/a", "x.io/b"]


def test_udev_matches_narrow_to_the_configured_names_and_to_what_changes_a_link(tmp_path: Path) -> None:
    entries = [{"resourceName": "a", "selectors": {"ifNames": ["eth*", "ens1"]}}, {"resourceName": "b", "selectors": {"ifNames": ["eth*"]}}]
    named = driver(entries, tmp_path)
    assert list(named.udev_matches()) == [UdevMatch("net", "eth*", actions=ACTIONS), UdevMatch("net", "ens1", actions=ACTIONS)]
    broad = driver(
        [{"resourceName": "a", "selectors": {"ifNames": ["eth*"]}}, {"resourceName": "b", "selectors": {"drivers": ["ice"]}}], tmp_path
    )
    assert list(broad.udev_matches()) == [UdevMatch("net", actions=ACTIONS)]


def test_a_fixture_tree_is_watched_where_the_scan_read_it(sysfs: FixtureNet) -> None:
    for name in ("eth1", "eth2"):
        sysfs.add(name)
    d = driver([{"resourceName": "a", "selectors": {"ifNames": ["eth*"]}}], sysfs.root)
    d.scan()
    assert list(d.watch_paths()) == [sysfs.net, sysfs.net / "eth1", sysfs.net / "eth2", sysfs.proc_net]
    sysfs.remove("eth2")
    sysfs.add("ens3")  # no entry can take it: not read, not watched
    d.scan()
    assert list(d.watch_paths()) == [sysfs.net, sysfs.net / "eth1", sysfs.proc_net]
    d = driver(ALL, sysfs.root, excludeDefaultRoute=False)
    d.scan()
    assert list(d.watch_paths()) == [sysfs.net, sysfs.net / "ens3", sysfs.net / "eth1"]


def test_the_real_sys_and_proc_are_not_watched() -> None:
    d = driver(ALL, Path("/sys"))
    d.scan()
    assert list(d.watch_paths()) == []


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"resourceList": [{"resourceName": "fast nic"}]}, "resourceName 'fast nic' may contain only letters, digits, '_' and '-'"),
        ({"resourceList": [{"resourceName": "a", "selectors": {"linkTypes": ["ethernet"]}}]}, "unknown link type 'ethernet'"),
        ({"resourceList": [{"resourceName": "a", "selectors": {"ifName": ["eth0"]}}]}, "unknown key"),
        ({"resourceList": [{"resourceName": "a", "selectors": {"ifNames": "eth0"}}]}, "Input should be a valid list"),
        ({"resourceList": [{"resourceName": "a"}, {"resourceName": "a"}]}, "resource 'nodedev.io/a' is listed twice in resourceList"),
        ({"resourceList": [{"resourceName": "a", "resourcePrefix": "Not_A_Domain"}]}, "is not a DNS subdomain"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: dict[str, Any], message: str) -> None:
    monkeypatch.setitem(drivers.NAMES, "netdev", "nodedev.drivers.netdev:NetdevDriver")
    text = f"drivers:\n  netdev: {{enabled: true, resourceList: {section['resourceList']!r}}}\n".replace("'", '"')
    with pytest.raises(nodedev_config.ConfigError) as err:
        nodedev_config.parse(text, tmp_path / "config.yaml")
    assert "drivers.netdev" in str(err.value)
    assert message in str(err.value)


def test_a_valid_section_loads_through_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(drivers.NAMES, "netdev", "nodedev.drivers.netdev:NetdevDriver")
    text = """
drivers:
  netdev:
    enabled: true
    resourceList:
      - resourceName: uplinks
        selectors: {ifNames: ["ens*f0"], linkTypes: [ether]}
      - resourceName: ib
        resourcePrefix: example.com
        selectors: {linkTypes: [infiniband], drivers: [mlx5_core]}
"""
    cfg = nodedev_config.parse(text, tmp_path / "config.yaml")
    (enabled,) = cfg.drivers
    assert enabled.cls is NetdevDriver
    assert NetdevDriver.declared_resources(enabled.options) == ["nodedev.io/uplinks", "example.com/ib"]


def test_options_reject_wrong_types() -> None:
    with pytest.raises(ValidationError):
        NetdevOptions.model_validate({"resourceList": [{"resourceName": 5}]})



# -- real interfaces under the real /sys -----------------------------------------------


def real_driver(netifs: NetIfs) -> NetdevDriver:
    return driver([{"resourceName": "test", "selectors": {"ifNames": [f"{netifs.prefix}*"]}}], Path("/sys"))


def mine(netifs: NetIfs, snapshot: Snapshot) -> dict[str, Device]:
    return {d.id: d for d in snapshot["nodedev.io/test"] if d.id in netifs.made}


def test_real_veth_pair_is_discovered_and_follows_its_link(netifs: NetIfs) -> None:
    d = real_driver(netifs)
    a, b = netifs.veth()
    found = mine(netifs, d.scan())
    assert set(found) == {a, b}
    assert found[a].health is Health.HEALTHY and "administratively down" in found[a].reason
    assert found[a].numa_nodes == ()

    netifs.up(a)  # peer still down: no traffic can pass
    wait_link(lambda: mine(netifs, d.scan())[a].health is Health.UNHEALTHY, f"{a} unhealthy")
    netifs.up(b)
    wait_link(lambda: mine(netifs, d.scan())[a].health is Health.HEALTHY, f"{a} healthy")

    netifs.delete(a)
    assert mine(netifs, d.scan()) == {}


def test_real_tun_tap_and_macvlan_link_types(netifs: NetIfs) -> None:
    tun, tap = netifs.tun(), netifs.tap()
    parent, _ = netifs.veth()
    mac = netifs.macvlan(parent)
    resources = [
        {"resourceName": "l3", "selectors": {"ifNames": [f"{netifs.prefix}*"], "linkTypes": ["none"]}},
        {"resourceName": "l2", "selectors": {"ifNames": [f"{netifs.prefix}*"], "linkTypes": ["ether"]}},
        {"resourceName": "nic", "selectors": {"ifNames": [f"{netifs.prefix}*"], "drivers": ["veth", "tun", "macvlan"]}},
    ]
    snap = driver(resources, Path("/sys")).scan()
    assert [d.id for d in snap["nodedev.io/l3"] if d.id in netifs.made] == [tun]
    assert {d.id for d in snap["nodedev.io/l2"] if d.id in netifs.made} == {tap, parent, mac, _}
    assert [d.id for d in snap["nodedev.io/nic"] if d.id in netifs.made] == []


def test_real_macvlan_is_unhealthy_while_its_parent_is_down(netifs: NetIfs) -> None:
    parent, peer = netifs.veth()
    mac = netifs.macvlan(parent)
    netifs.up(mac)
    d = real_driver(netifs)
    wait_link(lambda: mine(netifs, d.scan())[mac].health is Health.UNHEALTHY, f"{mac} unhealthy")
    assert "lowerlayerdown" in mine(netifs, d.scan())[mac].reason
    netifs.up(parent, peer)
    wait_link(lambda: mine(netifs, d.scan())[mac].health is Health.HEALTHY, f"{mac} healthy once its parent is up")
