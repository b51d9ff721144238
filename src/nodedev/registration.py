"""Registering each resource with the kubelet, and again whenever it is needed.

The kubelet dials the plugin's socket before it answers Register, so a resource
is registered only once its server is serving. While kubelet.sock is missing or
refuses, each resource retries with capped exponential backoff; a new kubelet.sock
(seen by the plugin-directory watch) cuts the wait short. Failures are logged once
per change of state, not once per try.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

import grpc

from nodedev.api import deviceplugin_pb2 as pb
from nodedev import metrics
from nodedev.api import deviceplugin_pb2_grpc as pb_grpc
from nodedev.server import ResourceServer

log = logging.getLogger("nodedev.registration")

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
REGISTER_TIMEOUT_S = 12.0
"""Longer than the kubelet's own 10 s dial back to us, so its answer is the one we see."""
_NO_KUBELET = " does not exist (is the kubelet running?)"
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 5.0


class Registrar:
    def __init__(self, plugin_dir: Path) -> None:
        self.kubelet_socket = plugin_dir / KUBELET_SOCKET
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._appeared = asyncio.Event()
        self._last_problem: dict[str, str | None] = {}
        self._registered_to: dict[str, int] = {}
        """Resource -> inode of the kubelet.sock that accepted it: a new kubelet has a new inode."""

    def register(self, server: ResourceServer) -> None:
        """(Re)starts registering `server`, replacing any attempt already under way."""
        if (task := self._tasks.get(server.resource)) is not None:
            task.cancel()
        self._tasks[server.resource] = asyncio.create_task(self._register(server), name=f"register-{server.resource}")

    def kubelet_appeared(self, servers: Iterable[ResourceServer]) -> None:
        """A kubelet.sock was created: waiting attempts retry now, and every resource
        registered with an earlier kubelet registers again."""
        self._appeared.set()
        self._appeared = asyncio.Event()
        current = self._kubelet_inode()
        for server in servers:
            task = self._tasks.get(server.resource)
            in_flight = task is not None and not task.done()
            if not in_flight and self._registered_to.get(server.resource) != current:
                self.register(server)

    async def wait_idle(self) -> None:
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await self.wait_idle()
        self._tasks.clear()

    async def _register(self, server: ResourceServer) -> None:
        delay = BACKOFF_FIRST_S
        while True:
            # Taken before the attempt, so a kubelet that appears during it is not missed.
            appeared = self._appeared
            problem = await self._attempt(server)
            if problem is None:
                self._last_problem[server.resource] = None
                metrics.REGISTRATIONS.labels(server.resource).inc()
                log.info("%s: registered with the kubelet (endpoint %s)", server.resource, server.endpoint)
                return
            if self._last_problem.get(server.resource) != problem:
                # A missing kubelet.sock is the normal middle of a kubelet restart.
                level = logging.INFO if problem.endswith(_NO_KUBELET) else logging.WARNING
                log.log(level, "%s: cannot register yet, will keep trying: %s", server.resource, problem)
                self._last_problem[server.resource] = problem
            try:
                await asyncio.wait_for(appeared.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _attempt(self, server: ResourceServer) -> str | None:
        """One Register call; the problem in words, or None when it succeeded."""
        inode = self._kubelet_inode()
        if inode is None:
            return f"{self.kubelet_socket}{_NO_KUBELET}"
        request = pb.RegisterRequest(
            version=API_VERSION,
            endpoint=server.endpoint,
            resource_name=server.resource,
            options=server.options,
        )
        try:
            async with grpc.aio.insecure_channel(f"unix://{self.kubelet_socket}") as channel:
                await pb_grpc.RegistrationStub(channel).Register(request, timeout=REGISTER_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            return f"kubelet answered {err.code().name}: {err.details()}"
        self._registered_to[server.resource] = inode
        return None

    def _kubelet_inode(self) -> int | None:
        try:
            return self.kubelet_socket.stat().st_ino
        except FileNotFoundError:
            return None
