"""The netdev driver: selectors, claiming order, link types, NUMA, health and the
Allocate env, on fixture sysfs trees and on real interfaces under the real /sys."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from nodedev import config as nodedev_config
from nodedev import drivers
from nodedev.driver import Device, Health, HostContext, UdevMatch
from nodedev.drivers.netdev import NetdevDriver, NetdevOptions, env_name, read_interface
from tests.netif import NetIfs, netifs, wait_link  # noqa: F401  # netifs is a fixture

IFF_UP_BROADCAST_MULTICAST = 0x1003
IFF_DOWN_BROADCAST_MULTICAST = 0x1002


class Sysfs:
    """A fixture tree shaped like /sys/class/net, with parent devices where asked."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.net = root / "class" / "net"
        self.net.mkdir(parents=True)

    def add(
        self,
        name: str,
        *,
        arphrd: int = 1,
        operstate: str = "up",
        up: bool = True,
        carrier: bool = True,
        driver: str | None = None,
        numa: int | None = None,
        lower: tuple[str, ...] = (),
    ) -> None:
        base = self.net / name
        base.mkdir()
        (base / "type").write_text(f"{arphrd}\n")
        (base / "operstate").write_text(f"{operstate}\n")
        (base / "flags").write_text(f"{hex(IFF_UP_BROADCAST_MULTICAST if up else IFF_DOWN_BROADCAST_MULTICAST)}\n")
        if up:  # the kernel refuses to read `carrier` of a down link; leave it out as a reminder
            (base / "carrier").write_text("1\n" if carrier else "0\n")
        if driver is not None or numa is not None:
            device = self.root / "devices" / "pci0000:00" / f"0000:00:{len(os.listdir(self.net)):02x}.0"
            device.mkdir(parents=True)
            if numa is not None:
                (device / "numa_node").write_text(f"{numa}\n")
            if driver is not None:
                target = self.root / "bus" / "pci" / "drivers" / driver
                target.mkdir(parents=True, exist_ok=True)
                (device / "driver").symlink_to(target)
            (base / "device").symlink_to(device)
        for lower_name in lower:
            (base / f"lower_{lower_name}").symlink_to(self.net / lower_name)


@pytest.fixture
def sysfs(tmp_path: Path) -> Sysfs:
    return Sysfs(tmp_path / "sys")


@pytest.fixture
def proc_net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty routing table by default, so the host's own default route stays out of fixture tests."""
    path = tmp_path / "proc-net"
    path.mkdir()
    (path / "route").write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n")
    (path / "ipv6_route").write_text("")
    monkeypatch.setattr(NetdevDriver, "proc_net", path)
    return path


def driver(resources: list[dict[str, Any]], sysfs_root: Path, **options: Any) -> NetdevDriver:
    opts = NetdevOptions.model_validate({"enabled": True, "resourceList": resources, **options})
    host = HostContext(sysfs_root=sysfs_root, dev_root=Path("/dev"), rescan=lambda: None, log=logging.getLogger("test.netdev"))
    return NetdevDriver(opts, host)


def ids(snapshot: Any, resource: str) -> list[str]:
    return [d.id for d in snapshot[resource]]


def device(snapshot: Any, resource: str, name: str) -> Device:
    return next(d for d in snapshot[resource] if d.id == name)


# -- selection -------------------------------------------------------------------


def test_empty_selectors_offer_every_interface_but_loopback(sysfs: Sysfs, proc_net: Path) -> None:
    sysfs.add("lo", arphrd=772, operstate="unknown")
    sysfs.add("loop2", arphrd=772, operstate="unknown")  # a second loopback-type link
    sysfs.add("eth1")
    sysfs.add("ib0", arphrd=32)
    snap = driver([{"resourceName": "all"}], sysfs.root).scan()
    assert ids(snap, "nodedev.io/all") == ["eth1", "ib0"]


def test_selector_values_are_ored_and_keys_anded(sysfs: Sysfs, proc_net: Path) -> None:
    sysfs.add("eth1", driver="ixgbe")
    sysfs.add("eth2", driver="mlx5_core")
    sysfs.add("eth3", driver="i40e")
    sysfs.add("ens4", driver="mlx5_core")
    sysfs.add("ib0", arphrd=32, driver="mlx5_core")
    selectors = {"ifNames": ["eth*", "ib?"], "drivers": ["mlx5_core", "ixgbe"], "linkTypes": ["ether"]}
    snap = driver([{"resourceName": "fast", "selectors": selectors}], sysfs.root).scan()
    assert ids(snap, "nodedev.io/fast") == ["eth1", "eth2"]


def test_an_interface_goes_to_the_first_entry_that_selects_it(sysfs: Sysfs, proc_net: Path) -> None:
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


def test_virtual_interfaces_never_match_a_drivers_selector(sysfs: Sysfs, proc_net: Path) -> None:
    sysfs.add("veth0")  # no device/ link: a virtual interface
    sysfs.add("eth1", driver="virtio_net")
    snap = driver([{"resourceName": "nics", "selectors": {"drivers": ["virtio_net", "veth"]}}], sysfs.root).scan()
    assert ids(snap, "nodedev.io/nics") == ["eth1"]


def test_link_types_by_name_or_number(sysfs: Sysfs, proc_net: Path) -> None:
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


def test_numa_node_comes_from_the_parent_device(sysfs: Sysfs, proc_net: Path) -> None:
    sysfs.add("eth0", driver="ice", numa=1)
    sysfs.add("eth1", driver="ice", numa=-1)
    sysfs.add("eth2", driver="ice")
    sysfs.add("veth9")
    snap = driver([{"resourceName": "all"}], sysfs.root).scan()
    assert [(d.id, d.numa_nodes) for d in snap["nodedev.io/all"]] == [("eth0", (1,)), ("eth1", ()), ("eth2", ()), ("veth9", ())]


def test_no_class_net_directory_means_no_devices(tmp_path: Path, proc_net: Path) -> None:
    assert driver([{"resourceName": "all"}], tmp_path / "empty").scan() == {"nodedev.io/all": []}


def test_an_interface_vanishing_mid_scan_is_skipped(sysfs: Sysfs) -> None:
    assert read_interface(sysfs.net, "gone0") is None


# -- the node's own uplink ---------------------------------------------------------

ROUTE_HEADER = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"


def test_interfaces_carrying_a_default_route_and_their_lower_devices_are_never_offered(sysfs: Sysfs, proc_net: Path) -> None:
    (proc_net / "route").write_text(
        ROUTE_HEADER
        + "bond0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        + "eth9\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"  # not a default route
    )
    (proc_net / "ipv6_route").write_text(
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     ens7\n"
        "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth9\n"
    )
    for name in ("eth1", "eth2", "eth3", "eth9", "ens7"):
        sysfs.add(name)
    sysfs.add("bond0", lower=("eth1", "eth2"))
    snap = driver([{"resourceName": "all"}], sysfs.root).scan()
    assert ids(snap, "nodedev.io/all") == ["eth3", "eth9"]
    snap = driver([{"resourceName": "all"}], sysfs.root, excludeDefaultRoute=False).scan()
    assert ids(snap, "nodedev.io/all") == ["bond0", "ens7", "eth1", "eth2", "eth3", "eth9"]


# -- health ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "expected", "reason"),
    [
        ({"operstate": "up"}, Health.HEALTHY, "eth1: operstate up"),
        ({"operstate": "unknown"}, Health.HEALTHY, "eth1: operstate unknown"),  # tun, some virtual links
        ({"operstate": "down", "up": False}, Health.HEALTHY, "eth1: administratively down, carrier not checked"),
        ({"operstate": "down", "carrier": False}, Health.UNHEALTHY, "eth1: link is up but has no carrier (operstate down)"),
        ({"operstate": "notpresent"}, Health.UNHEALTHY, "eth1: operstate notpresent (hardware missing)"),
        ({"operstate": "lowerlayerdown", "carrier": False}, Health.UNHEALTHY, "eth1: operstate lowerlayerdown (its lower device or peer is down)"),
        ({"operstate": "dormant"}, Health.HEALTHY, "eth1: operstate dormant"),
    ],
)
def test_health_follows_what_a_pod_taking_the_link_would_get(
    sysfs: Sysfs, proc_net: Path, state: dict[str, Any], expected: Health, reason: str
) -> None:
    sysfs.add("eth1", **state)
    dev = device(driver([{"resourceName": "all"}], sysfs.root).scan(), "nodedev.io/all", "eth1")
    assert (dev.health, dev.reason) == (expected, reason)


# -- allocate, names, config -----------------------------------------------------------


def test_allocate_names_every_interface_in_one_env(sysfs: Sysfs, proc_net: Path) -> None:
    d = driver([{"resourceName": "fast-nic", "resourcePrefix": "example.com"}, {"resourceName": "ib_ports"}], sysfs.root)
    assert d.allocate("example.com/fast-nic", ["eth1", "eth2"]).envs == {"NETDEV_EXAMPLE_COM_FAST_NIC": "eth1,eth2"}
    assert d.allocate("nodedev.io/ib_ports", ["ib0"]).envs == {"NETDEV_NODEDEV_IO_IB_PORTS": "ib0"}
    assert env_name("a.b-c/d.e-f") == "NETDEV_A_B_C_D_E_F"


def test_declared_resources_use_the_default_prefix() -> None:
    opts = NetdevOptions.model_validate({"enabled": True, "resourceList": [{"resourceName": "a"}, {"resourceName": "b", "resourcePrefix": "x.io"}]})
    assert NetdevDriver.declared_resources(opts) == ["nodedev.io/a", "x.io/b"]


def test_udev_matches_narrow_to_the_configured_names(tmp_path: Path) -> None:
    named = driver([{"resourceName": "a", "selectors": {"ifNames": ["eth*", "ens1"]}}, {"resourceName": "b", "selectors": {"ifNames": ["eth*"]}}], tmp_path)
    assert list(named.udev_matches()) == [UdevMatch("net", "eth*"), UdevMatch("net", "ens1")]
    broad = driver([{"resourceName": "a", "selectors": {"ifNames": ["eth*"]}}, {"resourceName": "b", "selectors": {"drivers": ["ice"]}}], tmp_path)
    assert list(broad.udev_matches()) == [UdevMatch("net")]


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


def mine(netifs: NetIfs, snapshot: Any) -> dict[str, Device]:
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


def test_the_hosts_default_route_interface_is_not_offered() -> None:
    uplinks = [line.split()[0] for line in Path("/proc/net/route").read_text().splitlines()[1:] if line.split()[1] == "00000000"]
    if not uplinks:
        pytest.skip("this host has no IPv4 default route")
    snap = driver([{"resourceName": "all"}], Path("/sys")).scan()
    assert not set(uplinks) & set(ids(snap, "nodedev.io/all"))
