"""A kubelet double: the device manager's side of the wire, for end-to-end tests.

It behaves as the kubelet does (see shared/spec/kubelet-device-plugin-api.md):
serves Registration on kubelet.sock; refuses a wrong version or a resource name
that is not an extended resource; dials the plugin's socket *before* answering
Register (so a plugin that registers before serving fails); calls
GetDevicePluginOptions; keeps one ListAndWatch stream per resource and records
every list; a second Register for a resource replaces the first endpoint;
restart() wipes the directory (every file but the checkpoint; directories
are spared, as the kubelet spares them) and serves a new kubelet.sock.

Given a `registry` (plugins_registry), it also runs the kubelet's plugin
watcher: an inotify watch on that directory, then a walk of what is already
there (so a restarted kubelet finds the sockets a restart does not wipe). Each
socket created is dialled in a worker: GetInfo, the checks the kubelet makes
(type DevicePlugin, v1beta1 among the versions, an extended resource name, an
absolute endpoint), the device-plugin service dialled at that endpoint
(GetDevicePluginOptions, then ListAndWatch, as for Register), and
NotifyRegistrationStatus with the outcome. A socket removed is deregistered
(its stream closed). A refused socket is not tried again until it is created
again: the kubelet also retries on its own backoff (500 ms growing to two
minutes), which the double leaves out, so a plugin must recover by itself.
`refuse` holds reasons the device manager gives for the next registrations.
Everything a test waits for goes through `wait`, with a timeout.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from nodedev.api import deviceplugin_pb2 as pb
from nodedev.api import deviceplugin_pb2_grpc as pb_grpc
from nodedev.api import pluginregistration_pb2 as pr
from nodedev.api import pluginregistration_pb2_grpc as pr_grpc

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


@dataclass(frozen=True)
class PluginRecord:
    """One socket the plugin watcher handled: what GetInfo named, and what it was told."""

    socket: str
    name: str
    incarnation: int
    registered: bool
    error: str


@dataclass
class Endpoint:
    resource: str
    socket: str
    channel: grpc.Channel
    options: pb.DevicePluginOptions
    lists: list[DeviceView] = field(default_factory=list)
    ended: bool = False


class KubeletDouble:
    def __init__(self, plugin_dir: Path, dial_timeout: float = 10.0, registry: Path | None = None) -> None:
        self.plugin_dir = plugin_dir
        self.registry = registry
        self.plugin_log: list[PluginRecord] = []
        self.refuse: list[str] = []
        """Reasons to refuse the next plugin-watcher registrations with, one each (under `_cond`)."""
        self._watcher: _PluginWatcher | None = None
        self.socket = plugin_dir / "kubelet.sock"
        self.dial_timeout = dial_timeout
        self.registrations: list[pb.RegisterRequest] = []
        self.register_log: list[RegisterRecord] = []
        self.rejections: list[str] = []
        self.endpoints: dict[str, Endpoint] = {}
        self.history: dict[str, list[DeviceView]] = {}
        self.arrivals: dict[str, list[float]] = {}
        """`time.perf_counter()` at which each list in `history` came off the wire, before this
        double turned it into a view (which, in Python, takes longer than the kubelet's Go)."""
        self.restarts = 0
        self._lives = 0
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        server = grpc.server(ThreadPoolExecutor(max_workers=16))
        with self._cond:
            born = (self.restarts, self._lives)
        pb_grpc.add_RegistrationServicer_to_server(_Registration(self, born), server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        if self.registry is not None:  # after kubelet.sock, as the kubelet starts its device manager first
            with self._cond:
                incarnation, life = self.restarts, self._lives
            self._watcher = _PluginWatcher(self, self.registry, incarnation, life)

    def stop(self) -> None:
        with self._cond:
            self._lives += 1  # from here on, handlers still running belong to a dead kubelet
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
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

    def timed_updates(self, resource: str) -> list[tuple[float, DeviceView]]:
        """Every list received for `resource`, with when it came off the wire (see `arrivals`)."""
        with self._cond:
            return list(zip(self.arrivals.get(resource, []), self.history.get(resource, []), strict=True))

    def updates(self, resource: str) -> list[DeviceView]:
        """Every list received for `resource`, across endpoints, in order."""
        with self._cond:
            return list(self.history.get(resource, []))

    def streaming(self) -> set[str]:
        with self._cond:
            return {r for r, e in self.endpoints.items() if not e.ended and e.lists}

    def registration_count(self, resource: str) -> int:
        """Registrations the kubelet accepted, by Register or by its plugin watcher."""
        with self._cond:
            watched = sum(1 for r in self.plugin_log if r.name == resource and r.registered)
            return watched + sum(1 for r in self.registrations if r.resource_name == resource)

    def plugins(self, resource: str, *, incarnation: int | None = None) -> list[PluginRecord]:
        """What the plugin watcher did with `resource`'s sockets (in one kubelet's life, if given)."""
        with self._cond:
            return [r for r in self.plugin_log if r.name == resource and incarnation in (None, r.incarnation)]

    def stub(self, resource: str) -> pb_grpc.DevicePluginStub:
        with self._cond:
            return pb_grpc.DevicePluginStub(self.endpoints[resource].channel)

    def options(self, resource: str) -> pb.DevicePluginOptions:
        with self._cond:
            return self.endpoints[resource].options

    # --- the Registration service ------------------------------------------------

    def _register(self, request: pb.RegisterRequest, context: grpc.ServicerContext, born: tuple[int, int]) -> pb.Empty:
        """`born` is the incarnation and life of the server that took the call: a handler
        that only starts running after its server was stopped must not pass for the next one's."""
        incarnation, life = born
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

    # --- the plugin watcher ----------------------------------------------------------

    def _register_plugin(self, path: Path, incarnation: int, life: int) -> None:
        """The plugin watcher's registration of one socket, as the kubelet's reconciler does it."""
        channel = grpc.insecure_channel(f"unix://{path}")
        try:
            grpc.channel_ready_future(channel).result(timeout=self.dial_timeout)
            info = pr_grpc.RegistrationStub(channel).GetInfo(pr.InfoRequest(), timeout=5)
        except (grpc.FutureTimeoutError, grpc.RpcError) as err:
            channel.close()  # the kubelet cannot even tell the plugin: it logs and waits for a new socket
            self._record_plugin(PluginRecord(path.name, "", incarnation, False, f"GetInfo failed: {err!r}"), life)
            return
        endpoint = info.endpoint or str(path)
        error = self._validate_plugin(info, endpoint)
        if error is None:
            with self._cond:
                error = self.refuse.pop(0) if self.refuse else None
            if error is not None:
                error = f"RegisterPlugin error -- plugin registration failed with err: {error}"
        if error is None:
            error = self._connect_plugin(info.name, endpoint, incarnation)
        with self._cond:  # held, so a restart waits for the call: a stopped kubelet says nothing
            if life == self._lives:
                status = pr.RegistrationStatus(plugin_registered=error is None, error=error or "")
                try:
                    pr_grpc.RegistrationStub(channel).NotifyRegistrationStatus(status, timeout=5)
                except grpc.RpcError:
                    pass  # the kubelet only logs a failed notification
                self.plugin_log.append(PluginRecord(path.name, info.name, incarnation, error is None, error or ""))
                self._cond.notify_all()
        channel.close()

    @staticmethod
    def _validate_plugin(info: pr.PluginInfo, endpoint: str) -> str | None:
        """The plugin watcher's and the device manager's checks, with the kubelet's wording."""
        if info.type != "DevicePlugin":
            return f"RegisterPlugin error -- no handler registered for plugin type: {info.type}"
        if "v1beta1" not in info.supported_versions:
            problem = f"manager version, v1beta1, is not among plugin supported versions {list(info.supported_versions)}"
        elif not is_extended_resource_name(info.name):
            problem = f"invalid name of device plugin socket: {info.name!r} is not an extended resource name"
        elif not endpoint.startswith("/"):
            problem = f"endpoint {endpoint!r} is not an absolute socket path"
        else:
            return None
        return f"RegisterPlugin error -- plugin validation failed with err: {problem}"

    def _connect_plugin(self, resource: str, endpoint: str, incarnation: int) -> str | None:
        """The device manager's connectClient: dial, GetDevicePluginOptions, then the stream."""
        channel = grpc.insecure_channel(f"unix://{endpoint}")
        try:
            grpc.channel_ready_future(channel).result(timeout=self.dial_timeout)
            options = pb_grpc.DevicePluginStub(channel).GetDevicePluginOptions(pb.Empty(), timeout=5)
        except (grpc.FutureTimeoutError, grpc.RpcError) as err:
            channel.close()
            return f"RegisterPlugin error -- plugin registration failed with err: cannot dial {endpoint}: {err!r}"
        endpoint_ = Endpoint(resource, endpoint, channel, options)
        with self._cond:
            if incarnation != self.restarts:
                channel.close()
                return "kubelet restarted while registering"
            previous = self.endpoints.get(resource)
            self.endpoints[resource] = endpoint_
            self._cond.notify_all()
        if previous is not None:
            previous.channel.close()
        threading.Thread(target=self._watch, args=(endpoint_,), daemon=True).start()
        return None

    def _deregister_plugin(self, path: Path) -> None:
        """A socket removed from plugins_registry: the device manager disconnects its client."""
        with self._cond:
            gone = [r for r, e in self.endpoints.items() if e.socket == str(path)]
            closed = [self.endpoints.pop(r) for r in gone]
        for endpoint in closed:
            endpoint.channel.close()

    def _record_plugin(self, record: PluginRecord, life: int) -> None:
        with self._cond:
            if life == self._lives:  # a stopped kubelet's workers record nothing
                self.plugin_log.append(record)
                self._cond.notify_all()

    def _watch(self, endpoint: Endpoint) -> None:
        try:
            for response in pb_grpc.DevicePluginStub(endpoint.channel).ListAndWatch(pb.Empty()):
                arrived = time.perf_counter()
                view = {d.ID: (d.health, tuple(n.ID for n in d.topology.nodes)) for d in response.devices}
                with self._cond:
                    endpoint.lists.append(view)
                    self.history.setdefault(endpoint.resource, []).append(view)
                    self.arrivals.setdefault(endpoint.resource, []).append(arrived)
                    self._cond.notify_all()
        except (grpc.RpcError, ValueError):  # ValueError: the channel was closed by a re-registration
            pass
        finally:
            with self._cond:
                endpoint.ended = True
                self._cond.notify_all()


class _Registration(pb_grpc.RegistrationServicer):
    def __init__(self, kubelet: KubeletDouble, born: tuple[int, int]) -> None:
        self.kubelet = kubelet
        self.born = born

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.Empty:
        return self.kubelet._register(request, context, self.born)


_IN_CREATE, _IN_DELETE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x100, 0x200, 0x40, 0x80
_EVENT = struct.Struct("iIII")
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)


class _PluginWatcher:
    """The kubelet's plugin watcher: inotify on plugins_registry, then a walk of what is there.

    One thread reads events (select with a timeout, woken through a pipe to stop);
    registrations run in a pool, as the kubelet's reconciler runs them off the watcher.
    """

    def __init__(self, kubelet: KubeletDouble, registry: Path, incarnation: int, life: int) -> None:
        self.kubelet, self.registry, self.incarnation, self.life = kubelet, registry, incarnation, life
        registry.mkdir(parents=True, exist_ok=True)
        self._fd = _LIBC.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0 or _LIBC.inotify_add_watch(self._fd, os.fsencode(registry), _IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {registry}")
        self._wake_r, self._wake_w = os.pipe()
        self._pool = ThreadPoolExecutor(max_workers=4)
        self._seen: dict[str, tuple[int, int]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)

    def _run(self) -> None:
        for name in sorted(os.listdir(self.registry)):  # what a restarted kubelet finds already there
            self._found(name)
        while not self._stopping.is_set():
            ready, _, _ = select.select([self._fd, self._wake_r], [], [], 1.0)
            if self._fd not in ready:
                continue
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0").decode()
                offset += _EVENT.size + length
                if mask & (_IN_CREATE | _IN_MOVED_TO):
                    self._found(name)
                elif mask & (_IN_DELETE | _IN_MOVED_FROM) and self._seen.pop(name, None) is not None:
                    self.kubelet._deregister_plugin(self.registry / name)

    def _found(self, name: str) -> None:
        """A new file: a unix socket not hidden is a plugin to register (once per file)."""
        path = self.registry / name
        try:
            st = path.lstat()
        except OSError:
            return
        if name.startswith(".") or not stat.S_ISSOCK(st.st_mode) or self._seen.get(name) == (st.st_ino, st.st_ctime_ns):
            return
        self._seen[name] = (st.st_ino, st.st_ctime_ns)
        self._pool.submit(self.kubelet._register_plugin, path, self.incarnation, self.life)


class Lists:
    """Waits for the double's latest lists to read as expected after a change, timing each change."""

    def __init__(self, kubelet: KubeletDouble, timeout: float) -> None:
        self.kubelet = kubelet
        self.timeout = timeout
        self.took: dict[str, float] = {}

    def view(self, resource: str) -> dict[str, str] | None:
        """ID -> health of the latest list, or None while the resource is not streaming."""
        devices = self.kubelet.devices(resource)
        return None if devices is None else {i: h for i, (h, _numa) in devices.items()}

    def after(self, what: str, change: Callable[[], object], expected: Mapping[str, dict[str, str] | Callable[[], dict[str, str]]]) -> None:
        """Makes `change`, then waits for each resource's list; an expected list may be a
        function, for a list that names what `change` made."""
        started = time.perf_counter()
        change()
        wanted = {r: e() if callable(e) else e for r, e in expected.items()}
        try:
            self.kubelet.wait(lambda: all(self.view(r) == e for r, e in wanted.items()), timeout=self.timeout, what=what)
        except AssertionError as err:
            raise AssertionError(f"{err}; last lists: { {r: self.view(r) for r in wanted} }") from None
        self.took[what] = (time.perf_counter() - started) * 1000
