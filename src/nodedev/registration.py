"""Registering each resource with the kubelet, exactly when it is needed.

The kubelet dials the plugin's socket before it answers Register, so a Register
is sent only while that resource's own socket is present and serving. Each
resource has one long-lived task that registers whenever the pair (the
kubelet.sock it would talk to, the incarnation of our socket) differs from the
pair that last succeeded: after a kubelet restart or after our socket was
served again, exactly one successful Register follows. An attempt in flight is
never cancelled to start another, because a Register the kubelet already
accepted would then be sent twice.

While kubelet.sock is missing or refuses, the task retries with capped
exponential backoff; a new kubelet.sock (seen by the plugin-directory watch)
or our socket served again cuts the wait short. Failures are logged once per
change of state, not once per try.

In pluginWatcher mode (`WatcherRegistrar`) nothing calls Register: each socket
sits in the kubelet's plugins_registry directory and also serves the
`pluginregistration.Registration` service. The kubelet's plugin watcher finds
the socket, asks GetInfo, dials the device-plugin service and answers with
NotifyRegistrationStatus; a refusal is logged with the kubelet's reason and the
socket is created again (which the watcher sees as a new plugin) after a capped
exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc

from nodedev import metrics
from nodedev.api import deviceplugin_pb2 as pb
from nodedev.api import deviceplugin_pb2_grpc as pb_grpc
from nodedev.api import pluginregistration_pb2 as pr
from nodedev.api import pluginregistration_pb2_grpc as pr_grpc
from nodedev.server import ResourceServer

log = logging.getLogger("nodedev.registration")

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
REGISTER_TIMEOUT_S = 12.0
"""Longer than the kubelet's own 10 s dial back to us, so its answer is the one we see."""
_NO_KUBELET = " does not exist (is the kubelet running?)"
CONNECT_TIMEOUT_S = 2.0
_CHANGED = "changed while connecting"
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 5.0

_Key = tuple[tuple[int, int], int, int]
"""(kubelet.sock's identity, our socket's generation, forced re-registrations): what a success covers."""


@dataclass(eq=False)
class _Resource:
    server: ResourceServer
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    registered: _Key | None = None
    forced: int = 0
    problem: str | None = None
    delays: list[float] = field(default_factory=list)
    """Backoff waits taken since the last success, for tests and the logs."""


PLUGINS_REGISTRY = "plugins_registry"
PLUGIN_TYPE = "DevicePlugin"
Mode = Literal["kubelet", "pluginWatcher"]


def choose_mode(setting: str, registry: Path) -> Mode:
    """`auto`: the plugin watcher when its directory exists (checked once, at start), else Register."""
    if setting == "auto":
        return "pluginWatcher" if registry.is_dir() else "kubelet"
    return "pluginWatcher" if setting == "pluginWatcher" else "kubelet"


def _kubelet_identity(kubelet_socket: Path) -> tuple[int, int] | None:
    """Which kubelet.sock is there: inode and change time. A restarted kubelet's new
    socket often gets the inode its old one had; its creation time is new."""
    try:
        st = kubelet_socket.stat()
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


class Registrar:
    mode: Mode = "kubelet"

    def __init__(self, plugin_dir: Path) -> None:
        self.kubelet_socket = plugin_dir / KUBELET_SOCKET
        self.socket_dir = plugin_dir
        """Where the resources' sockets are served."""
        self._resources: dict[str, _Resource] = {}

    def adopt(self, server: ResourceServer) -> None:
        """A new resource's server, before it first serves: nothing to add for Register."""

    def register(self, server: ResourceServer, *, force: bool = False) -> None:
        """Makes sure `server` is registered with the current kubelet; `force` registers
        again even if it already is (new options after a config reload)."""
        entry = self._resources.get(server.resource)
        if entry is None or entry.server is not server:
            if entry is not None and entry.task is not None:
                entry.task.cancel()
            entry = self._resources[server.resource] = _Resource(server)
        if force:
            entry.forced += 1
        if entry.task is None or entry.task.done():
            entry.task = asyncio.create_task(self._run(entry), name=f"register-{server.resource}")
        entry.wake.set()

    def forget(self, resource: str) -> None:
        """Stops registering a resource that is no longer served."""
        entry = self._resources.pop(resource, None)
        if entry is not None and entry.task is not None:
            entry.task.cancel()

    def kubelet_appeared(self, servers: Iterable[ResourceServer]) -> None:
        """A kubelet.sock was created (or may have been): each resource checks whether it
        is registered with that kubelet, and waiting attempts retry now."""
        for server in servers:
            self.register(server)

    def registered(self, resource: str) -> bool:
        entry = self._resources.get(resource)
        return entry is not None and entry.registered is not None and entry.registered == self._key(entry)

    def backoff(self, resource: str) -> list[float]:
        entry = self._resources.get(resource)
        return list(entry.delays) if entry is not None else []

    async def close(self) -> None:
        tasks = [e.task for e in self._resources.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resources.clear()

    def _key(self, entry: _Resource) -> _Key | None:
        kubelet = self._kubelet_identity()
        return None if kubelet is None else (kubelet, entry.server.generation, entry.forced)

    async def _run(self, entry: _Resource) -> None:
        delay = BACKOFF_FIRST_S
        while True:
            entry.wake.clear()
            server = entry.server
            if not (server.serving and server.socket_present()):
                # Not serving right now (a kubelet restart wiped it): whoever serves it
                # again calls register(), which wakes us. Never Register a dead socket.
                await entry.wake.wait()
                continue
            key = self._key(entry)
            if key is not None and key == entry.registered:
                await entry.wake.wait()
                delay = BACKOFF_FIRST_S
                continue
            problem = await self._attempt(entry, key) if key is not None else f"{self.kubelet_socket}{_NO_KUBELET}"
            if problem is _CHANGED:
                continue  # the kubelet or our socket changed while we connected: look again
            if problem is None:
                # Recorded only if kubelet.sock stayed the same file throughout: otherwise we
                # cannot tell which kubelet answered, and registering again is the safe side.
                entry.registered = key if self._key(entry) == key else None
                entry.problem = None
                entry.delays.clear()
                delay = BACKOFF_FIRST_S
                metrics.REGISTRATIONS.labels(server.resource).inc()
                log.info("%s: registered with the kubelet (endpoint %s)", server.resource, server.endpoint)
                continue
            if entry.problem != problem:
                # A missing kubelet.sock is the normal middle of a kubelet restart.
                level = logging.INFO if problem.endswith(_NO_KUBELET) else logging.WARNING
                log.log(level, "%s: cannot register yet, will keep trying: %s", server.resource, problem)
                entry.problem = problem
            entry.delays.append(delay)
            try:
                await asyncio.wait_for(entry.wake.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _attempt(self, entry: _Resource, key: _Key) -> str | None:
        """One Register call; the problem in words, or None when it succeeded.

        The connection to kubelet.sock is made first and the state checked again
        once it is up: a kubelet that restarted while we connected would otherwise
        get a Register for the socket it has just wiped.
        """
        server = entry.server
        request = pb.RegisterRequest(
            version=API_VERSION,
            endpoint=server.endpoint,
            resource_name=server.resource,
            options=server.options,
        )
        try:
            async with grpc.aio.insecure_channel(f"unix://{self.kubelet_socket}") as channel:
                try:
                    await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
                except TimeoutError:
                    return f"cannot connect to {self.kubelet_socket}"
                if not (server.serving and server.socket_present()) or self._key(entry) != key:
                    return _CHANGED
                stub = pb_grpc.RegistrationStub(channel)  # type: ignore[no-untyped-call]
                await stub.Register(request, timeout=REGISTER_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            return f"kubelet answered {err.code().name}: {str(err.details())[:300]}"
        return None

    def _kubelet_identity(self) -> tuple[int, int] | None:
        return _kubelet_identity(self.kubelet_socket)


@dataclass(eq=False)
class _Watched:
    server: ResourceServer
    registered: tuple[tuple[int, int] | None, int] | None = None
    """(kubelet.sock's identity, our socket's generation) when the kubelet last said yes."""
    refusal: str | None = None
    delay: float = BACKOFF_FIRST_S
    delays: list[float] = field(default_factory=list)
    retry: asyncio.Task[None] | None = None


class WatcherRegistrar:
    """pluginWatcher mode: the kubelet comes to our sockets in plugins_registry; we only answer.

    `recreate(server)` serves a resource's socket anew (the daemon does it under its
    recovery lock): after a refusal, and when a reload asks for a new registration.
    """

    mode: Mode = "pluginWatcher"

    def __init__(self, plugin_dir: Path, registry: Path, recreate: Callable[[ResourceServer], Awaitable[None]]) -> None:
        self.kubelet_socket = plugin_dir / KUBELET_SOCKET
        self.socket_dir = registry
        self._recreate = recreate
        self._resources: dict[str, _Watched] = {}

    def adopt(self, server: ResourceServer) -> None:
        """Every gRPC server of this resource also serves the plugin watcher's Registration."""
        service = _WatcherService(self, server)
        server.services.append(lambda grpc_server: pr_grpc.add_RegistrationServicer_to_server(service, grpc_server))  # type: ignore[no-untyped-call]

    def register(self, server: ResourceServer, *, force: bool = False) -> None:
        """Served (again): the watcher sees the socket by itself. `force` serves it anew, so
        the kubelet registers it again and reads its new options."""
        entry = self._entry(server)
        if force and entry.retry is None:
            entry.retry = asyncio.create_task(self._again(entry, 0.0), name=f"recreate-{server.resource}")

    def forget(self, resource: str) -> None:
        entry = self._resources.pop(resource, None)
        if entry is not None and entry.retry is not None:
            entry.retry.cancel()

    def kubelet_appeared(self, servers: Iterable[ResourceServer]) -> None:
        """A restarted kubelet finds the sockets still in plugins_registry by itself."""

    def registered(self, resource: str) -> bool:
        entry = self._resources.get(resource)
        if entry is None or entry.registered is None or not entry.server.serving:
            return False
        return entry.registered == (_kubelet_identity(self.kubelet_socket), entry.server.generation)

    def backoff(self, resource: str) -> list[float]:
        entry = self._resources.get(resource)
        return list(entry.delays) if entry is not None else []

    async def close(self) -> None:
        tasks = [e.retry for e in self._resources.values() if e.retry is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resources.clear()

    def _entry(self, server: ResourceServer) -> _Watched:
        entry = self._resources.get(server.resource)
        if entry is None or entry.server is not server:
            if entry is not None and entry.retry is not None:
                entry.retry.cancel()
            entry = self._resources[server.resource] = _Watched(server)
        return entry

    def notified(self, server: ResourceServer, registered: bool, error: str) -> None:
        """The kubelet's NotifyRegistrationStatus for the socket being served now."""
        entry = self._resources.get(server.resource)
        if entry is None or entry.server is not server or not server.serving:
            return
        if registered:
            entry.registered = (_kubelet_identity(self.kubelet_socket), server.generation)
            entry.refusal = None
            entry.delay = BACKOFF_FIRST_S
            entry.delays.clear()
            metrics.REGISTRATIONS.labels(server.resource).inc()
            log.info("%s: registered by the kubelet's plugin watcher (endpoint %s)", server.resource, server.socket_path)
            return
        entry.registered = None
        reason = " ".join(error.split())[:300] or "no reason given"
        if entry.retry is not None:
            return  # already being served anew
        delay = entry.delay
        entry.delays.append(delay)
        entry.delay = min(delay * 2, BACKOFF_MAX_S)
        level = logging.WARNING if reason != entry.refusal else logging.DEBUG
        log.log(level, "%s: the kubelet refused the registration: %s; serving %s anew in %.2f s", server.resource, reason, server.socket_path, delay)
        entry.refusal = reason
        entry.retry = asyncio.create_task(self._again(entry, delay), name=f"recreate-{server.resource}")

    async def _again(self, entry: _Watched, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            entry.retry = None
        if self._resources.get(entry.server.resource) is entry:
            await self._recreate(entry.server)


class _WatcherService(pr_grpc.RegistrationServicer):
    """The plugin watcher's side of one resource's socket."""

    def __init__(self, registrar: WatcherRegistrar, server: ResourceServer) -> None:
        self.registrar = registrar
        self.server = server

    async def GetInfo(self, request: pr.InfoRequest, context: grpc.aio.ServicerContext) -> pr.PluginInfo:
        server = self.server
        return pr.PluginInfo(type=PLUGIN_TYPE, name=server.resource, endpoint=str(server.socket_path), supported_versions=[API_VERSION])

    async def NotifyRegistrationStatus(self, request: pr.RegistrationStatus, context: grpc.aio.ServicerContext) -> pr.RegistrationStatusResponse:
        self.registrar.notified(self.server, request.plugin_registered, request.error)
        return pr.RegistrationStatusResponse()
