"""Config parsing: defaults, the kubelet's resource-name rules, and errors that name the key."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from nodedev import config
from nodedev.registration import Registrar
from nodedev.server import ResourceServer, socket_name


def test_an_empty_file_means_defaults_and_no_driver() -> None:
    cfg = config.parse("", Path("c.yaml"))

    assert cfg.plugin_dir == Path("/var/lib/kubelet/device-plugins")
    assert (cfg.sysfs_root, cfg.dev_root) == (Path("/sys"), Path("/dev"))
    assert (cfg.hotplug.source, cfg.hotplug.resync_seconds) == ("auto", 300.0)
    assert cfg.drivers == ()


def test_only_enabled_drivers_are_built() -> None:
    cfg = config.parse("drivers:\n  kvm: {enabled: true, shares: 2}\n  tun: {shares: 3}\n  vhost-net:\n", Path("c.yaml"))

    assert [(d.name, d.options.shares) for d in cfg.drivers] == [("kvm", 2)]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("nvidia.com/gpu", None),
        ("devices.kubevirt.io/vhost-net", None),
        ("nvidia.com/mig-1g.10gb", None),
        ("gpu", "must be <domain>/<name>"),
        ("kubernetes.io/gpu", "reserved kubernetes.io domain"),
        ("node.kubernetes.io/gpu", "reserved kubernetes.io domain"),
        ("requests.example.com/gpu", "must not start with 'requests.'"),
        ("Example.com/gpu", "is not a DNS subdomain"),
        ("example.com/-gpu", "is not a valid name"),
        ("example.com/g" + "x" * 63, "is not a valid name"),
        ("example.com/gpu/0", "is not a valid name"),
    ],
)
def test_resource_names_follow_the_kubelets_rules(name: str, problem: str | None) -> None:
    found = config.resource_name_problem(name)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_socket_names_are_path_safe_and_distinct() -> None:
    assert socket_name("devices.kubevirt.io/kvm") == "nodedev-devices.kubevirt.io_kvm.sock"
    assert socket_name("nvidia.com/mig-1g.10gb") == "nodedev-nvidia.com_mig-1g.10gb.sock"
    assert socket_name("a.io/x_y") != socket_name("a.io/x.y")


def test_registration_failures_are_logged_once_per_state_not_per_try(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Five failed tries against a missing kubelet give one log line, not five."""

    async def run() -> int:
        registrar = Registrar(tmp_path)
        tries = 0
        enough = asyncio.Event()
        attempt = registrar._attempt

        async def counting(server: ResourceServer) -> str | None:
            nonlocal tries
            tries += 1
            if tries == 5:
                enough.set()
            return await attempt(server)

        registrar._attempt = counting  # type: ignore[method-assign]
        server = ResourceServer.__new__(ResourceServer)
        server.resource = "example.com/x"
        registrar.register(server)
        await asyncio.wait_for(enough.wait(), timeout=10)
        await registrar.close()
        return tries

    with caplog.at_level(logging.INFO, logger="nodedev.registration"):
        tries = asyncio.run(run())

    assert tries >= 5
    lines = [r.getMessage() for r in caplog.records if "cannot register yet" in r.getMessage()]
    assert lines == [f"example.com/x: cannot register yet, will keep trying: {tmp_path}/kubelet.sock does not exist (is the kubelet running?)"]
