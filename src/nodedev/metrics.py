"""Prometheus metrics: what an operator alerts on, for every driver alike.

Updated from the host only (servers, registration, inventory), so a driver gets
them for free. Served by prometheus-client's own HTTP thread, off the event loop,
and only when `metricsAddress` is set. Until `serve()` runs, every metric is a
no-op stand-in: prometheus-client takes longer to import than the daemon takes
to register, and a node without metrics should not pay for it.
"""

from __future__ import annotations

from typing import Any


class _Off:
    """Stands in for every metric while metrics are off."""

    def labels(self, *values: str) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def remove(self, *values: str) -> None:
        pass


_OFF = _Off()
# Typed Any: a prometheus Gauge or Counter once enabled, the stand-in before.
DEVICES: Any = _OFF
ALLOCATIONS: Any = _OFF
REGISTRATIONS: Any = _OFF
SCANS: Any = _OFF
DRIVER_UP: Any = _OFF
REGISTRY: Any = None


class MetricsError(Exception):
    """The metrics endpoint cannot listen; one line naming the address and why."""


def enable() -> None:
    """Creates the real metrics (once); everything counted from now on is served."""
    global DEVICES, ALLOCATIONS, REGISTRATIONS, SCANS, DRIVER_UP, REGISTRY
    if REGISTRY is not None:
        return
    from prometheus_client import CollectorRegistry, Counter, Gauge

    registry = CollectorRegistry()
    DEVICES = Gauge("nodedev_devices", "Devices advertised to the kubelet, by resource and health.", ["resource", "health"], registry=registry)
    ALLOCATIONS = Counter(
        "nodedev_allocations_total", "Allocate calls answered, by resource and result (ok, refused, failed).", ["resource", "result"], registry=registry
    )
    REGISTRATIONS = Counter(
        "nodedev_registrations_total",
        "Successful registrations with the kubelet; more than one means the kubelet restarted.",
        ["resource"],
        registry=registry,
    )
    SCANS = Counter("nodedev_scans_total", "Driver scans, by driver and result (ok, failed).", ["driver", "result"], registry=registry)
    DRIVER_UP = Gauge("nodedev_driver_up", "1 when the driver started and is scanning, 0 when it failed to start.", ["driver"], registry=registry)
    REGISTRY = registry


def serve(address: str) -> None:
    """Starts the /metrics endpoint on `host:port` (an empty host means every address)."""
    enable()
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    try:
        start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=REGISTRY)
    except OSError as err:  # socket.gaierror included: a host that does not resolve
        why = err.strerror or str(err)
        raise MetricsError(f"metricsAddress {address}: cannot listen: {why}") from None


def forget_resource(resource: str) -> None:
    """Drops a resource that is no longer served from every series that names it."""
    for metric, labels in (
        (DEVICES, [(resource, "Healthy"), (resource, "Unhealthy")]),
        (ALLOCATIONS, [(resource, r) for r in ("ok", "refused", "failed")]),
        (REGISTRATIONS, [(resource,)]),
    ):
        for values in labels:
            try:
                metric.remove(*values)
            except KeyError:
                pass
