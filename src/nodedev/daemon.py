"""`nodedev serve`: the inventory's resources served to the kubelet, and kept served.

Serve first, then register; when the kubelet restarts (our sockets wiped, a new
kubelet.sock), serve again and re-register. Everything runs on one asyncio loop;
drivers' blocking work runs in threads through the inventory.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace

from nodedev import metrics
from nodedev.config import Config, ConfigError
from nodedev.driver import Device
from nodedev.inventory import Change, Inventory
from nodedev.registration import KUBELET_SOCKET, Registrar
from nodedev.restarts import PluginDirWatch
from nodedev.server import ResourceServer, ServeError

log = logging.getLogger("nodedev.daemon")

BACKSTOP_INTERVAL_S = 120.0
"""How often sockets and kubelet.sock are checked by hand, in case an inotify event was lost."""

EXIT_OK = 0
EXIT_NOTHING_TO_SERVE = 1


class Daemon:
    def __init__(self, config: Config, reload: Callable[[], Config] | None = None) -> None:
        """`reload` re-reads the config for SIGHUP (the CLI's loader, with any --simulate keys)."""
        self.config = config
        self._reload_config = reload
        self.inventory = Inventory(config)
        self.registrar = Registrar(config.plugin_dir)
        self.servers: dict[str, ResourceServer] = {}
        self._serving = False
        self._recovering = asyncio.Lock()
        self._stop = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        if self._reload_config is not None:
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._reload()))

        if self.config.metrics_address:
            metrics.serve(self.config.metrics_address)
            log.info("metrics on http://%s/metrics", self.config.metrics_address)
        self.inventory.add_listener(self._on_resource)
        await self.inventory.start()
        if not self.inventory.started:
            log.error("no driver is serving (%s); nothing to do", _why_none(self))
            await self.inventory.stop()
            return EXIT_NOTHING_TO_SERVE

        watch = PluginDirWatch(self.config.plugin_dir, self._on_plugin_dir_change)
        watch.start(loop)
        for server in self.servers.values():
            await self._start_server(server)
        self._serving = True
        log.info("serving %d resource(s) in %s", len(self.servers), self.config.plugin_dir)

        backstop = asyncio.create_task(self._backstop(watch))
        await self._stop.wait()

        backstop.cancel()
        watch.close()
        await self.registrar.close()
        await asyncio.gather(*(server.stop() for server in self.servers.values()))
        await self.inventory.stop()
        log.info("stopped")
        return EXIT_OK

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        """Runs work in the background, holding the task so it cannot be collected mid-way."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _request_stop(self, sig: signal.Signals) -> None:
        log.info("%s received, stopping", sig.name)
        self._stop.set()

    async def _reload(self) -> None:
        """SIGHUP: applies a changed driver set without a restart; a bad file changes nothing."""
        assert self._reload_config is not None
        try:
            new = await asyncio.to_thread(self._reload_config)
        except ConfigError as err:
            log.error("config reload refused, still running the previous config: %s", err)
            return
        for key in ("plugin_dir", "sysfs_root", "dev_root", "hotplug", "metrics_address"):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("config reload: %s changed; that takes effect at the next start", key)
        async with self._recovering:
            dropped = await self.inventory.reconfigure(replace(self.config, drivers=new.drivers))
            for resource in dropped:
                server = self.servers.pop(resource, None)
                if server is not None:
                    await server.stop()
                    log.info("%s: no longer served", resource)
        self.config = self.inventory.config
        log.info("config reloaded from %s", self.config.path)

    def _on_resource(self, resource: str, devices: Mapping[str, Device], changes: Sequence[Change]) -> None:
        server = self.servers.get(resource)
        if server is None:
            runner, _ = self.inventory.resources()[resource]
            assert runner.driver is not None
            server = self.servers[resource] = ResourceServer(resource, runner.driver, self.config.plugin_dir)
            server.update(devices)
            if self._serving:  # a resource that appeared after start, e.g. a new MIG profile
                self._spawn(self._serve_new(server))
            return
        server.update(devices)

    async def _serve_new(self, server: ResourceServer) -> None:
        async with self._recovering:
            await self._start_server(server)

    async def _start_server(self, server: ResourceServer) -> None:
        """Serves and registers one resource; one that cannot be served leaves the others be."""
        try:
            await server.start()
        except ServeError as err:
            log.error("%s", err)
            return
        self.registrar.register(server)

    def _on_plugin_dir_change(self, names: set[str]) -> None:
        ours = {server.endpoint for server in self.servers.values()}
        if names and not names & (ours | {KUBELET_SOCKET}):
            return
        self._spawn(self._recover(check_kubelet=not names or KUBELET_SOCKET in names))

    async def _recover(self, *, check_kubelet: bool) -> None:
        """Serves again every resource whose socket is gone, then re-registers what needs it."""
        async with self._recovering:
            if self._stop.is_set():
                return
            lost = [s for s in self.servers.values() if s.serving and not s.socket_present()]
            if lost:
                log.info("socket(s) of %d resource(s) removed (kubelet restart?); serving again", len(lost))
            for server in lost:
                await server.stop()
                await self._start_server(server)
            if check_kubelet:
                self.registrar.kubelet_appeared(self.servers.values())

    async def _backstop(self, watch: PluginDirWatch) -> None:
        while True:
            await asyncio.sleep(BACKSTOP_INTERVAL_S)
            watch.check()


def _why_none(daemon: Daemon) -> str:
    if not daemon.config.drivers:
        return f"no driver is enabled in {daemon.config.path}"
    return "; ".join(f"{r.name}: {r.error}" for r in daemon.inventory.runners.values())
