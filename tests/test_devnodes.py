"""The KubeVirt-compatible kvm, tun and vhost-net drivers, against fixture /dev trees
with real character device nodes (made with mknod: the tests run as root) and the real /dev."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from nodedev import config
from nodedev.driver import ContainerEdits, DeviceNode, Health, HostContext, UdevMatch
from nodedev.drivers import devnodes, load
from nodedev.drivers.devnodes import DevNodeOptions, KvmDriver, TunDriver, VhostNetDriver

KVM_DEV = os.makedev(10, 232)
TUN_DEV = os.makedev(10, 200)
VHOST_NET_DEV = os.makedev(10, 238)
NULL_DEV = os.makedev(1, 3)  # a character device that answers no KVM ioctl

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a character device needs root")


def host(dev_root: Path) -> HostContext:
    return HostContext(
        sysfs_root=dev_root.parent / "sys",
        dev_root=dev_root,
        proc_root=dev_root.parent / "proc",
        rescan=lambda: None,
        log=logging.getLogger("test.devnodes"),
    )


def make(cls: type[devnodes.DevNodeDriver], dev_root: Path, **options: object) -> devnodes.DevNodeDriver:
    return cls(DevNodeOptions(enabled=True, **options), host(dev_root))


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def chardev(path: Path, device: int) -> Path:
    """A real character device node, as the kernel's devtmpfs would have it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, device)
    return path


def states(driver: devnodes.DevNodeDriver) -> set[tuple[Health, str]]:
    return {(d.health, d.reason) for d in driver.scan()[driver.resource()]}


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
def test_default_is_1000_kubevirt_style_ids(cls: type[devnodes.DevNodeDriver], resource: str, prefix: str, dev: Path) -> None:
    driver = make(cls, dev)
    assert cls.declared_resources(driver.options) == [resource]
    snapshot = driver.scan()
    assert list(snapshot) == [resource]
    ids = [d.id for d in snapshot[resource]]
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert ids[0] == f"{prefix}0" and ids[-1] == f"{prefix}999"


# -- the real /dev -------------------------------------------------------------------


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")
def test_real_kvm_is_healthy_with_api_in_reason() -> None:
    driver = make(KvmDriver, Path("/dev"), shares=3)
    devices = driver.scan()["devices.kubevirt.io/kvm"]
    assert [d.id for d in devices] == ["kvm0", "kvm1", "kvm2"]
    assert all(d.health is Health.HEALTHY for d in devices)
    assert devices[0].reason == "/dev/kvm present, KVM API 12"


@pytest.mark.skipif(not Path("/dev/net/tun").is_char_device(), reason="no /dev/net/tun")
def test_real_tun_is_healthy() -> None:
    assert states(make(TunDriver, Path("/dev"), shares=2)) == {(Health.HEALTHY, "/dev/net/tun present")}


# -- health: the node is what it claims to be ------------------------------------------


@needs_root
def test_a_character_device_that_is_not_kvm_is_unhealthy_with_errno(dev: Path) -> None:
    node = chardev(dev / "kvm", NULL_DEV)
    assert states(make(KvmDriver, dev, shares=2)) == {
        (Health.UNHEALTHY, f"KVM_GET_API_VERSION on {node} failed: [Errno 25] Inappropriate ioctl for device")
    }


@needs_root
def test_a_fixture_kvm_node_answers_like_the_real_one(dev: Path) -> None:
    chardev(dev / "kvm", KVM_DEV)  # the same major:minor as /dev/kvm: the same kernel device
    assert states(make(KvmDriver, dev, shares=1)) == {(Health.HEALTHY, f"{dev}/kvm present, KVM API 12")}


def test_missing_kvm_is_unhealthy_and_says_so(dev: Path) -> None:
    devices = make(KvmDriver, dev, shares=2).scan()["devices.kubevirt.io/kvm"]
    assert [(d.health, d.reason) for d in devices] == [(Health.UNHEALTHY, f"{dev}/kvm is missing")] * 2


@needs_root
def test_tun_follows_its_node_going_and_coming_back(dev: Path) -> None:
    node = chardev(dev / "net" / "tun", TUN_DEV)
    driver = make(TunDriver, dev, shares=4)
    assert states(driver) == {(Health.HEALTHY, f"{node} present")}
    node.unlink()
    assert states(driver) == {(Health.UNHEALTHY, f"{node} is missing")}
    chardev(node, TUN_DEV)
    assert states(driver) == {(Health.HEALTHY, f"{node} present")}


@needs_root
def test_vhost_net_in_fixture_tree(dev: Path) -> None:
    driver = make(VhostNetDriver, dev, shares=1)
    assert driver.scan()["devices.kubevirt.io/vhost-net"][0].health is Health.UNHEALTHY
    chardev(dev / "vhost-net", VHOST_NET_DEV)
    [device] = driver.scan()["devices.kubevirt.io/vhost-net"]
    assert (device.id, device.health, device.reason) == ("vhost-net0", Health.HEALTHY, f"{dev}/vhost-net present")


def _regular_file(path: Path) -> None:
    path.write_text("not a device\n")


def _directory(path: Path) -> None:
    path.mkdir()


def _socket(path: Path) -> None:
    os.mknod(path, stat.S_IFSOCK | 0o600)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _block_device(path: Path) -> None:
    os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(7, 0))


@needs_root
@pytest.mark.parametrize(
    ("make_node", "found"),
    [
        (_regular_file, "a regular file"),
        (_directory, "a directory"),
        (_socket, "a socket"),
        (_fifo, "a named pipe"),
        (_block_device, "a block device"),
    ],
)
@pytest.mark.parametrize("cls", [KvmDriver, TunDriver, VhostNetDriver])
def test_a_node_that_is_not_a_character_device_is_unhealthy(
    dev: Path, cls: type[devnodes.DevNodeDriver], make_node: Callable[[Path], None], found: str
) -> None:
    driver = make(cls, dev, shares=3)
    driver.host_path.parent.mkdir(parents=True, exist_ok=True)
    make_node(driver.host_path)
    assert states(driver) == {(Health.UNHEALTHY, f"{driver.host_path} is {found}, not a character device")}


def test_a_symlink_out_of_the_dev_root_is_unhealthy_and_names_its_target(dev: Path, tmp_path: Path) -> None:
    outside = tmp_path / "etc" / "hostname"
    touch(outside)
    (dev / "net").mkdir()
    (dev / "net" / "tun").symlink_to(outside)
    assert states(make(TunDriver, dev, shares=2)) == {
        (Health.UNHEALTHY, f"{dev}/net/tun is a symlink to {outside}, outside {dev}")
    }


def test_a_symlink_to_the_hosts_etc_hostname_is_unhealthy(dev: Path) -> None:
    (dev / "vhost-net").symlink_to("/etc/hostname")
    [(health, reason)] = states(make(VhostNetDriver, dev, shares=1))
    assert health is Health.UNHEALTHY
    assert reason == f"{dev}/vhost-net is a symlink to {os.path.realpath('/etc/hostname')}, outside {dev}"


@needs_root
def test_a_symlinked_directory_leaving_the_dev_root_is_unhealthy(dev: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    chardev(elsewhere / "tun", TUN_DEV)  # a real tun node, but not under the dev root
    (dev / "net").symlink_to(elsewhere)
    assert states(make(TunDriver, dev, shares=1)) == {
        (Health.UNHEALTHY, f"{dev}/net/tun resolves to {elsewhere}/tun, outside {dev}")
    }


@needs_root
def test_a_symlink_within_the_dev_root_to_a_character_device_is_healthy(dev: Path) -> None:
    chardev(dev / "misc" / "vhost-net", VHOST_NET_DEV)
    (dev / "vhost-net").symlink_to("misc/vhost-net")
    assert states(make(VhostNetDriver, dev, shares=1)) == {(Health.HEALTHY, f"{dev}/vhost-net present")}


def test_a_dangling_symlink_within_the_dev_root_says_what_is_missing(dev: Path) -> None:
    (dev / "kvm").symlink_to("misc/kvm")
    assert states(make(KvmDriver, dev, shares=1)) == {(Health.UNHEALTHY, f"{dev}/kvm is a symlink to misc/kvm, which is missing")}


# -- what a container gets -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "host_node", "container_node"),
    [
        (KvmDriver, "kvm", "/dev/kvm"),
        (TunDriver, "net/tun", "/dev/net/tun"),
        (VhostNetDriver, "vhost-net", "/dev/vhost-net"),
    ],
)
def test_every_id_carries_the_node_and_a_request_gets_it_once(
    cls: type[devnodes.DevNodeDriver], host_node: str, container_node: str, dev: Path
) -> None:
    driver = make(cls, dev, shares=10)
    resource = cls.declared_resources(driver.options)[0]
    devices = driver.scan()[resource]
    node = DeviceNode(str(dev / host_node), container_node, "rw")
    assert all(d.edits == ContainerEdits(devices=(node,)) for d in devices)
    requested = [devices[i] for i in (0, 3, 7)]
    merged = ContainerEdits.merge((d.edits for d in requested), driver.allocate(resource, requested))
    assert merged == ContainerEdits(devices=(node,))


@pytest.mark.parametrize("cls", [KvmDriver, TunDriver, VhostNetDriver])
def test_the_host_builds_the_response_from_the_edits_alone(cls: type[devnodes.DevNodeDriver]) -> None:
    """No allocate() of their own: the per-device edits are the whole answer."""
    assert not cls.implements("allocate")


def test_events_and_watched_directories(dev: Path) -> None:
    add_remove = frozenset({"add", "remove"})
    assert make(KvmDriver, dev).udev_matches() == (UdevMatch("misc", "kvm", actions=add_remove),)
    assert make(TunDriver, dev).udev_matches() == (UdevMatch("misc", "tun", actions=add_remove),)
    assert make(VhostNetDriver, dev).udev_matches() == (UdevMatch("misc", "vhost-net", actions=add_remove),)
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
