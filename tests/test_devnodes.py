"""The KubeVirt-compatible kvm, tun and vhost-net drivers, against fixture /dev trees."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from nodedev import config
from nodedev.driver import DeviceNode, Health, HostContext, UdevMatch
from nodedev.drivers import devnodes, load
from nodedev.drivers.devnodes import DevNodeOptions, KvmDriver, TunDriver, VhostNetDriver


def host(dev_root: Path) -> HostContext:
    return HostContext(
        sysfs_root=dev_root.parent / "sys",
        dev_root=dev_root,
        rescan=lambda: None,
        log=logging.getLogger("test.devnodes"),
    )


def make(cls: type[devnodes.DevNodeDriver], dev_root: Path, **options: object) -> devnodes.DevNodeDriver:
    return cls(DevNodeOptions(enabled=True, **options), host(dev_root))


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    root = tmp_path / "dev"
    root.mkdir()
    return root


def test_registry_names_resolve_to_these_drivers() -> None:
    assert load("kvm") is KvmDriver
    assert load("tun") is TunDriver
    assert load("vhost-net") is VhostNetDriver


@pytest.mark.parametrize(
    ("cls", "resource", "prefix"),
    [
        (KvmDriver, "devices.kubevirt.io/kvm", "kvm"),
        (TunDriver, "devices.kubevirt.io/tun", "tun"),
        (VhostNetDriver, "devices.kubevirt.io/vhost-net", "vhost-net"),
    ],
)
def test_default_is_1000_kubevirt_style_ids(cls, resource: str, prefix: str, dev: Path) -> None:
    driver = make(cls, dev)
    assert cls.declared_resources(driver.options) == [resource]
    snapshot = driver.scan()
    assert list(snapshot) == [resource]
    ids = [d.id for d in snapshot[resource]]
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert ids[0] == f"{prefix}0" and ids[-1] == f"{prefix}999"


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")
def test_real_kvm_is_healthy_with_api_in_reason() -> None:
    driver = make(KvmDriver, Path("/dev"), shares=3)
    devices = driver.scan()["devices.kubevirt.io/kvm"]
    assert [d.id for d in devices] == ["kvm0", "kvm1", "kvm2"]
    assert all(d.health is Health.HEALTHY for d in devices)
    assert devices[0].reason == "/dev/kvm present, KVM API 12"


def test_kvm_that_is_not_a_kvm_node_is_unhealthy_with_errno(dev: Path) -> None:
    node = touch(dev / "kvm")
    devices = make(KvmDriver, dev, shares=2).scan()["devices.kubevirt.io/kvm"]
    assert {d.health for d in devices} == {Health.UNHEALTHY}
    assert devices[0].reason == (
        f"KVM_GET_API_VERSION on {node} failed: [Errno 25] Inappropriate ioctl for device"
    )


def test_missing_kvm_is_unhealthy_and_says_so(dev: Path) -> None:
    devices = make(KvmDriver, dev, shares=2).scan()["devices.kubevirt.io/kvm"]
    assert [(d.health, d.reason) for d in devices] == [(Health.UNHEALTHY, f"{dev}/kvm is missing")] * 2


def test_tun_follows_its_node_going_and_coming_back(dev: Path) -> None:
    node = touch(dev / "net" / "tun")
    driver = make(TunDriver, dev, shares=4)

    def states() -> set[tuple[Health, str]]:
        return {(d.health, d.reason) for d in driver.scan()["devices.kubevirt.io/tun"]}

    assert states() == {(Health.HEALTHY, f"{node} present")}
    node.unlink()
    assert states() == {(Health.UNHEALTHY, f"{node} is missing")}
    touch(node)
    assert states() == {(Health.HEALTHY, f"{node} present")}


def test_vhost_net_in_fixture_tree(dev: Path) -> None:
    driver = make(VhostNetDriver, dev, shares=1)
    assert driver.scan()["devices.kubevirt.io/vhost-net"][0].health is Health.UNHEALTHY
    touch(dev / "vhost-net")
    [device] = driver.scan()["devices.kubevirt.io/vhost-net"]
    assert (device.id, device.health, device.reason) == ("vhost-net0", Health.HEALTHY, f"{dev}/vhost-net present")


@pytest.mark.parametrize(
    ("cls", "host_node", "container_node"),
    [
        (KvmDriver, "kvm", "/dev/kvm"),
        (TunDriver, "net/tun", "/dev/net/tun"),
        (VhostNetDriver, "vhost-net", "/dev/vhost-net"),
    ],
)
def test_allocate_gives_the_node_once_however_many_ids(cls, host_node: str, container_node: str, dev: Path) -> None:
    driver = make(cls, dev, shares=10)
    resource = cls.declared_resources(driver.options)[0]
    ids = [f"{cls.name}{i}" for i in (0, 3, 7)]
    allocation = driver.allocate(resource, ids)
    assert allocation.devices == [DeviceNode(str(dev / host_node), container_node, "rw")]
    assert allocation.mounts == [] and allocation.envs == {}


def test_events_and_watched_directories(dev: Path) -> None:
    assert make(KvmDriver, dev).udev_matches() == (UdevMatch("misc", "kvm"),)
    assert make(TunDriver, dev).udev_matches() == (UdevMatch("misc", "tun"),)
    assert make(VhostNetDriver, dev).udev_matches() == (UdevMatch("misc", "vhost-net"),)
    assert list(make(KvmDriver, dev).watch_paths()) == [dev]
    assert list(make(TunDriver, dev).watch_paths()) == [dev / "net"]
    assert list(make(VhostNetDriver, dev).watch_paths()) == [dev]


@pytest.mark.parametrize("shares", [0, -1, "10", 1.5, 100_001])
def test_bad_shares_are_rejected(shares: object) -> None:
    with pytest.raises(ValidationError):
        DevNodeOptions.model_validate({"enabled": True, "shares": shares})


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(ValidationError):
        DevNodeOptions.model_validate({"enabled": True, "maxDevices": 10})


def test_config_file_section_reaches_the_driver(tmp_path: Path) -> None:
    text = """
devRoot: /dev
drivers:
  kvm: {enabled: true, shares: 110}
  tun: {enabled: true}
  vhost-net: {enabled: false}
"""
    cfg = config.parse(text, tmp_path / "config.yaml")
    assert [(d.name, d.cls, d.options.shares) for d in cfg.drivers] == [("kvm", KvmDriver, 110), ("tun", TunDriver, 1000)]


def test_quoted_shares_in_config_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"drivers\.kvm\.shares"):
        config.parse('drivers:\n  kvm: {enabled: true, shares: "10"}\n', tmp_path / "config.yaml")
