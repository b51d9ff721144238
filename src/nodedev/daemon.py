"""`nodedev serve`: the inventory's resources served to the kubelet, and kept served.

The daemon's life has explicit phases. Prepare: take the plugin directory (one
daemon per directory), the HTTP ports (metrics, probes) and the status socket;
any failure is one line and exit 1. Start: drivers start and scan, each resource
is served, then registered; systemd hears READY=1 once every served resource is
registered. Run: kubelet restarts (our sockets wiped, a new kubelet.sock) are
served again and re-registered (in pluginWatcher mode the sockets live in
plugins_registry, which a restart spares, and the kubelet finds them itself);
SIGHUP, or a change of the config file (a ConfigMap update included), reloads
the config. Stop: always runs, ends the streams, removes the sockets, and is
bounded in time whatever is in flight.

Everything runs on one asyncio loop; drivers' blocking work runs in threads
through the inventory.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from nodedev import labels, metrics, probes, report, status
from nodedev.config import Config, ConfigError
from nodedev.configwatch import ConfigFollower
from nodedev.driver import Device
from nodedev.hotplug import Changes, PathWatcher
from nodedev.inventory import Change, Inventory
from nodedev.plugindir import PluginDirError, PluginDirLock
from nodedev.registration import KUBELET_SOCKET, PLUGINS_REGISTRY, Registrar, WatcherRegistrar, choose_mode
from nodedev.sdnotify import Notifier
from nodedev.server import ResourceServer, ServeError

log = logging.getLogger("nodedev.daemon")

BACKSTOP_INTERVAL_S = 120.0
"""How often sockets and kubelet.sock are checked by hand, in case an inotify event was lost."""
STOP_TIMEOUT_S = 1.5
"""The most the stop phase may take; SIGTERM must end the process within 2 s."""
READY_POLL_S = 0.02
"""How often, until systemd has been told READY=1, registration is checked (it reports no event)."""

_START_ONLY = {
    "plugin_dir": "pluginDir",
    "sysfs_root": "sysfsRoot",
    "dev_root": "devRoot",
    "proc_root": "procRoot",
    "hotplug": "hotplug",
    "metrics_address": "metricsAddress",
    "health_address": "healthAddress",
    "status_socket": "statusSocket",
    "node_feature_file": "nodeFeatureFile",
    "registration": "registration",
    "plugins_registry": "pluginsRegistry",
}
"""Config keys read once, at start: a reload that changes one says it needs a restart."""

EXIT_OK = 0
EXIT_ENVIRONMENT = 1


class Daemon:
    def __init__(self, config: Config, reload: Callable[[], Config] | None = None) -> None:
        """`reload` re-reads the config for SIGHUP (the CLI's loader, with any --simulate keys)."""
        self.config = config
        self._reload_config = reload
        self.paths = PathWatcher()
        self.inventory = Inventory(config, paths=self.paths)
        registry = config.plugins_registry or config.plugin_dir.parent / PLUGINS_REGISTRY
        self.registrar: Registrar | WatcherRegistrar = (
            WatcherRegistrar(config.plugin_dir, registry, self._serve_anew)
            if choose_mode(config.registration, registry) == "pluginWatcher"
            else Registrar(config.plugin_dir)
        )
        self.servers: dict[str, ResourceServer] = {}
        self._serving = False
        self._recovering = asyncio.Lock()
        self._stop = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self.phase = "starting"
        """starting, running or stopping: what /readyz reports before anything else."""
        self.notify = Notifier()
        self.endpoints = probes.Endpoints()
        self._told_ready = False
        self._kubelet: tuple[int, int] | None = None
        """The kubelet.sock last seen (inode, ctime): a different one is a kubelet restart."""
        self.kubelet_restarts = 0
        self.follower: ConfigFollower | None = None
        self.status_server = status.StatusServer(status.socket_path(config.plugin_dir, config.status_socket), lambda: report.status(self))
        self.labels: labels.LabelWriter | None = None
        """Every driver's node labels as an NFD feature file, rewritten after scans that change them."""
        if config.node_feature_file:
            self.labels = labels.LabelWriter.for_inventory(self.inventory, Path(config.node_feature_file))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            lock = PluginDirLock.acquire(self.config.plugin_dir)
        except PluginDirError as err:
            log.error("%s", err)
            return EXIT_ENVIRONMENT
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        if self._reload_config is not None:
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._reload()))
        try:
            self._listen(loop)
            await self.status_server.start()
            if (problem := self._registry_problem()) is not None:
                log.error("%s", problem)
                return EXIT_ENVIRONMENT
            return await self._run()
        except (probes.ListenError, status.StatusError) as err:
            log.error("%s", err)
            return EXIT_ENVIRONMENT
        finally:
            await self.status_server.close()
            await asyncio.to_thread(self.endpoints.close)
            self.notify.close()
            lock.release()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _registry_problem(self) -> str | None:
        """Logs the registration mode; in pluginWatcher mode makes plugins_registry if it is missing."""
        registrar = self.registrar
        if isinstance(registrar, Registrar):
            log.info("registration: Register on %s", registrar.kubelet_socket)
            return None
        log.info("registration: the kubelet's plugin watcher, sockets in %s", registrar.socket_dir)
        try:
            registrar.socket_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as err:
            return f"pluginsRegistry {registrar.socket_dir}: cannot create it: {err.strerror or err}"
        if not registrar.socket_dir.is_dir():
            return f"pluginsRegistry {registrar.socket_dir}: not a directory"
        return None

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """The HTTP endpoints: /metrics on metricsAddress, probes on healthAddress (one server if both are equal)."""
        routes: dict[str, dict[str, probes.Route]] = {}
        keys: dict[str, list[str]] = {}
        if address := self.config.metrics_address:
            metrics.enable()  # before any resource exists, so every series is real from the start
            routes.setdefault(address, {})["/metrics"] = _metrics_page
            keys.setdefault(address, []).append("metricsAddress")
        if address := self.config.health_address:
            routes.setdefault(address, {}).update(probes.health_routes(loop, lambda: report.readiness(self)))
            keys.setdefault(address, []).append("healthAddress")
        for address, paths in routes.items():
            self.endpoints.listen(address, paths, key=" and ".join(keys[address]))
            log.info("serving %s on http://%s", ", ".join(sorted(paths)), address)

    async def _run(self) -> int:
        self.paths.start(asyncio.get_running_loop())
        if self.notify.watchdog_s is not None:
            self._spawn(self._watchdog(self.notify.watchdog_s))
        try:
            startup = asyncio.create_task(self._start())
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait([startup, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not startup.done():
                startup.cancel()
                log.info("stopped during startup")
            elif (failed := startup.result()) is not None:
                log.error("%s", failed)
                return EXIT_ENVIRONMENT
            else:
                self.phase = "running"
                self._spawn(self._backstop())
                self._spawn(self._announce_ready())
                await self._stop.wait()
            return EXIT_OK
        finally:
            await self._shutdown()

    async def _start(self) -> str | None:
        """Starts drivers, serves and registers every resource; the reason if nothing can be served."""
        self.inventory.add_listener(self._on_resource)
        self.notify.status("starting drivers")
        await self.inventory.start()
        for name in self.inventory.runners:
            metrics.driver_added(name)
        if not self.inventory.started:
            return f"no driver is serving ({_why_none(self)}); nothing to do"
        self.plugin_dir_watch = self.paths.watch(self.config.plugin_dir, self._on_plugin_dir_change, Changes.ENTRIES)
        if (sockets := self.registrar.socket_dir) != self.config.plugin_dir:
            self.registry_watch = self.paths.watch(sockets, self._on_registry_change, Changes.ENTRIES)
        self._kubelet = self._kubelet_identity()
        if self._reload_config is not None and self.config.path.is_file():  # not `--simulate` alone
            self.follower = ConfigFollower(self.config.path, self.paths, self._reload)
            self.follower.start()
        async with self._recovering:
            self._serving = True  # from here on, a new resource is served as it appears
            initial = list(self.servers.values())
            for server in initial:
                await self._start_server(server)
        if initial and not any(server.serving for server in initial):
            return f"none of the {len(initial)} resource(s) can be served in {self.registrar.socket_dir}"
        self.phase = "running"  # before the line that says so: probes and logs agree
        log.info("serving %d resource(s) in %s", sum(s.serving for s in self.servers.values()), self.registrar.socket_dir)
        # What start built (modules, config, the first device lists) lives as long as the
        # process. Frozen, the collector's full passes stop walking it: with 4,096 devices
        # such a pass took 20-30 ms, at whatever moment a scan's allocations set it off.
        gc.freeze()
        return None

    async def _shutdown(self) -> None:
        """Always runs; bounded, so SIGTERM ends the process within 2 s whatever is in flight."""
        self.phase = "stopping"
        self.notify.stopping()
        try:
            await asyncio.wait_for(self._stop_everything(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("stopping took longer than %.1f s; exiting anyway", STOP_TIMEOUT_S)
        log.info("stopped")

    async def _stop_everything(self) -> None:
        if self.follower is not None:
            await self.follower.close()
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.labels is not None:  # labels must not outlive the daemon that vouches for them
            await self.labels.close()
        await self.registrar.close()
        await asyncio.gather(*(server.stop() for server in self.servers.values()))
        self.paths.close()
        await self.inventory.stop()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs work in the background, holding the task so it cannot be collected mid-way."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _request_stop(self, sig: signal.Signals) -> None:
        log.info("%s received, stopping", sig.name)
        self._stop.set()

    # --- readiness: systemd ------------------------------------------------------

    async def _announce_ready(self) -> None:
        """READY=1 once every served resource is registered. Only under systemd: registration
        reports no event, so this checks on a short period until the moment has come."""
        if not self.notify.enabled:
            return
        told = -1
        while waiting := report.unregistered(self, served_only=True):
            if len(waiting) != told:
                told = len(waiting)
                self.notify.status(f"serving; waiting for the kubelet to register {told} resource(s)")
            await asyncio.sleep(READY_POLL_S)
        self.notify.ready(f"serving {sum(s.serving for s in self.servers.values())} resource(s), all registered")
        self._told_ready = True
        log.debug("told systemd READY=1")

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the loop itself: a stuck loop stops the pings and systemd restarts us."""
        while True:
            self.notify.watchdog()
            await asyncio.sleep(interval)

    # --- reload ----------------------------------------------------------------

    async def _reload(self) -> None:
        """SIGHUP: applies a changed driver set without a restart; a bad file changes nothing.

        A changed driver is restarted behind the same sockets: its resources stay
        served, get the new list, and are registered again (their options may have
        changed). Resources no driver serves any more are stopped for good.
        """
        assert self._reload_config is not None
        told = self._told_ready  # before READY=1, systemd hears of no reload: READY=1 comes as usual
        if told:
            self.notify.reloading()
        try:
            await self._apply_reload()
        finally:
            if told and not self._stop.is_set():
                self.notify.ready("reloaded")

    async def _apply_reload(self) -> None:
        assert self._reload_config is not None
        if self.follower is not None:
            await asyncio.to_thread(self.follower.read_now)
        try:
            new = await asyncio.to_thread(self._reload_config)
        except ConfigError as err:
            log.error("config reload refused, still running the previous config: %s", err)
            return
        for attribute, key in _START_ONLY.items():
            if getattr(new, attribute) != getattr(self.config, attribute):
                log.warning("config reload: %s changed; that takes effect at the next start (restart nodedev)", key)
        async with self._recovering:
            if self._stop.is_set():
                return
            before = set(self.inventory.runners)
            dropped, restarted = await self.inventory.reconfigure(replace(self.config, drivers=new.drivers))
            for name in before - set(self.inventory.runners):
                metrics.forget_driver(name)
            for name in set(self.inventory.runners) - before:
                metrics.driver_added(name)
            for resource in dropped:
                await self._drop(resource)
            for resource in restarted:
                server = self.servers.get(resource)
                if server is not None and server.serving:
                    self.registrar.register(server, force=True)
        self.config = self.inventory.config
        if self.labels is not None:
            self.labels.refresh()  # a driver removed takes its labels with it
        log.info("config reloaded from %s", self.config.path)

    async def _drop(self, resource: str) -> None:
        server = self.servers.pop(resource, None)
        self.registrar.forget(resource)
        metrics.forget_resource(resource)
        if server is not None:
            await server.stop()
            log.info("%s: no longer served", resource)

    # --- resources as the inventory reports them ---------------------------------

    def _on_resource(self, resource: str, devices: Mapping[str, Device], changes: Sequence[Change]) -> None:
        runner = self.inventory.owner(resource)
        if runner is None or runner.driver is None:
            return
        self.status_server.notify()  # `watch` streams compare the report once this has returned
        server = self.servers.get(resource)
        if server is None:
            metrics.resource_added(resource)
            server = self.servers[resource] = ResourceServer(resource, runner.driver, self.registrar.socket_dir)
            self.registrar.adopt(server)
            server.update(devices)
            if self._serving:  # a resource that appeared after start, e.g. a new MIG profile
                self._spawn(self._serve_new(server))
            return
        server.driver = runner.driver
        server.update(devices, changed=bool(changes))

    async def _serve_new(self, server: ResourceServer) -> None:
        async with self._recovering:
            if self.servers.get(server.resource) is server and not server.serving and not self._stop.is_set():
                await self._start_server(server)

    async def _serve_anew(self, server: ResourceServer) -> None:
        """A new socket for one resource (the plugin watcher refused it, or must read it again)."""
        async with self._recovering:
            if self.servers.get(server.resource) is server and not self._stop.is_set():
                await server.stop()
                await self._start_server(server)

    async def _start_server(self, server: ResourceServer) -> None:
        """Serves, then registers, one resource; one that cannot be served leaves the others be."""
        try:
            await server.start()
        except ServeError as err:
            log.error("%s", err)
            return
        self.registrar.register(server)

    # --- kubelet restarts ------------------------------------------------------

    def _on_plugin_dir_change(self, names: set[str]) -> None:
        ours = {server.endpoint for server in self.servers.values()}
        if names and not names & (ours | {KUBELET_SOCKET}):
            return
        self._spawn(self._recover(check_kubelet=not names or KUBELET_SOCKET in names))

    def _on_registry_change(self, names: set[str]) -> None:
        """pluginWatcher mode: one of our sockets in plugins_registry removed or replaced."""
        if not names or names & {server.endpoint for server in self.servers.values()}:
            self._spawn(self._recover(check_kubelet=False))

    async def _recover(self, *, check_kubelet: bool) -> None:
        """Serves again every resource whose socket is gone, then re-registers what needs it."""
        async with self._recovering:
            if self._stop.is_set():
                return
            lost = [s for s in self.servers.values() if not s.socket_present()]
            if lost:
                log.info("socket(s) of %d resource(s) removed (kubelet restart?); serving again", len(lost))
            for server in lost:
                await server.stop()  # ends streams of the wiped socket; a no-op if it never served
                await self._start_server(server)
            if check_kubelet:
                self._count_kubelet_restart()
                self.registrar.kubelet_appeared([s for s in self.servers.values() if s.serving])

    async def _backstop(self) -> None:
        while True:
            await asyncio.sleep(BACKSTOP_INTERVAL_S)
            self.backstop_check()

    def _count_kubelet_restart(self) -> None:
        kubelet = self._kubelet_identity()
        if kubelet is None or kubelet == self._kubelet:
            return
        if self._kubelet is not None:
            self.kubelet_restarts += 1
            metrics.KUBELET_RESTARTS.inc()
            log.info("a new kubelet.sock: the kubelet restarted")
        self._kubelet = kubelet

    def _kubelet_identity(self) -> tuple[int, int] | None:
        """Inode and change time, as registration tells kubelet.sock files apart."""
        try:
            st = (self.config.plugin_dir / KUBELET_SOCKET).stat()
        except OSError:
            return None
        return st.st_ino, st.st_ctime_ns

    def backstop_check(self) -> None:
        """Re-arms a lost watch and checks every socket and kubelet.sock by hand."""
        self.paths.check()
        self._spawn(self._recover(check_kubelet=True))


def _why_none(daemon: Daemon) -> str:
    if not daemon.config.drivers:
        return f"no driver is enabled in {daemon.config.path}"
    return "; ".join(f"{r.name}: {r.error}" for r in daemon.inventory.runners.values())


def _metrics_page(headers: Mapping[str, str]) -> probes.Answer:
    content_type, body = metrics.page(headers)
    return probes.Answer(200, content_type, body)
