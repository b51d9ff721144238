"""One DevicePlugin gRPC server per resource, each on its own unix socket.

The server holds the resource's latest device list, fans it out to every open
ListAndWatch stream, and checks every Allocate before the driver sees it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import grpc

from nodedev.api import deviceplugin_pb2 as pb
from nodedev.api import deviceplugin_pb2_grpc as pb_grpc
from nodedev import metrics
from nodedev.driver import Allocation, AllocationError, Device, Driver, Health

log = logging.getLogger("nodedev.server")

STOP_GRACE_S = 0.5
MAX_SOCKET_PATH = 107
"""sun_path holds 108 bytes with the terminating NUL; the kubelet could not dial a longer path either."""


class ServeError(Exception):
    """A resource's socket cannot be served; the message names the resource and the path."""


def socket_name(resource: str) -> str:
    """`devices.kubevirt.io/kvm` -> `nodedev-devices.kubevirt.io_kvm.sock`: unique and path-safe."""
    return "nodedev-" + re.sub(r"[^A-Za-z0-9.-]", "_", resource) + ".sock"


def _kubelet_view(devices: Mapping[str, Device]) -> list[tuple[str, str, tuple[int, ...]]]:
    """What the kubelet sees of a list; reasons are ours alone and never cause an update."""
    return sorted((d.id, d.health.value, d.numa_nodes) for d in devices.values())


class ResourceServer(pb_grpc.DevicePluginServicer):
    def __init__(self, resource: str, driver: Driver, plugin_dir: Path) -> None:
        self.resource = resource
        self.driver = driver
        self.endpoint = socket_name(resource)
        self.socket_path = plugin_dir / self.endpoint
        self.devices: Mapping[str, Device] = {}
        self.version = 0
        self._view: list[tuple[str, str, tuple[int, ...]]] = []
        self._response = pb.ListAndWatchResponse()
        self._changed = asyncio.Event()
        """Set, and replaced, at every new version: each stream waits on the one it saw."""
        self._server: grpc.aio.Server | None = None
        self._closing = False
        self._generation = 0
        """Bumped at every start: a stream from before a restart ends instead of carrying on."""
        self._inode: int | None = None
        self._allocated_ok = metrics.ALLOCATIONS.labels(resource, "ok")
        self.options = pb.DevicePluginOptions(
            pre_start_required=driver.implements("pre_start"),
            get_preferred_allocation_available=driver.implements("preferred_allocation"),
        )

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Serves on the socket, replacing a stale file left there by an earlier run."""
        length = len(os.fsencode(self.socket_path))
        if length > MAX_SOCKET_PATH:
            raise ServeError(f"{self.resource}: socket path {self.socket_path} is {length} bytes, unix sockets allow {MAX_SOCKET_PATH}")
        try:
            self.socket_path.unlink(missing_ok=True)
        except OSError as err:
            raise ServeError(f"{self.resource}: cannot replace {self.socket_path}: {err.strerror}") from None
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_DevicePluginServicer_to_server(self, server)
        try:
            server.add_insecure_port(f"unix://{self.socket_path}")
        except RuntimeError:
            raise ServeError(f"{self.resource}: cannot listen on {self.socket_path}") from None
        await server.start()
        self._generation += 1
        self._closing = False
        os.chmod(self.socket_path, 0o600)
        self._inode = self.socket_path.stat().st_ino
        self._server = server
        log.debug("%s: serving on %s", self.resource, self.socket_path)

    async def stop(self) -> None:
        """Ends every stream cleanly, stops serving, and removes our socket if it is still ours."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        self._wake()
        await server.stop(STOP_GRACE_S)
        if self.socket_present():
            self.socket_path.unlink(missing_ok=True)
        self._inode = None

    def socket_present(self) -> bool:
        """Whether the socket file we bound is still there (the kubelet wipes the directory)."""
        try:
            return self._inode is not None and self.socket_path.stat().st_ino == self._inode
        except FileNotFoundError:
            return False

    @property
    def serving(self) -> bool:
        return self._server is not None

    # --- updates from the inventory ---------------------------------------------

    def update(self, devices: Mapping[str, Device]) -> None:
        """Takes the full list; wakes the streams only when the kubelet's view changed."""
        self.devices = devices
        for health in Health:
            metrics.DEVICES.labels(self.resource, health.value).set(sum(d.health is health for d in devices.values()))
        view = _kubelet_view(devices)
        if view == self._view and self.version > 0:
            return
        self._view = view
        self._response = pb.ListAndWatchResponse(
            devices=[
                pb.Device(
                    ID=device_id,
                    health=health,
                    topology=pb.TopologyInfo(nodes=[pb.NUMANode(ID=n) for n in numa]) if numa else None,
                )
                for device_id, health, numa in view
            ]
        )
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
        generation = self._generation
        while not self._closing and generation == self._generation:
            if self.version == sent:
                await self._changed.wait()
                continue
            sent = self.version
            yield self._response

    async def Allocate(self, request: pb.AllocateRequest, context: grpc.aio.ServicerContext) -> pb.AllocateResponse:
        containers = [list(c.devices_ids) for c in request.container_requests]
        if problem := self._check_ids([i for ids in containers for i in ids]):
            await self._refuse(context, "refused", grpc.StatusCode.INVALID_ARGUMENT, problem)
        responses = []
        for ids in containers:
            try:
                allocation = self.driver.allocate(self.resource, ids)
            except AllocationError as err:
                await self._refuse(context, "refused", grpc.StatusCode.INVALID_ARGUMENT, f"{self.resource}: {err}")
            except Exception as err:  # noqa: BLE001 - a driver bug fails this pod, not the daemon
                log.exception("%s: allocate %s failed", self.resource, ids)
                await self._refuse(context, "failed", grpc.StatusCode.INTERNAL, f"{self.resource}: allocate failed: {err}")
            responses.append(_container_response(allocation))
        self._allocated_ok.inc()
        return pb.AllocateResponse(container_responses=responses)

    async def _refuse(self, context: grpc.aio.ServicerContext, result: str, code: grpc.StatusCode, message: str) -> None:
        log.warning("%s", message)
        metrics.ALLOCATIONS.labels(self.resource, result).inc()
        await context.abort(code, message)

    async def GetPreferredAllocation(
        self, request: pb.PreferredAllocationRequest, context: grpc.aio.ServicerContext
    ) -> pb.PreferredAllocationResponse:
        if not self.options.get_preferred_allocation_available:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{self.resource}: no preferred allocation")
        responses = []
        for req in request.container_requests:
            available, required = list(req.available_deviceIDs), list(req.must_include_deviceIDs)
            if problem := _preferred_problem(available, required, req.allocation_size):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.resource}: {problem}")
            try:
                chosen = self.driver.preferred_allocation(self.resource, available, required, req.allocation_size)
            except AllocationError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.resource}: {err}")
            responses.append(pb.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return pb.PreferredAllocationResponse(container_responses=responses)

    async def PreStartContainer(
        self, request: pb.PreStartContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.PreStartContainerResponse:
        if self.options.pre_start_required:
            ids = list(request.devices_ids)
            if problem := self._check_ids(ids):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            try:
                await asyncio.to_thread(self.driver.pre_start, self.resource, ids)
            except Exception as err:  # noqa: BLE001 - reported to the kubelet, which fails the pod
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.resource}: pre-start of {ids} failed: {err}")
        return pb.PreStartContainerResponse()

    def _check_ids(self, ids: Sequence[str]) -> str | None:
        seen: set[str] = set()
        for device_id in ids:
            device = self.devices.get(device_id)
            if device is None:
                return f"{self.resource}: unknown device {device_id!r}"
            if not device.healthy:
                why = f": {device.reason}" if device.reason else ""
                return f"{self.resource}: device {device_id!r} is Unhealthy{why}"
            if device_id in seen:
                return f"{self.resource}: device {device_id!r} is requested more than once"
            seen.add(device_id)
        return None


def _preferred_problem(available: list[str], required: list[str], size: int) -> str | None:
    if size < 1 or size > len(available):
        return f"allocation size {size} is not between 1 and the {len(available)} available devices"
    if missing := [i for i in required if i not in set(available)]:
        return f"must-include devices {missing} are not among the available ones"
    if len(required) > size:
        return f"{len(required)} must-include devices exceed the allocation size {size}"
    return None


def _container_response(allocation: Allocation) -> pb.ContainerAllocateResponse:
    return pb.ContainerAllocateResponse(
        envs=allocation.envs,
        mounts=[pb.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only) for m in allocation.mounts],
        devices=[pb.DeviceSpec(container_path=d.container_path, host_path=d.host_path, permissions=d.permissions) for d in allocation.devices],
        annotations=allocation.annotations,
        cdi_devices=[pb.CDIDevice(name=name) for name in allocation.cdi_devices],
    )
