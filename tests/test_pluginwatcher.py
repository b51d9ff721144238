"""pluginWatcher registration end to end: the real `nodedev serve` against the kubelet double's
plugin watcher. The sockets sit in plugins_registry, answer GetInfo, are registered without a
Register call, survive kubelet restarts, and a refused registration is retried on a new socket."""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nodedev import config as config_module
from nodedev.api import deviceplugin_pb2 as pb
from nodedev.api import pluginregistration_pb2 as pr
from nodedev.api import pluginregistration_pb2_grpc as pr_grpc
from tests.devtree import dev_tree
from tests.kubelet import KubeletDouble
from tests.test_daemon import BOTH, TUN, VHOST, one_error_line, run_to_exit, two_drivers

TUN_SOCKET = "nodedev-devices.kubevirt.io_tun.sock"
VHOST_SOCKET = "nodedev-devices.kubevirt.io_vhost-net.sock"


@pytest.fixture
def node() -> Iterator[Path]:
    """A node's /var/lib/kubelet in small: device-plugins and plugins_registry side by side."""
    path = Path(tempfile.mkdtemp(prefix="nd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def plugin_dir(node: Path) -> Path:
    path = node / "device-plugins"
    path.mkdir()
    return path


@pytest.fixture
def registry(node: Path) -> Path:
    return node / "plugins_registry"


@pytest.fixture
def kubelet(plugin_dir: Path, registry: Path) -> Iterator[KubeletDouble]:
    """A kubelet with its plugin watcher on (it makes plugins_registry, as the kubelet does)."""
    double = KubeletDouble(plugin_dir, registry=registry)
    double.start()
    yield double
    double.stop()


def tun_only(dev: Path) -> dict[str, object]:
    return {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 2}}}


def inode(path: Path) -> int:
    return path.stat().st_ino


@pytest.mark.parametrize("mode", ["auto", "pluginWatcher"])
def test_sockets_in_plugins_registry_answer_getinfo_and_are_registered_without_register(
    mode: str, node: Path, plugin_dir: Path, nodedev, tmp_path: Path
) -> None:
    # auto finds plugins_registry beside pluginDir; pluginWatcher with pluginsRegistry elsewhere
    # must use that one although nothing is beside pluginDir (auto would choose Register there).
    registry = node / ("plugins_registry" if mode == "auto" else "elsewhere")
    kubelet = KubeletDouble(plugin_dir, registry=registry)
    kubelet.start()
    try:
        extra = {} if mode == "auto" else {"registration": "pluginWatcher", "pluginsRegistry": str(registry)}
        process = nodedev({**two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net")), **extra})
        kubelet.wait(lambda: kubelet.streaming() == BOTH, what="both streaming")
        kubelet.wait(lambda: len(kubelet.plugin_log) == 2, what="both told by the plugin watcher")

        assert kubelet.register_log == [] and kubelet.registrations == []  # no Register on kubelet.sock
        assert {(r.name, r.socket, r.registered, r.error) for r in kubelet.plugin_log} == {
            (TUN, TUN_SOCKET, True, ""),
            (VHOST, VHOST_SOCKET, True, ""),
        }
        assert sorted(p.name for p in registry.iterdir()) == [TUN_SOCKET, VHOST_SOCKET]
        assert not list(plugin_dir.glob("nodedev-*.sock"))
        assert f"sockets in {registry}" in process.wait_log("registration: the kubelet's plugin watcher")
        process.wait_log(f"{TUN}: registered by the kubelet's plugin watcher (endpoint {registry / TUN_SOCKET})")

        with grpc.insecure_channel(f"unix://{registry / TUN_SOCKET}") as channel:
            info = pr_grpc.RegistrationStub(channel).GetInfo(pr.InfoRequest(), timeout=5)
        assert (info.type, info.name, info.endpoint, list(info.supported_versions)) == (
            "DevicePlugin",
            TUN,
            str(registry / TUN_SOCKET),
            ["v1beta1"],
        )
        answer = kubelet.stub(TUN).Allocate(pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["tun0"])]), timeout=5)
        assert [d.container_path for d in answer.container_responses[0].devices] == ["/dev/net/tun"]

        assert process.stop() == 0
        assert list(registry.iterdir()) == []  # sockets removed at stop
    finally:
        kubelet.stop()


@pytest.mark.parametrize("setting", [None, "kubelet"])
def test_register_on_kubelet_sock_without_plugins_registry_or_when_forced(
    setting: str | None, plugin_dir: Path, registry: Path, nodedev, tmp_path: Path
) -> None:
    # auto without plugins_registry: Register; `kubelet` forces Register although a watcher runs.
    kubelet = KubeletDouble(plugin_dir, registry=registry if setting else None)
    kubelet.start()
    try:
        extra = {"registration": setting} if setting else {}
        process = nodedev({**two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net")), **extra})
        kubelet.wait(lambda: kubelet.streaming() == BOTH, what="both registered")

        assert sorted(r.resource for r in kubelet.register_log if r.accepted) == sorted(BOTH)
        assert kubelet.plugin_log == []
        assert sorted(p.name for p in plugin_dir.glob("nodedev-*.sock")) == [TUN_SOCKET, VHOST_SOCKET]
        assert registry.exists() == bool(setting)  # auto never makes plugins_registry
        assert not registry.exists() or list(registry.iterdir()) == []
        process.wait_log(f"registration: Register on {plugin_dir / 'kubelet.sock'}")
    finally:
        kubelet.stop()


def test_kubelet_restarts_rediscover_the_same_sockets_once_each(kubelet: KubeletDouble, nodedev, tmp_path: Path, registry: Path) -> None:
    process = nodedev(two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net")))
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="first registration")
    sockets = {name: inode(registry / name) for name in (TUN_SOCKET, VHOST_SOCKET)}

    spacings = itertools.cycle([0.0, 0.002, 0.02, 0.05, 0.2, 0.01])
    for _ in range(30):
        kubelet.restart()  # wipes device-plugins (kubelet.sock), spares plugins_registry
        time.sleep(next(spacings))  # the schedule under test, not a synchronisation
    final = kubelet.restarts
    kubelet.wait(
        lambda: {r.name for r in kubelet.plugin_log if r.incarnation == final and r.registered} == BOTH,
        timeout=10,
        what="both registered by the last kubelet's watcher",
    )
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="both streaming")

    assert kubelet.register_log == []
    accepted = [(r.name, r.incarnation) for r in kubelet.plugin_log if r.registered]
    assert len(accepted) == len(set(accepted)), "a socket registered twice with one kubelet"
    assert [r for r in kubelet.plugin_log if not r.registered] == []
    assert {name: inode(registry / name) for name in sockets} == sockets  # never served anew
    process.wait_log("a new kubelet.sock: the kubelet restarted")


def test_a_kubelet_that_starts_after_nodedev_finds_the_sockets(
    plugin_dir: Path, registry: Path, nodedev, tmp_path: Path
) -> None:
    registry.mkdir()  # the kubelet made it on an earlier boot; it is not running now
    process = nodedev(two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net")))
    process.wait_log("serving 2 resource(s)")
    kubelet = KubeletDouble(plugin_dir, registry=registry)
    kubelet.start()
    try:
        kubelet.wait(lambda: kubelet.streaming() == BOTH, what="both found at the kubelet's start")
        assert kubelet.register_log == []
    finally:
        kubelet.stop()


def test_a_refusal_is_logged_with_the_reason_and_retried_on_a_new_socket_with_backoff(
    kubelet: KubeletDouble, nodedev, tmp_path: Path, registry: Path
) -> None:
    kubelet.refuse = ["device manager busy", "device manager busy", "checkpoint unreadable"]
    process = nodedev(tun_only(dev_tree(tmp_path / "dev", "net/tun")))

    kubelet.wait(lambda: kubelet.registration_count(TUN) == 1, timeout=10, what="tun registered after three refusals")

    assert [(r.registered, r.error.rpartition(": ")[2]) for r in kubelet.plugins(TUN)] == [
        (False, "device manager busy"),
        (False, "device manager busy"),
        (False, "checkpoint unreadable"),
        (True, ""),
    ]  # the double tries a socket once: each retry was a new socket
    refused = [line for line in process.logs().splitlines() if "refused the registration" in line]
    assert [line.split(" anew in ")[1] for line in refused] == ["0.05 s", "0.10 s", "0.20 s"]
    warnings = [line for line in refused if "WARNING" in line]  # logged once per change of reason
    assert len(warnings) == 2
    assert "RegisterPlugin error -- plugin registration failed with err: device manager busy" in warnings[0]
    assert f"serving {registry / TUN_SOCKET} anew" in warnings[0]
    assert kubelet.register_log == []


def test_a_socket_removed_from_plugins_registry_is_served_again_and_found(kubelet: KubeletDouble, nodedev, tmp_path: Path, registry: Path) -> None:
    nodedev(two_drivers(dev_tree(tmp_path / "dev", "net/tun", "vhost-net")))
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="both registered")

    (registry / TUN_SOCKET).unlink()

    kubelet.wait(lambda: kubelet.registration_count(TUN) == 2, what="tun registered again")
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="both streaming")
    assert kubelet.registration_count(VHOST) == 1


def test_a_reload_that_restarts_a_driver_serves_its_socket_anew_for_the_watcher(
    kubelet: KubeletDouble, nodedev, write_config, tmp_path: Path, registry: Path
) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun", "vhost-net")
    nodedev(two_drivers(dev))
    kubelet.wait(lambda: kubelet.streaming() == BOTH, what="both registered")
    before = inode(registry / VHOST_SOCKET)

    changed = two_drivers(dev)
    changed["drivers"]["tun"]["shares"] = 3  # type: ignore[index]
    write_config(changed)  # the daemon follows its file

    kubelet.wait(lambda: kubelet.registration_count(TUN) == 2, what="tun registered again after the reload")
    kubelet.wait(lambda: kubelet.devices(TUN) is not None and len(kubelet.devices(TUN) or {}) == 3, what="three tun shares")
    assert kubelet.registration_count(VHOST) == 1
    assert inode(registry / VHOST_SOCKET) == before
    assert kubelet.register_log == []


def test_registration_keys_are_validated_with_one_line_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    cases = {
        "registration: watcher": "registration: Input should be 'auto', 'kubelet' or 'pluginWatcher' (got 'watcher')",
        "pluginsRegistry: relative/dir": "pluginsRegistry: must be an absolute path (starting with /), got 'relative/dir'",
        f"pluginsRegistry: /{'r' * 60}": "pluginsRegistry: is 61 bytes long; at most 58",
    }
    for text, problem in cases.items():
        with pytest.raises(config_module.ConfigError) as raised:
            config_module.parse(text, path)
        assert "\n" not in str(raised.value)
        assert str(raised.value).startswith(f"{path}: {problem}")
    parsed = config_module.parse("registration: pluginWatcher\npluginsRegistry: /var/lib/kubelet/plugins_registry\n", path)
    assert (parsed.registration, parsed.plugins_registry) == ("pluginWatcher", Path("/var/lib/kubelet/plugins_registry"))
    assert (config_module.parse("", path).registration, config_module.parse("", path).plugins_registry) == ("auto", None)


def test_a_plugins_registry_that_cannot_be_made_is_one_line_and_exit_1(tmp_path: Path, write_config, plugin_dir: Path) -> None:
    blocker = plugin_dir.parent / "not-a-dir"
    blocker.write_text("")
    config = {**tun_only(dev_tree(tmp_path / "dev", "net/tun")), "registration": "pluginWatcher", "pluginsRegistry": str(blocker / "reg")}

    result = run_to_exit(write_config(config))

    assert result.returncode == 1
    assert f"pluginsRegistry {blocker / 'reg'}: cannot create it" in one_error_line(result)
