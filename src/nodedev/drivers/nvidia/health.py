"""GPU health: NVML events, the Xid policy, and the way back to Healthy.

One daemon thread blocks in `nvmlEventSetWait` (1 s at most, so stop() is
prompt) for critical Xids and double-bit ECC errors. Between waits it probes the
GPUs: a probe that fails marks a GPU Unhealthy (lost, fallen off the bus), and a
faulted GPU that probes fine and has had no critical event for the quiet period
is cleared. NVIDIA's plugin has no such path (its issues #189, #234, #1014):
there a GPU stays Unhealthy until the plugin restarts.

The thread never touches scan state. It writes faults into a `HealthBook` under
its lock and calls the host's thread-safe `rescan()`; scan() reads a frozen
`HealthView` and derives every device's health from it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nodedev.drivers.nvidia.options import HealthOptions

WHOLE_GPU = 0xFFFFFFFF
"""gpuInstanceId / computeInstanceId of an event that is not about one MIG device."""
EVENT_DBE = 0x2
EVENT_XID = 0x8
WATCHED_EVENTS = EVENT_XID | EVENT_DBE
MAX_WAIT_MS = 1000

MigKey = tuple[int, int] | None
"""(gpu instance, compute instance) of a fault on one MIG device; None for the whole GPU."""
FaultKey = tuple[MigKey, str]
"""Where a fault is and which source reported it ("event", "nvml", "watch", "monitor"):
a later report from one source replaces its earlier one but not the others'."""


@dataclass(frozen=True, slots=True)
class XidPolicy:
    """Which Xids make a device Unhealthy. `critical` wins over `ignored`."""

    enabled: bool
    ignored: frozenset[int]
    critical: frozenset[int]

    @classmethod
    def from_options(cls, options: HealthOptions) -> XidPolicy:
        return cls(
            enabled=options.enabled,
            ignored=frozenset(options.ignored_xids),
            critical=frozenset(options.critical_xids),
        )

    def is_critical(self, xid: int) -> bool:
        if not self.enabled:
            return False
        return xid in self.critical or xid not in self.ignored


def _join(reasons: list[str]) -> str:
    return "; ".join(dict.fromkeys(reasons))


@dataclass(frozen=True, slots=True)
class HealthView:
    """A frozen copy of the book, for one scan."""

    faults: Mapping[str, Mapping[FaultKey, str]] = field(default_factory=dict)
    down: str | None = None

    def gpu_problem(self, uuid: str) -> str | None:
        """Why the whole GPU is Unhealthy: any fault on it, MIG-level ones included,
        since a container given the whole GPU would use the faulted instance too."""
        reasons = [self.down] if self.down else []
        reasons += list(self.faults.get(uuid, {}).values())
        return _join(reasons) or None

    def mig_problem(self, uuid: str, gi: int, ci: int) -> str | None:
        """A MIG device is hit by faults on its whole GPU and by its own, not by its siblings'."""
        reasons = [self.down] if self.down else []
        reasons += [r for (mig, _), r in self.faults.get(uuid, {}).items() if mig is None or mig == (gi, ci)]
        return _join(reasons) or None


class HealthBook:
    """Faults per GPU, written by the event thread and scan(), read by scan()."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._faults: dict[str, dict[FaultKey, str]] = {}
        self._last_bad: dict[str, float] = {}
        self._down: str | None = None

    def record(self, uuid: str, reason: str, mig: MigKey = None, source: str = "event") -> bool:
        """Marks a fault and restarts the GPU's quiet period; True if what scan shows changed."""
        with self._lock:
            self._last_bad[uuid] = self._clock()
            faults = self._faults.setdefault(uuid, {})
            changed = faults.get((mig, source)) != reason
            faults[(mig, source)] = reason
            return changed

    def mark_down(self, reason: str) -> bool:
        with self._lock:
            changed = self._down != reason
            self._down = reason
            return changed

    def mark_up(self, uuids: list[str], reason: str) -> bool:
        """Monitoring works again; events may have been missed, so every GPU starts a quiet period."""
        with self._lock:
            now = self._clock()
            self._down = None
            for uuid in uuids:
                self._faults.setdefault(uuid, {})[(None, "monitor")] = reason
                self._last_bad[uuid] = now
            return True

    @property
    def down(self) -> str | None:
        with self._lock:
            return self._down

    def faulted(self) -> list[str]:
        with self._lock:
            return [uuid for uuid, faults in self._faults.items() if faults]

    def quiet_for(self, uuid: str) -> float:
        """Seconds since the GPU's last critical event or failed probe."""
        with self._lock:
            last = self._last_bad.get(uuid)
            return float("inf") if last is None else self._clock() - last

    def clear(self, uuid: str) -> bool:
        with self._lock:
            return bool(self._faults.pop(uuid, None))

    def view(self) -> HealthView:
        with self._lock:
            return HealthView(
                faults={uuid: dict(f) for uuid, f in self._faults.items() if f},
                down=self._down,
            )


def handle_address(handle: Any) -> int | None:
    """NVML handles are opaque pointers: equal pointers are the same GPU."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (ctypes.ArgumentError, TypeError):
        return None


class EventMonitor:
    """The health thread for one driver: NVML event waits plus probes between them."""

    def __init__(
        self,
        nvml: Any,
        handles: Mapping[str, Any],
        book: HealthBook,
        policy: XidPolicy,
        options: HealthOptions,
        on_change: Callable[[], None],
        log: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nvml = nvml
        self._handles = dict(handles)
        self._by_address = {handle_address(h): uuid for uuid, h in self._handles.items()}
        self._book = book
        self._policy = policy
        self._quiet = options.quiet_period_seconds
        self._probe_interval = options.probe_interval_seconds
        self._wait_ms = max(10, min(MAX_WAIT_MS, int(self._probe_interval * 1000)))
        self._on_change = on_change
        self._log = log
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._event_set: Any = None
        self._failure: str | None = None
        self._unwatched: set[str] = set()
        """GPUs whose event registration failed; retried at every probe."""

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Registers for events in the caller's thread, so the first scan already knows
        which GPUs cannot be watched; the thread itself only waits and probes."""
        self._setup()
        self._thread = threading.Thread(target=self._run, name="nvidia-health", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self._log.warning("NVML health thread did not stop within %.0f s; leaving it", timeout)
                return
        self._free_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- event set -------------------------------------------------------------

    def _setup(self) -> bool:
        nvml = self._nvml
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as err:
            self._fail(f"cannot create an NVML event set: {err}")
            return False
        self._unwatched = set(self._handles)
        if any([self._register(uuid) for uuid in self._handles]):
            self._on_change()
        return True

    def _register(self, uuid: str) -> bool:
        """Watches one GPU's events; True if a failure changed its health.

        A GPU that cannot be watched is Unhealthy (as in NVIDIA's plugin), but
        registration is retried at every probe, so it can recover."""
        nvml = self._nvml
        handle = self._handles[uuid]
        try:
            mask = nvml.nvmlDeviceGetSupportedEventTypes(handle) & WATCHED_EVENTS
            if mask:
                nvml.nvmlDeviceRegisterEvents(handle, mask, self._event_set)
            else:
                self._log.warning("GPU %s supports neither Xid nor ECC events; its health is probed only", uuid)
        except nvml.NVMLError_NotSupported:
            self._log.warning("GPU %s: driver too old for NVML events; its health is probed only", uuid)
        except nvml.NVMLError as err:
            return self._book.record(uuid, f"cannot watch NVML events on this GPU: {err}", source="watch")
        self._unwatched.discard(uuid)
        return False

    def _free_set(self) -> None:
        if self._event_set is not None:
            try:
                self._nvml.nvmlEventSetFree(self._event_set)
            except self._nvml.NVMLError:
                pass
            self._event_set = None

    def _fail(self, why: str) -> None:
        """The event thread cannot do its job: every GPU goes Unhealthy, saying why, so the
        node stops attracting GPU pods it might not serve (NVIDIA PR #1641's "zombie node")."""
        self._free_set()
        self._failure = why
        if self._book.mark_down(f"health monitoring failed: {why}"):
            self._log.error("NVML health monitoring failed: %s; every GPU is Unhealthy until it works again", why)
            self._on_change()

    def _recover(self) -> None:
        if not self._setup():
            return
        why = self._failure
        self._failure = None
        self._log.warning("NVML health monitoring works again (after: %s)", why)
        self._book.mark_up(list(self._handles), f"health monitoring was interrupted ({why}); events may have been missed")
        self._on_change()

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        next_probe = self._clock() + self._probe_interval
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as err:  # noqa: BLE001 - a bug here must not leave GPUs looking Healthy
                self._fail(f"{type(err).__name__}: {err}")
            now = self._clock()
            if now >= next_probe and self._event_set is not None:
                self.probe()
                next_probe = now + self._probe_interval

    def _step(self) -> None:
        nvml = self._nvml
        if self._event_set is None:
            if not self._stop.wait(self._probe_interval):
                self._recover()
            return
        try:
            data = nvml.nvmlEventSetWait_v2(self._event_set, self._wait_ms)
        except nvml.NVMLError as err:
            if err.value == nvml.NVML_ERROR_TIMEOUT:
                return
            self._fail(f"NVML event wait failed: {err}")
            return
        self._handle(data)

    def _gpu_of(self, device: Any) -> str | None:
        uuid = self._by_address.get(handle_address(device))
        if uuid is not None:
            return uuid
        try:
            uuid = self._nvml.nvmlDeviceGetUUID(device)
        except self._nvml.NVMLError:
            return None
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        return uuid if uuid in self._handles else None

    def _handle(self, data: Any) -> None:
        kind, xid = int(data.eventType), int(data.eventData)
        gi, ci = int(data.gpuInstanceId), int(data.computeInstanceId)
        mig: MigKey = None if WHOLE_GPU in (gi, ci) else (gi, ci)
        where = f" on GPU instance {gi} compute instance {ci}" if mig else ""
        if kind & EVENT_XID:
            if not self._policy.is_critical(xid):
                self._log.info("Xid %d%s ignored by the health policy", xid, where)
                return
            reason = f"Xid {xid}{where}"
        elif kind & EVENT_DBE:
            reason = f"double-bit ECC error{where}"
        else:
            self._log.info("NVML event type 0x%x data %d ignored", kind, xid)
            return
        uuid = self._gpu_of(data.device)
        targets = [uuid] if uuid is not None else list(self._handles)
        if uuid is None:
            reason += " on a GPU NVML could not name"
        self._log.warning("GPU %s: %s", uuid or "(unknown; marking all)", reason)
        changed = False
        for target in targets:
            changed |= self._book.record(target, reason, mig)
        if changed:
            self._on_change()

    def probe(self) -> None:
        """One probe round, run by the thread every probe interval: retries event
        registration, queries every GPU (a cheap call that reaches it; a lost GPU fails
        with GPU_IS_LOST) and clears a faulted GPU that answers and has been quiet for
        the quiet period. Public so the recovery rule can be tested on a fake clock."""
        nvml = self._nvml
        changed = False
        for uuid in sorted(self._unwatched):
            changed |= self._register(uuid)
        faulted = set(self._book.faulted())
        for uuid, handle in self._handles.items():
            try:
                nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as err:
                changed |= self._book.record(uuid, f"NVML cannot reach the GPU: {err}", source="nvml")
                continue
            if uuid in faulted and uuid not in self._unwatched and self._quiet is not None and self._book.quiet_for(uuid) >= self._quiet:
                if self._book.clear(uuid):
                    self._log.warning("GPU %s probes fine after %.0f s without faults: Healthy again", uuid, self._quiet)
                    changed = True
        if changed:
            self._on_change()
