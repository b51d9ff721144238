"""One DevicePlugin gRPC server per resource, each on its own unix socket.

The server holds the resource's latest device list, fans it out to every open
ListAndWatch stream, and checks every request before the driver sees it. Every
check is linear in the request's size, and a request too large to answer in a
moment on the event loop is answered in a worker thread, so one huge request
never stalls the other resources, streams or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from nodedev import metrics
from nodedev.api import deviceplugin_pb2 as pb
from nodedev.api import deviceplugin_pb2_grpc as pb_grpc
from nodedev.config import MAX_SOCKET_PATH
from nodedev.driver import AllocationError, ContainerEdits, Device, Driver, Health

log = logging.getLogger("nodedev.server")

_TEMPORARY = itertools.count(1)
"""Numbers the temporary names sockets are bound under before they are renamed into place."""
STOP_GRACE_S = 0.2
"""How long in-flight calls get at stop before they are cancelled; streams end at once."""
INLINE_IDS = 2000
"""Requests naming more IDs than this are checked and answered in a worker thread."""
SHOWN_ID_CHARS = 80
SHOWN_IDS = 3

T = TypeVar("T")


class ServeError(Exception):
    """A resource's socket cannot be served; the message names the resource and the path."""


class RequestError(Exception):
    """A request refused before the driver saw it; the message is for the kubelet's log."""


def socket_name(resource: str) -> str:
    """`devices.kubevirt.io/kvm` -> `nodedev-devices.kubevirt.io_kvm.sock`: unique and path-safe."""
    return "nodedev-" + re.sub(r"[^A-Za-z0-9.-]", "_", resource) + ".sock"


def shown_id(device_id: str) -> str:
    """An ID as errors and logs echo it: a 1 MB ID must not become a 1 MB log line."""
    if len(device_id) <= SHOWN_ID_CHARS:
        return repr(device_id)
    return repr(device_id[:SHOWN_ID_CHARS]) + f"... ({len(device_id)} characters)"


def shown_ids(ids: Sequence[str]) -> str:
    """At most a few IDs, each shortened, then "and N more"."""
    text = ", ".join(shown_id(i) for i in ids[:SHOWN_IDS])
    return text + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


_View = list[tuple[str, str, tuple[int, ...]]]


def _kubelet_view(devices: Mapping[str, Device]) -> _View:
    """What the kubelet sees of a list; reasons and edits are ours alone and never cause an update.
    (`Health` is a str: its members go in as they are, which spares 4,096 enum lookups.)"""
    return sorted([(d.id, d.health, d.numa_nodes) for d in devices.values()])


class ResourceServer(pb_grpc.DevicePluginServicer):
    def __init__(self, resource: str, driver: Driver[Any], socket_dir: Path) -> None:
        """`socket_dir`: the kubelet's plugin directory, or plugins_registry for its plugin watcher."""
        self.resource = resource
        self.driver: Driver[Any] = driver
        """Replaced when a config reload restarts the driver; the socket stays."""
        self.endpoint = socket_name(resource)
        self.socket_path = socket_dir / self.endpoint
        self.services: list[Callable[[grpc.aio.Server], None]] = []
        """Further services each new gRPC server carries (the plugin watcher's Registration)."""
        self.devices: Mapping[str, Device] = {}
        self.version = 0
        self.generation = 0
        """Bumped at every start: a stream from before a restart ends, and registration
        knows the kubelet has not yet seen this incarnation of the socket."""
        self._view: _View = []
        self._response = pb.ListAndWatchResponse()
        self._messages: dict[tuple[str, str, tuple[int, ...]], pb.Device] = {}
        self._changed = asyncio.Event()
        """Set, and replaced, at every new version: each stream waits on the one it saw."""
        self._server: grpc.aio.Server | None = None
        self._closing = False
        self._inode: int | None = None
        self._allocated_ok = metrics.ALLOCATIONS.labels(resource, "ok")
        self._allocate_seconds = metrics.ALLOCATE_SECONDS.labels(resource)
        self._preferred_seconds = metrics.PREFERRED_SECONDS.labels(resource)

    @property
    def options(self) -> pb.DevicePluginOptions:
        return pb.DevicePluginOptions(
            pre_start_required=self.driver.implements("pre_start"),
            get_preferred_allocation_available=self.driver.implements("preferred_allocation"),
        )

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Serves on the socket, replacing a stale file left there by an earlier run.

        gRPC binds a temporary name, which is then renamed over the socket path:
        the socket appears whole, already 0600, and when an earlier server of ours
        shuts down, gRPC's own cleanup unlinks that server's temporary name rather
        than the path a newer server now serves (seen under load: a restarted
        socket deleted behind our back). Anything can unlink the socket at any
        moment (a kubelet restart wipes the directory): every step that touches
        the file is a ServeError, never a crash.
        """
        length = len(os.fsencode(self.socket_path))
        if length > MAX_SOCKET_PATH:
            raise ServeError(f"{self.resource}: socket path {self.socket_path} is {length} bytes, unix sockets allow {MAX_SOCKET_PATH}")
        if self.socket_path.is_dir() and not self.socket_path.is_symlink():
            raise ServeError(f"{self.resource}: cannot replace {self.socket_path}: it is a directory")
        temporary = self.socket_path.with_name(f".nd-{os.getpid():x}-{next(_TEMPORARY):x}.sock")
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_DevicePluginServicer_to_server(self, server)  # type: ignore[no-untyped-call]
        for add in self.services:
            add(server)
        try:
            server.add_insecure_port(f"unix://{temporary}")
        except RuntimeError:
            raise ServeError(f"{self.resource}: cannot listen on {self.socket_path}") from None
        await server.start()
        try:
            os.chmod(temporary, 0o600)
            os.rename(temporary, self.socket_path)
            inode = self.socket_path.stat().st_ino
        except OSError as err:
            await server.stop(None)
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise ServeError(f"{self.resource}: cannot replace {self.socket_path}: {err.strerror}") from None
        self.generation += 1
        self._closing = False
        self._inode = inode
        self._server = server
        log.debug("%s: serving on %s", self.resource, self.socket_path)

    async def stop(self) -> None:
        """Ends every stream, stops serving, and removes our socket if it is still ours."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        self._wake()
        await server.stop(STOP_GRACE_S)
        if self.socket_present():
            try:
                self.socket_path.unlink(missing_ok=True)
            except OSError as err:
                log.warning("%s: cannot remove %s: %s", self.resource, self.socket_path, err.strerror)
        self._inode = None

    def socket_present(self) -> bool:
        """Whether the socket file we bound is still there (the kubelet wipes the directory)."""
        try:
            return self._inode is not None and self.socket_path.stat().st_ino == self._inode
        except OSError:
            return False

    @property
    def serving(self) -> bool:
        return self._server is not None

    # --- updates from the inventory ---------------------------------------------

    def update(self, devices: Mapping[str, Device], *, changed: bool = True) -> None:
        """Takes the full list; wakes the streams only when the kubelet's view changed.

        `changed=False` (the inventory saw no device differ) only swaps in the new
        devices, whose edits Allocate uses, without re-sorting a long list.
        """
        self.devices = devices
        if not changed and self.version > 0:
            return
        if metrics.REGISTRY is not None:
            counts = Counter(d.health for d in devices.values())
            for health in Health:
                metrics.DEVICES.labels(self.resource, health.value).set(counts[health])
        view = _kubelet_view(devices)
        if view == self._view and self.version > 0:
            return
        self._view = view
        # Messages of devices that did not change are reused: building 1,000 of them
        # anew costs milliseconds at every event on a large node.
        known = self._messages
        self._messages = {key: known.get(key) or _device_message(*key) for key in view}
        self._response = pb.ListAndWatchResponse(devices=list(self._messages.values()))
        self.version += 1
        self._wake()

    def _wake(self) -> None:
        """Wakes every stream; the next ones wait on a fresh event."""
        self._changed.set()
        self._changed = asyncio.Event()

    # --- the DevicePlugin service ---------------------------------------------

    async def GetDevicePluginOptions(self, request: pb.Empty, context: grpc.aio.ServicerContext) -> pb.DevicePluginOptions:
        return self.options

    async def ListAndWatch(self, request: pb.Empty, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ListAndWatchResponse]:
        sent = 0
        generation = self.generation
        while not self._closing and generation == self.generation:
            if self.version == sent:
                await self._changed.wait()
                continue
            sent = self.version
            yield self._response

    async def Allocate(self, request: pb.AllocateRequest, context: grpc.aio.ServicerContext) -> pb.AllocateResponse:
        started = time.perf_counter()
        containers = [list(c.devices_ids) for c in request.container_requests]
        total = sum(len(ids) for ids in containers)
        try:
            return await self._answer(total, lambda: self._allocate(containers))
        except RequestError as err:
            await self._refuse(context, "refused", grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception as err:
            log.debug("%s: allocate failed", self.resource, exc_info=True)
            await self._refuse(context, "failed", grpc.StatusCode.INTERNAL, f"{self.resource}: allocate failed: {type(err).__name__}: {err}"[:500])
        finally:
            self._allocate_seconds.observe(time.perf_counter() - started)
        raise AssertionError("unreachable: abort raises")

    def _allocate(self, containers: list[list[str]]) -> pb.AllocateResponse:
        if not containers:
            raise RequestError(f"{self.resource}: the request names no container")
        devices = self.devices  # one snapshot for the whole request
        chosen = self._checked(containers, devices)
        responses = []
        for picked in chosen:
            try:
                extra = self.driver.allocate(self.resource, picked)
            except AllocationError as err:
                raise RequestError(f"{self.resource}: {err}") from None
            responses.append(_container_response(ContainerEdits.merge((d.edits for d in picked), extra)))
        self._allocated_ok.inc()
        return pb.AllocateResponse(container_responses=responses)

    async def _answer(self, size: int, work: Callable[[], T]) -> T:
        """Small requests are answered on the loop (a thread hop costs more than they do)."""
        if size <= INLINE_IDS:
            return work()
        return await asyncio.to_thread(work)

    async def _refuse(self, context: grpc.aio.ServicerContext, result: str, code: grpc.StatusCode, message: str) -> None:
        log.warning("%s", message)
        metrics.ALLOCATIONS.labels(self.resource, result).inc()
        await context.abort(code, message)

    async def GetPreferredAllocation(
        self, request: pb.PreferredAllocationRequest, context: grpc.aio.ServicerContext
    ) -> pb.PreferredAllocationResponse:
        if not self.driver.implements("preferred_allocation"):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{self.resource}: no preferred allocation")
        started = time.perf_counter()
        containers = list(request.container_requests)
        total = sum(len(c.available_deviceIDs) + len(c.must_include_deviceIDs) for c in containers)
        try:
            return await self._answer(total, lambda: self._preferred(containers))
        except RequestError as err:
            log.warning("%s", err)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception as err:
            log.debug("%s: preferred allocation failed", self.resource, exc_info=True)
            await context.abort(grpc.StatusCode.INTERNAL, f"{self.resource}: preferred allocation failed: {type(err).__name__}"[:500])
        finally:
            self._preferred_seconds.observe(time.perf_counter() - started)
        raise AssertionError("unreachable: abort raises")

    def _preferred(self, containers: list[pb.ContainerPreferredAllocationRequest]) -> pb.PreferredAllocationResponse:
        responses = []
        devices = self.devices
        for req in containers:
            available, required = list(req.available_deviceIDs), list(req.must_include_deviceIDs)
            self._check_preferred(available, required, req.allocation_size, devices)
            try:
                chosen = self.driver.preferred_allocation(self.resource, available, required, req.allocation_size)
            except AllocationError as err:
                raise RequestError(f"{self.resource}: {err}") from None
            responses.append(pb.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return pb.PreferredAllocationResponse(container_responses=responses)

    def _check_preferred(self, available: list[str], required: list[str], size: int, devices: Mapping[str, Device]) -> None:
        """Linear in the request: one set each, built once."""
        if len(available) > len(devices):
            raise RequestError(f"{self.resource}: {len(available)} available devices named, but the resource has {len(devices)}")
        if not 1 <= size <= len(available):
            raise RequestError(f"{self.resource}: allocation size {size} is not between 1 and the {len(available)} available devices")
        if len(required) > size:
            raise RequestError(f"{self.resource}: {len(required)} must-include devices exceed the allocation size {size}")
        offered = set(available)
        if len(offered) != len(available):
            raise RequestError(f"{self.resource}: {_repeated(available)} listed more than once among the available devices")
        if unknown := [i for i in available if i not in devices]:
            raise RequestError(f"{self.resource}: unknown available device(s) {shown_ids(unknown)}")
        if missing := [i for i in required if i not in offered]:
            raise RequestError(f"{self.resource}: must-include device(s) {shown_ids(missing)} are not among the available ones")
        if len(set(required)) != len(required):
            raise RequestError(f"{self.resource}: must-include device {_repeated(required)} is listed more than once")

    async def PreStartContainer(
        self, request: pb.PreStartContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.PreStartContainerResponse:
        if self.driver.implements("pre_start"):
            ids = list(request.devices_ids)
            try:
                picked = self._checked([ids], self.devices)[0]
            except RequestError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            try:
                await asyncio.to_thread(self.driver.pre_start, self.resource, [d.id for d in picked])
            except Exception as err:  # noqa: BLE001 - reported to the kubelet, which fails the pod
                message = f"{self.resource}: pre-start of {shown_ids(ids)} failed: {err}"[:1000]
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
        return pb.PreStartContainerResponse()

    def _checked(self, containers: Sequence[Sequence[str]], devices: Mapping[str, Device]) -> list[list[Device]]:
        """Each container's devices: every ID known, Healthy, and asked for once in the
        whole request. Refused at once when the request names more IDs than exist."""
        total = sum(len(ids) for ids in containers)
        if total > len(devices):
            raise RequestError(f"{self.resource}: the request names {total} devices, but the resource has {len(devices)}")
        seen: set[str] = set()
        chosen: list[list[Device]] = []
        for ids in containers:
            if not ids:
                raise RequestError(f"{self.resource}: a container request names no device")
            picked: list[Device] = []
            for device_id in ids:
                device = devices.get(device_id)
                if device is None:
                    raise RequestError(f"{self.resource}: unknown device {shown_id(device_id)}")
                if not device.healthy:
                    why = f": {device.reason}" if device.reason else ""
                    raise RequestError(f"{self.resource}: device {shown_id(device_id)} is Unhealthy{why}")
                if device_id in seen:
                    raise RequestError(f"{self.resource}: device {shown_id(device_id)} is requested more than once")
                seen.add(device_id)
                picked.append(device)
            chosen.append(picked)
        return chosen


def _device_message(device_id: str, health: str, numa: tuple[int, ...]) -> pb.Device:
    topology = pb.TopologyInfo(nodes=[pb.NUMANode(ID=n) for n in numa]) if numa else None
    return pb.Device(ID=device_id, health=health, topology=topology)


def _repeated(ids: Sequence[str]) -> str:
    seen: set[str] = set()
    for device_id in ids:
        if device_id in seen:
            return shown_id(device_id)
        seen.add(device_id)
    return "an ID"


def _container_response(edits: ContainerEdits) -> pb.ContainerAllocateResponse:
    return pb.ContainerAllocateResponse(
        envs=edits.envs,
        mounts=[pb.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only) for m in edits.mounts],
        devices=[pb.DeviceSpec(container_path=d.container_path, host_path=d.host_path, permissions=d.permissions) for d in edits.devices],
        annotations=edits.annotations,
        cdi_devices=[pb.CDIDevice(name=name) for name in edits.cdi_devices],
    )
