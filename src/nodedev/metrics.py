"""Prometheus metrics: what an operator alerts on, for every driver alike.

Updated from the host only (servers, registration, inventory), so a driver gets
them for free. Served by prometheus-client's own HTTP thread, off the event loop,
and only when `metricsAddress` is set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

REGISTRY = CollectorRegistry()

DEVICES = Gauge(
    "nodedev_devices",
    "Devices advertised to the kubelet, by resource and health.",
    ["resource", "health"],
    registry=REGISTRY,
)
ALLOCATIONS = Counter(
    "nodedev_allocations_total",
    "Allocate calls answered, by resource and result (ok, refused, failed).",
    ["resource", "result"],
    registry=REGISTRY,
)
REGISTRATIONS = Counter(
    "nodedev_registrations_total",
    "Successful registrations with the kubelet; more than one means the kubelet restarted.",
    ["resource"],
    registry=REGISTRY,
)
SCANS = Counter(
    "nodedev_scans_total",
    "Driver scans, by driver and result (ok, failed).",
    ["driver", "result"],
    registry=REGISTRY,
)
DRIVER_UP = Gauge(
    "nodedev_driver_up",
    "1 when the driver started and is scanning, 0 when it failed to start.",
    ["driver"],
    registry=REGISTRY,
)


class MetricsError(Exception):
    """The metrics endpoint cannot listen; one line naming the address and why."""


def serve(address: str) -> None:
    """Starts the /metrics endpoint on `host:port` (an empty host means every address)."""
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
