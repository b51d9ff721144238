"""One resource's gRPC server, in-process over a real unix socket, with a stand-in driver:
request checks, their cost at size, how errors echo IDs, and how edits are assembled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodedev.api import deviceplugin_pb2 as pb
from nodedev.api import deviceplugin_pb2_grpc as pb_grpc
from nodedev.driver import (
    AllocationError,
    ContainerEdits,
    Device,
    DeviceNode,
    Driver,
    DriverOptions,
    Health,
    HostContext,
    Mount,
    Snapshot,
)
from nodedev.server import ResourceServer, shown_id

RESOURCE = "example.com/thing"


class Stand(Driver[DriverOptions]):
    """Preferred allocation in linear time; refuses a request for `forbidden`."""

    name = "stand"

    def scan(self, changed: Collection[str] | None = None) -> Snapshot:
        return {}

    def allocate(self, resource: str, devices: Sequence[Device]) -> ContainerEdits:
        if any(d.id == "forbidden" for d in devices):
            raise AllocationError("forbidden is never handed out alone")
        return ContainerEdits(envs={"COUNT": str(len(devices))})

    def preferred_allocation(self, resource: str, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]:
        chosen = list(must_include)
        required = set(must_include)
        chosen += [i for i in available if i not in required][: size - len(chosen)]
        return chosen


def device(i: int | str, health: Health = Health.HEALTHY, **edits: Any) -> Device:
    name = i if isinstance(i, str) else f"d{i}"
    return Device(name, health, "reason" if health is Health.UNHEALTHY else "", edits=ContainerEdits(**edits))


class Served:
    def __init__(self, server: ResourceServer, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.stub = pb_grpc.DevicePluginStub(channel)

    async def allocate(self, *containers: list[str]) -> pb.AllocateResponse:
        request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=ids) for ids in containers])
        return await self.stub.Allocate(request, timeout=30)

    async def preferred(self, available: list[str], must: list[str], size: int) -> pb.PreferredAllocationResponse:
        request = pb.PreferredAllocationRequest(
            container_requests=[
                pb.ContainerPreferredAllocationRequest(available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size)
            ]
        )
        return await self.stub.GetPreferredAllocation(request, timeout=30)


@pytest.fixture
def socket_dir(plugin_dir: Path) -> Iterator[Path]:
    yield plugin_dir


def serve(socket_dir: Path, devices: list[Device], body: Any) -> Any:
    """Runs `body(served)` against a started server holding `devices`."""
    host = HostContext(Path("/sys"), Path("/dev"), Path("/proc"), lambda: None, __import__("logging").getLogger("test"))

    async def run() -> Any:
        server = ResourceServer(RESOURCE, Stand(DriverOptions(), host), socket_dir)
        server.update({d.id: d for d in devices})
        await server.start()
        try:
            options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
            async with grpc.aio.insecure_channel(f"unix://{server.socket_path}", options=options) as channel:
                return await body(Served(server, channel))
        finally:
            await server.stop()

    return asyncio.run(run())


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def test_edits_of_the_requested_devices_are_merged_in_request_order(socket_dir: Path) -> None:
    node = DeviceNode("/dev/thing", "/dev/thing")
    devices = [
        device(0, devices=[node], envs={"THING": "a", "MODE": "x"}, mounts=[Mount("/h0", "/c")]),
        device(1, devices=[node], envs={"THING": "b", "MODE": "x"}, mounts=[Mount("/h1", "/c")], cdi_devices=["v/c=1"]),
        device(2, envs={"THING": "c"}),
    ]

    async def body(served: Served) -> pb.AllocateResponse:
        return await served.allocate(["d1", "d0"], ["d2"])

    response = serve(socket_dir, devices, body)
    first, second = response.container_responses
    assert dict(first.envs) == {"THING": "b,a", "MODE": "x", "COUNT": "2"}
    assert [(d.host_path, d.permissions) for d in first.devices] == [("/dev/thing", "rw")]
    assert [(m.host_path, m.container_path) for m in first.mounts] == [("/h1", "/c")]
    assert [c.name for c in first.cdi_devices] == ["v/c=1"]
    assert dict(second.envs) == {"THING": "c", "COUNT": "1"}


@pytest.mark.parametrize(
    ("containers", "message"),
    [
        ([[]], f"{RESOURCE}: a container request names no device"),
        ([], f"{RESOURCE}: the request names no container"),
        ([["d0"], ["d1", "d0"]], f"{RESOURCE}: device 'd0' is requested more than once"),
        ([["d9"]], f"{RESOURCE}: unknown device 'd9'"),
        ([["sick"]], f"{RESOURCE}: device 'sick' is Unhealthy: reason"),
        ([["forbidden"]], f"{RESOURCE}: forbidden is never handed out alone"),
        ([["d0", "d1", "d2", "d0", "d1"]], f"{RESOURCE}: the request names 5 devices, but the resource has 4"),
    ],
)
def test_bad_allocate_requests_are_invalid_argument_naming_the_id(socket_dir: Path, containers: list[list[str]], message: str) -> None:
    devices = [device(0), device(1), device("sick", Health.UNHEALTHY), device("forbidden")]

    async def body(served: Served) -> grpc.aio.AioRpcError:
        return await refused(served.allocate(*containers))

    error = serve(socket_dir, devices, body)
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)


def test_a_huge_id_is_echoed_short_and_refused_as_invalid_argument(socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    huge = "x" * 1_000_000

    async def body(served: Served) -> grpc.aio.AioRpcError:
        return await refused(served.allocate([huge]))

    error = serve(socket_dir, [device(0)], body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"{RESOURCE}: unknown device {shown_id(huge)}"
    assert len(error.details()) < 200
    assert max(len(r.getMessage()) for r in caplog.records) < 200


def test_preferred_allocation_of_forty_thousand_ids_is_linear_and_never_stalls_allocate(socket_dir: Path) -> None:
    count = 40_000
    devices = [device(i) for i in range(count)]
    ids = [d.id for d in devices]

    async def body(served: Served) -> tuple[float, float, list[str]]:
        began = time.monotonic()
        big = asyncio.create_task(served.preferred(ids, ids, count))
        delays = []
        while not big.done():
            sent = time.monotonic()
            await served.allocate(["d1"])
            delays.append(time.monotonic() - sent)
        response = await big
        return time.monotonic() - began, max(delays), list(response.container_responses[0].deviceIDs)

    took, worst, chosen = serve(socket_dir, devices, body)
    assert chosen == ids
    assert took < 5, f"40,000 must-include IDs took {took:.1f} s"
    assert worst < 0.1, f"a small Allocate waited {worst * 1000:.0f} ms behind the big request"


@pytest.mark.parametrize(
    ("available", "must", "size", "message"),
    [
        (["d0", "d1", "d2"], [], 2, f"{RESOURCE}: 3 available devices named, but the resource has 2"),
        (["d0", "d0"], [], 1, f"{RESOURCE}: 'd0' listed more than once among the available devices"),
        (["d0", "zz"], [], 1, f"{RESOURCE}: unknown available device(s) 'zz'"),
        (["d0"], ["d1"], 1, f"{RESOURCE}: must-include device(s) 'd1' are not among the available ones"),
        (["d0", "d1"], ["d0", "d1"], 1, f"{RESOURCE}: 2 must-include devices exceed the allocation size 1"),
        (["d0", "d1"], [], 3, f"{RESOURCE}: allocation size 3 is not between 1 and the 2 available devices"),
        (["d0", "d1"], [], 0, f"{RESOURCE}: allocation size 0 is not between 1 and the 2 available devices"),
    ],
)
def test_bad_preferred_allocation_requests_are_refused_at_once(
    socket_dir: Path, available: list[str], must: list[str], size: int, message: str
) -> None:
    async def body(served: Served) -> grpc.aio.AioRpcError:
        return await refused(served.preferred(available, must, size))

    error = serve(socket_dir, [device(0), device(1)], body)
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)


def test_a_request_naming_more_ids_than_exist_is_refused_without_looking_at_them(socket_dir: Path) -> None:
    flood = [f"x{i}" for i in range(200_000)]

    async def body(served: Served) -> tuple[float, grpc.aio.AioRpcError]:
        began = time.monotonic()
        error = await refused(served.allocate(flood))
        return time.monotonic() - began, error

    took, error = serve(socket_dir, [device(0)], body)
    assert error.details() == f"{RESOURCE}: the request names 200000 devices, but the resource has 1"
    assert took < 2
