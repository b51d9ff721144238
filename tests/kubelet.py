"""A kubelet double: the device manager's side of the wire, for end-to-end tests.

It behaves as the kubelet does (see shared/spec/kubelet-device-plugin-api.md):
serves Registration on kubelet.sock; refuses a wrong version or a resource name
that is not an extended resource; dials the plugin's socket *before* answering
Register (so a plugin that registers before serving fails); calls
GetDevicePluginOptions; keeps one ListAndWatch stream per resource and records
every list; a second Register for a resource replaces the first endpoint;
restart() wipes the directory (every file but the checkpoint; directories
are spared, as the kubelet spares them) and serves a new kubelet.sock.
Everything a test waits for goes through `wait`, with a timeout.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from nodedev.api import deviceplugin_pb2 as pb
from nodedev.api import deviceplugin_pb2_grpc as pb_grpc

CHECKPOINT = "kubelet_internal_checkpoint"
DeviceView = dict[str, tuple[str, tuple[int, ...]]]
"""Device ID -> (health, NUMA nodes), as one ListAndWatch message said."""

_QUALIFIED = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def is_extended_resource_name(name: str) -> bool:
    """The kubelet's IsExtendedResourceName, written independently of nodedev's check."""
    if "/" not in name or "kubernetes.io/" in name or name.startswith("requests."):
        return False
    domain, short = name.split("/", 1)
    return bool(_SUBDOMAIN.match(domain)) and len(short) <= 63 and bool(_QUALIFIED.match(short))


@dataclass(frozen=True)
class RegisterRecord:
    """One Register as the kubelet saw it: for which incarnation, and whether the plugin's
    socket existed and answered at that moment (a Register for a dead socket is a bug)."""

    resource: str
    incarnation: int
    socket_existed: bool
    accepted: bool


@dataclass
class Endpoint:
    resource: str
    socket: str
    channel: grpc.Channel
    options: pb.DevicePluginOptions
    lists: list[DeviceView] = field(default_factory=list)
    ended: bool = False


class KubeletDouble:
    def __init__(self, plugin_dir: Path, dial_timeout: float = 10.0) -> None:
        self.plugin_dir = plugin_dir
        self.socket = plugin_dir / "kubelet.sock"
        self.dial_timeout = dial_timeout
        self.registrations: list[pb.RegisterRequest] = []
        self.register_log: list[RegisterRecord] = []
        self.rejections: list[str] = []
        self.endpoints: dict[str, Endpoint] = {}
        self.history: dict[str, list[DeviceView]] = {}
        self.restarts = 0
        self._lives = 0
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        server = grpc.server(ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_RegistrationServicer_to_server(_Registration(self), server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server

    def stop(self) -> None:
        with self._cond:
            self._lives += 1  # from here on, handlers still running belong to a dead kubelet
        if self._server is not None:
            self._server.stop(0).wait(5)
            self._server = None
        with self._cond:
            endpoints, self.endpoints = list(self.endpoints.values()), {}
        for endpoint in endpoints:
            endpoint.channel.close()

    def restart(self, *, wipe: bool = True) -> None:
        """What a restarting kubelet does: forget plugins, wipe sockets, serve a new kubelet.sock.

        `wipe=False` replaces only kubelet.sock, leaving the plugins' sockets: a kubelet
        started with a cleanup that did not reach them must still get every resource back.
        """
        self.stop()
        for entry in self.plugin_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                continue  # the kubelet spares directories (nodedev keeps its status socket in one)
            if entry.name != CHECKPOINT and (wipe or entry.name == self.socket.name):
                entry.unlink(missing_ok=True)
        with self._cond:
            self.restarts += 1
        self.start()

    # --- what tests look at ------------------------------------------------------

    def wait(self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"kubelet double: timed out after {timeout} s waiting for {what}")
                self._cond.wait(left)

    def devices(self, resource: str) -> DeviceView | None:
        """The latest list the current endpoint of `resource` sent, if it is registered and streaming."""
        with self._cond:
            endpoint = self.endpoints.get(resource)
            if endpoint is None or endpoint.ended or not endpoint.lists:
                return None
            return endpoint.lists[-1]

    def updates(self, resource: str) -> list[DeviceView]:
        """Every list received for `resource`, across endpoints, in order."""
        with self._cond:
            return list(self.history.get(resource, []))

    def streaming(self) -> set[str]:
        with self._cond:
            return {r for r, e in self.endpoints.items() if not e.ended and e.lists}

    def registration_count(self, resource: str) -> int:
        with self._cond:
            return sum(1 for r in self.registrations if r.resource_name == resource)

    def stub(self, resource: str) -> pb_grpc.DevicePluginStub:
        with self._cond:
            return pb_grpc.DevicePluginStub(self.endpoints[resource].channel)

    def options(self, resource: str) -> pb.DevicePluginOptions:
        with self._cond:
            return self.endpoints[resource].options

    # --- the Registration service ------------------------------------------------

    def _register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.Empty:
        with self._cond:
            incarnation, life = self.restarts, self._lives
        existed = "/" not in request.endpoint and (self.plugin_dir / request.endpoint).exists()
        try:
            result = self._accept(request, context, incarnation)
        except BaseException:
            self._record(request.resource_name, incarnation, life, existed, accepted=False)
            raise
        self._record(request.resource_name, incarnation, life, existed, accepted=True)
        return result

    def _record(self, resource: str, incarnation: int, life: int, existed: bool, *, accepted: bool) -> None:
        """Records a Register, unless this kubelet was stopped while handling it: a real
        kubelet's process is gone by then, and the wipe that follows a stop is not ours to judge."""
        with self._cond:
            if life != self._lives:
                return
            self.register_log.append(RegisterRecord(resource, incarnation, existed, accepted))
            self._cond.notify_all()

    def _accept(self, request: pb.RegisterRequest, context: grpc.ServicerContext, incarnation: int) -> pb.Empty:
        """The kubelet's checks and dial-back. A handler still running when its kubelet was
        restarted is a dead process's work: it records nothing in the new incarnation."""
        if request.version != "v1beta1":
            self._reject(context, f"unsupported API version {request.version!r}")
        if not is_extended_resource_name(request.resource_name):
            self._reject(context, f"invalid extended resource name {request.resource_name!r}")
        if "/" in request.endpoint:
            self._reject(context, f"endpoint {request.endpoint!r} must be a file name in the plugin directory")
        channel = grpc.insecure_channel(f"unix://{self.plugin_dir / request.endpoint}")
        try:
            grpc.channel_ready_future(channel).result(timeout=self.dial_timeout)
            options = pb_grpc.DevicePluginStub(channel).GetDevicePluginOptions(pb.Empty(), timeout=5)
        except (grpc.FutureTimeoutError, grpc.RpcError) as err:
            channel.close()
            self._reject(context, f"cannot dial plugin at {request.endpoint}: {err!r}", incarnation)
        endpoint = Endpoint(request.resource_name, request.endpoint, channel, options)
        with self._cond:
            if incarnation != self.restarts:
                channel.close()
                context.abort(grpc.StatusCode.UNAVAILABLE, "kubelet restarted while registering")
            self.registrations.append(request)
            previous = self.endpoints.get(request.resource_name)
            self.endpoints[request.resource_name] = endpoint
            self._cond.notify_all()
        if previous is not None:
            previous.channel.close()
        threading.Thread(target=self._watch, args=(endpoint,), daemon=True).start()
        return pb.Empty()

    def _reject(self, context: grpc.ServicerContext, message: str, incarnation: int | None = None) -> None:
        with self._cond:
            if incarnation is None or incarnation == self.restarts:
                self.rejections.append(message)
                self._cond.notify_all()
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    def _watch(self, endpoint: Endpoint) -> None:
        try:
            for response in pb_grpc.DevicePluginStub(endpoint.channel).ListAndWatch(pb.Empty()):
                view = {d.ID: (d.health, tuple(n.ID for n in d.topology.nodes)) for d in response.devices}
                with self._cond:
                    endpoint.lists.append(view)
                    self.history.setdefault(endpoint.resource, []).append(view)
                    self._cond.notify_all()
        except (grpc.RpcError, ValueError):  # ValueError: the channel was closed by a re-registration
            pass
        finally:
            with self._cond:
                endpoint.ended = True
                self._cond.notify_all()


class _Registration(pb_grpc.RegistrationServicer):
    def __init__(self, kubelet: KubeletDouble) -> None:
        self.kubelet = kubelet

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.Empty:
        return self.kubelet._register(request, context)
