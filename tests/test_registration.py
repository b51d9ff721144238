"""The registrar against the kubelet double: backoff, Register only while serving, never twice."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nodedev import registration
from nodedev.driver import DriverOptions, HostContext
from nodedev.registration import Registrar, WatcherRegistrar
from nodedev.server import ResourceServer
from tests.kubelet import KubeletDouble
from tests.test_server import RESOURCE, Stand, device


def resource_server(plugin_dir: Path) -> ResourceServer:
    host = HostContext(Path("/sys"), Path("/dev"), Path("/proc"), lambda: None, logging.getLogger("test"))
    server = ResourceServer(RESOURCE, Stand(DriverOptions(), host), plugin_dir)
    server.update({"d0": device(0)})
    return server


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Polls on the loop (the registrar runs here too); every wait ends."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("not reached in time")
        await asyncio.sleep(0.005)


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(body())  # type: ignore[arg-type]


def test_retries_back_off_from_50_ms_doubling_to_the_cap_and_log_once_per_state(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(registration, "BACKOFF_MAX_S", 0.4)
    caplog.set_level(logging.INFO, logger="nodedev.registration")

    async def body() -> list[float]:
        server = resource_server(plugin_dir)
        await server.start()
        registrar = Registrar(plugin_dir)  # no kubelet.sock: every attempt fails
        registrar.register(server)
        await until(lambda: len(registrar.backoff(RESOURCE)) >= 6)
        delays = registrar.backoff(RESOURCE)
        await registrar.close()
        await server.stop()
        return delays

    assert run(body)[:6] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    lines = [r.getMessage() for r in caplog.records if "cannot register yet" in r.getMessage()]
    assert lines == [f"{RESOURCE}: cannot register yet, will keep trying: {plugin_dir}/kubelet.sock does not exist (is the kubelet running?)"]


def test_nothing_is_registered_while_the_socket_is_not_serving(plugin_dir: Path, kubelet: KubeletDouble) -> None:
    async def body() -> tuple[int, int]:
        server = resource_server(plugin_dir)
        registrar = Registrar(plugin_dir)
        registrar.register(server)  # not started: must wait, not Register a dead endpoint
        await asyncio.sleep(0.2)  # an adversary's window: a Register here would be a bug
        before = len(kubelet.register_log)
        await server.start()
        registrar.register(server)
        await until(lambda: registrar.registered(RESOURCE))
        registrar.kubelet_appeared([server])  # the same kubelet: nothing to do
        registrar.register(server)
        await asyncio.sleep(0.2)
        after = len(kubelet.register_log)
        await registrar.close()
        await server.stop()
        return before, after

    before, after = run(body)
    assert (before, after) == (0, 1)
    assert all(r.socket_existed and r.accepted for r in kubelet.register_log)


def test_a_new_kubelet_gets_one_register_and_a_served_again_socket_gets_one(plugin_dir: Path, kubelet: KubeletDouble) -> None:
    async def body() -> None:
        server = resource_server(plugin_dir)
        await server.start()
        registrar = Registrar(plugin_dir)
        registrar.register(server)
        await until(lambda: len(kubelet.register_log) == 1)
        await asyncio.to_thread(kubelet.restart, wipe=False)  # a new kubelet.sock, our socket left alone
        registrar.kubelet_appeared([server])
        registrar.kubelet_appeared([server])
        await until(lambda: len(kubelet.register_log) == 2)
        await server.stop()
        await server.start()  # served again: the kubelet must hear of this incarnation
        registrar.register(server)
        registrar.register(server)
        await until(lambda: len(kubelet.register_log) == 3)
        await asyncio.sleep(0.2)
        await registrar.close()
        await server.stop()

    run(body)
    assert [(r.incarnation, r.accepted) for r in kubelet.register_log] == [(0, True), (1, True), (1, True)]


def test_watcher_mode_counts_as_registered_only_while_the_current_kubelet_said_yes(plugin_dir: Path) -> None:
    registry = plugin_dir / "plugins_registry"
    registry.mkdir()  # the kubelet made it on an earlier start; nodedev serves before this one starts
    kubelet = KubeletDouble(plugin_dir, registry=registry)
    recreated: list[int] = []

    async def body() -> list[float]:
        server = resource_server(registry)

        async def recreate(served: ResourceServer) -> None:
            recreated.append(served.generation)
            await served.stop()
            await served.start()

        registrar = WatcherRegistrar(plugin_dir, registry, recreate)
        registrar.adopt(server)
        await server.start()
        registrar.register(server)
        assert not registrar.registered(RESOURCE)  # served, but no kubelet has said yes
        await asyncio.to_thread(kubelet.start)
        await until(lambda: registrar.registered(RESOURCE))
        kubelet.refuse.append("device manager busy")
        await asyncio.to_thread(kubelet.restart)
        assert not registrar.registered(RESOURCE)  # a new kubelet.sock: the old yes no longer counts
        await until(lambda: bool(recreated) and registrar.registered(RESOURCE))
        delays = [*registrar.backoff(RESOURCE)]
        await registrar.close()
        await server.stop()
        return delays

    try:
        assert run(body) == []  # cleared by the success
    finally:
        kubelet.stop()
    assert recreated == [1]  # the refused socket, served anew once
    assert [(r.incarnation, r.registered) for r in kubelet.plugins(RESOURCE)] == [(0, True), (1, False), (1, True)]
    assert kubelet.register_log == []
