"""Devices in use: a device a pod holds is not handed to a second pod when it moves.

A driver's snapshot says where each device belongs *now*. When a device leaves a
resource's list while a pod holds it (a function rebound from its kernel driver
to vfio-pci moves from one resource to another, often through "no driver" on
the way), offering it under its new resource would let the kubelet give it to a
second pod. So before a driver's new snapshot is applied, the host asks the
kubelet's pod-resources API (v1 `List`) which (resource, device ID) pairs pods
hold, and a held device that left its resource

  * stays listed under that resource as Unhealthy, with the reason
    "moved while in use by <namespace>/<pod>", and
  * is dropped from every other resource of the same driver,

until `List` no longer shows it held; then the next scan lets it go, and it
appears where the driver now puts it. While some device is kept this way the
host polls `List` every `POLL_S` and rescans the driver whose kept devices were
released. The kubelet is asked only when it matters (a device left a resource,
or a kept device exists), so ordinary scans cost nothing more.

The socket is the kubelet's, next to its device-plugin directory:
`<dirname(pluginDir)>/pod-resources/kubelet.sock`
(`/var/lib/kubelet/pod-resources/kubelet.sock` by default). When it is absent
the host says so once and carries on without it. When `List` cannot be had
(absent, failing, slow), devices already kept stay kept (nobody said they were
released) and devices leaving now are let go (nobody said they are held).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nodedev.driver import Device, Health

log = logging.getLogger("nodedev.podresources")

LIST_TIMEOUT_S = 1.0
"""How long one `List` may take; a slow kubelet delays only the scan that needed it."""
POLL_S = 1.0
"""How often `List` is asked while a moved device is held (the kubelet allows 100/s)."""
MAX_MESSAGE_BYTES = 16 << 20
"""A `List` answer on a busy node (hundreds of pods, CPU IDs, memory) can pass gRPC's 4 MiB default."""

Key = tuple[str, str]
"""(resource, device ID)."""
Held = Mapping[Key, str]
"""(resource, device ID) -> "<namespace>/<pod>" holding it."""
Devices = dict[str, dict[str, Device]]
"""Resource -> device ID -> device: one driver's checked snapshot."""


def socket_path(plugin_dir: Path) -> Path:
    """The kubelet's pod-resources socket beside its device-plugin directory."""
    return Path(plugin_dir).parent / "pod-resources" / "kubelet.sock"


# --- the rule ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kept:
    """A held device kept under the resource it left: as the driver last offered it there."""

    device: Device
    holder: str


def left(old: Mapping[str, Mapping[str, Device]], new: Mapping[str, Mapping[str, Device]]) -> bool:
    """Whether any device of `old` is missing from its resource in `new` (the only case
    in which pod-resources is asked, besides devices already kept)."""
    for resource, devices in old.items():
        fresh = new.get(resource)
        if devices and (fresh is None or not devices.keys() <= fresh.keys()):
            return True
    return False


def hold_moved(old: Mapping[str, Mapping[str, Device]], new: Devices, kept: Mapping[Key, Kept], held: Held | None) -> tuple[Devices, dict[Key, Kept]]:
    """Applies the rule to one driver's snapshot; returns (what to publish, what is kept now).

    `old` is what was published last (kept devices included), `new` the driver's
    checked snapshot, `kept` the devices kept so far, `held` what `List` says
    (None: unknown, so what is kept stays kept and nothing new is kept).
    """
    candidates: dict[Key, Kept] = {}
    for key, entry in kept.items():
        resource, device_id = key
        if device_id not in new.get(resource, {}):  # back under its resource: nothing to keep
            candidates[key] = entry
    for resource, devices in old.items():
        fresh = new.get(resource, {})
        for device_id, device in devices.items():
            key = (resource, device_id)
            if device_id not in fresh and key not in kept:
                candidates[key] = Kept(device, "")
    if held is None:
        still = {key: entry for key, entry in candidates.items() if key in kept}
    else:
        still = {key: Kept(entry.device, held[key]) for key, entry in candidates.items() if key in held}
    if not still:
        return new, {}
    result = {resource: dict(devices) for resource, devices in new.items()}
    for (resource, device_id), entry in still.items():
        elsewhere = [r for r, devices in new.items() if r != resource and device_id in devices]
        for other in elsewhere:
            del result[other][device_id]
        now = f"now under {', '.join(elsewhere)}, offered there once released" if elsewhere else "in no resource now"
        reason = f"moved while in use by {entry.holder}: {now}"
        result.setdefault(resource, {})[device_id] = replace(entry.device, health=Health.UNHEALTHY, reason=reason)
    return result, still


# --- the kubelet's side ----------------------------------------------------------


class PodResourcesClient:
    """Asks the kubelet's `List`; says once when the socket is absent or failing."""

    def __init__(self, path: Path, timeout: float = LIST_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout
        self.calls = 0
        self._state = "unknown"  # absent | failing | answering: logged once per change

    def _say(self, state: str, level: int, message: str, *args: object) -> None:
        if state != self._state:
            self._state = state
            log.log(level, message, *args)

    async def held(self) -> dict[Key, str] | None:
        """(resource, device ID) -> "<namespace>/<pod>" for every device a running pod
        holds; None when the kubelet cannot say (socket absent, error, timeout)."""
        if not os.path.exists(self.path):
            self._say("absent", logging.INFO, "pod-resources socket %s is absent; devices in use are not protected when they move", self.path)
            return None
        import grpc  # only once a device moves: discover and most scans never need it

        from nodedev.api import podresources_pb2 as pr
        from nodedev.api import podresources_pb2_grpc as pr_grpc

        self.calls += 1
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        try:
            async with grpc.aio.insecure_channel(f"unix://{self.path}", options=options) as channel:
                stub: Any = pr_grpc.PodResourcesListerStub(channel)  # type: ignore[no-untyped-call]
                response = await stub.List(pr.ListPodResourcesRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            self._say("failing", logging.WARNING, "pod-resources List at %s failed: %s: %s", self.path, err.code().name, err.details())
            return None
        except Exception as err:  # noqa: BLE001 - whatever goes wrong here, the scan that asked must go on
            self._say("failing", logging.WARNING, "pod-resources List at %s failed: %s: %s", self.path, type(err).__name__, err)
            return None
        self._say("answering", logging.INFO, "pod-resources List answering at %s", self.path)
        held: dict[Key, str] = {}
        for pod in response.pod_resources:
            holder = f"{pod.namespace}/{pod.name}"
            for container in pod.containers:
                for devices in container.devices:
                    for device_id in devices.device_ids:
                        held.setdefault((devices.resource_name, device_id), holder)
        return held


class InUse:
    """The rule for every driver: what each keeps, and the poll that notices releases."""

    def __init__(self, client: PodResourcesClient, rescan: Callable[[str], None], poll_s: float = POLL_S) -> None:
        self.client = client
        self.rescan = rescan
        self.poll_s = poll_s
        self.kept: dict[str, dict[Key, Kept]] = {}
        self._poll: asyncio.Task[None] | None = None
        self._closed = False

    async def settle(self, driver: str, old: Mapping[str, Mapping[str, Device]], new: Devices, served: Collection[str]) -> Devices:
        """What to publish for `driver`'s new snapshot: `new` itself unless a device left a
        resource or one is kept, in which case the kubelet is asked who holds what.

        `served` are the resources `driver` owns now: a device kept under a resource it
        no longer serves (a config reload renamed it) goes with that resource.
        """
        kept = {key: entry for key, entry in self.kept.get(driver, {}).items() if key[0] in served}
        if not kept and not left(old, new):
            return new
        held = await self.client.held()
        result, now = hold_moved(old, new, kept, held)
        for (resource, device_id), entry in now.items():
            if (resource, device_id) not in kept:
                log.warning("driver %s: %s left %s while in use by %s; kept there as Unhealthy until released", driver, device_id, resource, entry.holder)
        for resource, device_id in kept.keys() - now.keys():
            why = "is back under it" if device_id in new.get(resource, {}) else f"was released by {kept[(resource, device_id)].holder}"
            log.info("driver %s: %s no longer kept under %s: it %s", driver, device_id, resource, why)
        if now:
            self.kept[driver] = now
            if not self._closed and (self._poll is None or self._poll.done()):
                self._poll = asyncio.create_task(self._poll_loop(), name="pod-resources-poll")
        else:
            self.kept.pop(driver, None)
        return result

    def forget(self, driver: str) -> None:
        """A driver removed or disabled by a reload: what it kept goes with its resources.
        A driver restarted with a changed section keeps it, so its first scan keeps it too."""
        self.kept.pop(driver, None)

    async def close(self) -> None:
        self._closed = True  # a scan still finishing during shutdown starts no new poll
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.gather(self._poll, return_exceptions=True)
            self._poll = None

    async def _poll_loop(self) -> None:
        """Every `poll_s` while something is kept: a driver whose kept devices the kubelet
        no longer lists as held is rescanned, and its scan lets them go."""
        while self.kept:
            await asyncio.sleep(self.poll_s)  # a polling period, not a wait for anything
            held = await self.client.held()
            if held is None:
                continue
            for driver, kept in list(self.kept.items()):
                if any(key not in held for key in kept):
                    self.rescan(driver)
