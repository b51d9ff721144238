"""Prometheus metrics: what an operator alerts on, for every driver alike.

Updated from the host only (servers, registration, inventory, daemon), so a
driver gets them for free. Served on `metricsAddress` by the daemon's HTTP
endpoints (see probes.py), off the event loop. Until `enable()` runs, every
metric is a no-op stand-in: prometheus-client takes longer to import than the
daemon takes to register, and a node without metrics should not pay for it.

Every labelled series an operator alerts on exists from the moment its resource
or driver does (`resource_added`, `driver_added`): a rate() over a result that
has not happened yet reads 0, not "no data". No `_created` series are exported.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import Any

from nodedev import __version__


class _Off:
    """Stands in for every metric while metrics are off."""

    def labels(self, *values: str) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def remove(self, *values: str) -> None:
        pass


_OFF = _Off()
ALLOCATION_RESULTS = ("ok", "refused", "failed")
SCAN_RESULTS = ("ok", "failed")
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
"""Allocate answers in about 50 µs of nodedev's own work; a slow driver shows up in the top buckets."""
SCAN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Typed Any: a prometheus metric once enabled, the stand-in before.
DEVICES: Any = _OFF
ALLOCATIONS: Any = _OFF
ALLOCATE_SECONDS: Any = _OFF
PREFERRED_SECONDS: Any = _OFF
REGISTRATIONS: Any = _OFF
KUBELET_RESTARTS: Any = _OFF
SCANS: Any = _OFF
SCAN_SECONDS: Any = _OFF
EVENTS: Any = _OFF
RESYNCS: Any = _OFF
DRIVER_UP: Any = _OFF
REGISTRY: Any = None


def enable() -> None:
    """Creates the real metrics (once); everything counted from now on is served."""
    global DEVICES, ALLOCATIONS, ALLOCATE_SECONDS, PREFERRED_SECONDS, REGISTRATIONS, KUBELET_RESTARTS
    global SCANS, SCAN_SECONDS, EVENTS, RESYNCS, DRIVER_UP, REGISTRY
    if REGISTRY is not None:
        return
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector, ProcessCollector

    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
    PlatformCollector(registry=registry)  # python_info
    GCCollector(registry=registry)  # python_gc_*
    build = Gauge("nodedev_build_info", "Always 1; the labels say which nodedev runs on which Python.", ["version", "python"], registry=registry)
    build.labels(__version__, platform.python_version()).set(1)
    DEVICES = Gauge("nodedev_devices", "Devices advertised to the kubelet, by resource and health.", ["resource", "health"], registry=registry)
    ALLOCATIONS = Counter(
        "nodedev_allocations_total", "Allocate calls answered, by resource and result (ok, refused, failed).", ["resource", "result"], registry=registry
    )
    ALLOCATE_SECONDS = Histogram(
        "nodedev_allocate_duration_seconds", "Time to answer an Allocate call, by resource.", ["resource"], buckets=LATENCY_BUCKETS, registry=registry
    )
    PREFERRED_SECONDS = Histogram(
        "nodedev_preferred_allocation_duration_seconds",
        "Time to answer a GetPreferredAllocation call, by resource.",
        ["resource"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    REGISTRATIONS = Counter(
        "nodedev_registrations_total",
        "Successful registrations with the kubelet; more than one means the kubelet restarted.",
        ["resource"],
        registry=registry,
    )
    KUBELET_RESTARTS = Counter(
        "nodedev_kubelet_restarts_total", "Kubelet restarts seen (a new kubelet.sock after the first one).", registry=registry
    )
    SCANS = Counter("nodedev_scans_total", "Driver scans, by driver and result (ok, failed).", ["driver", "result"], registry=registry)
    SCAN_SECONDS = Histogram(
        "nodedev_scan_duration_seconds", "Time a driver's scan took, by driver.", ["driver"], buckets=SCAN_BUCKETS, registry=registry
    )
    EVENTS = Counter("nodedev_events_total", "Hotplug events routed to a driver, by driver.", ["driver"], registry=registry)
    RESYNCS = Counter(
        "nodedev_resyncs_total", "Full rescans of every driver, by reason (periodic, or an event source that lost events).", ["reason"], registry=registry
    )
    DRIVER_UP = Gauge("nodedev_driver_up", "1 when the driver started and is scanning, 0 when it failed to start.", ["driver"], registry=registry)
    RESYNCS.labels("periodic")
    RESYNCS.labels("lost events")
    KUBELET_RESTARTS.inc(0)
    REGISTRY = registry


def resource_added(resource: str) -> None:
    """Creates a new resource's series at zero: every allocation result, the latency histograms."""
    for result in ALLOCATION_RESULTS:
        ALLOCATIONS.labels(resource, result)
    REGISTRATIONS.labels(resource)
    ALLOCATE_SECONDS.labels(resource)
    PREFERRED_SECONDS.labels(resource)


def driver_added(driver: str) -> None:
    """Creates a driver's series at zero: scan results, scan duration, events."""
    for result in SCAN_RESULTS:
        SCANS.labels(driver, result)
    SCAN_SECONDS.labels(driver)
    EVENTS.labels(driver)


def page(headers: Mapping[str, str]) -> tuple[str, bytes]:
    """The exposition, in the format the scraper asks for (OpenMetrics or text): content type, body."""
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(headers.get("accept", ""))
    return content_type, encoder(REGISTRY)


def forget_resource(resource: str) -> None:
    """Drops a resource that is no longer served from every series that names it."""
    for metric, labels in (
        (DEVICES, [(resource, "Healthy"), (resource, "Unhealthy")]),
        (ALLOCATIONS, [(resource, r) for r in ALLOCATION_RESULTS]),
        (REGISTRATIONS, [(resource,)]),
        (ALLOCATE_SECONDS, [(resource,)]),
        (PREFERRED_SECONDS, [(resource,)]),
    ):
        for values in labels:
            try:
                metric.remove(*values)
            except KeyError:
                pass


def forget_driver(driver: str) -> None:
    """Drops a driver that is no longer enabled (a reload removed it)."""
    for metric, labels in (
        (SCANS, [(driver, r) for r in SCAN_RESULTS]),
        (SCAN_SECONDS, [(driver,)]),
        (EVENTS, [(driver,)]),
        (DRIVER_UP, [(driver,)]),
    ):
        for values in labels:
            try:
                metric.remove(*values)
            except KeyError:
                pass
