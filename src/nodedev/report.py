"""What the daemon says about itself: readiness (/readyz, systemd's READY=1) and status (`nodedev status`).

Each is made on the event loop from the daemon's own state, never from a thread.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from nodedev import __version__

if TYPE_CHECKING:
    from nodedev.daemon import Daemon


def readiness(daemon: Daemon) -> dict[str, Any]:
    """What /readyz reports (read on the loop): ready, or what is missing and why."""
    missing: dict[str, Any] = {}
    if daemon.phase != "running":
        missing["daemon"] = daemon.phase
    drivers = {r.name: r.error or "not started" for r in daemon.inventory.runners.values() if r.driver is None}
    if drivers:
        missing["drivers"] = drivers
    if resources := unregistered(daemon, served_only=False):
        missing["resources"] = resources
    if missing:
        return {"ready": False, "missing": missing}
    return {"ready": True, "resources": sorted(daemon.servers)}


def status(daemon: Daemon) -> dict[str, Any]:
    """What `nodedev status` shows (made on the loop)."""
    resources = []
    for name, server in sorted(daemon.servers.items()):
        runner = daemon.inventory.owner(name)
        devices = [
            {"id": d.id, "health": d.health.value, "reason": d.reason, "numa": list(d.numa_nodes)} for d in server.devices.values()
        ]
        resources.append(
            {
                "name": name,
                "driver": runner.name if runner is not None else None,
                "socket": str(server.socket_path),
                "served": server.serving,
                "registered": server.serving and daemon.registrar.registered(name),
                "devices": devices,
            }
        )
    return {
        "version": __version__,
        "pid": os.getpid(),
        "phase": daemon.phase,
        "config": str(daemon.config.path),
        "pluginDir": str(daemon.config.plugin_dir),
        "registration": {
            "mode": daemon.registrar.mode,
            "socket": str(daemon.registrar.kubelet_socket),
            "sockets": str(daemon.registrar.socket_dir),
        },
        "kubeletRestarts": daemon.kubelet_restarts,
        "drivers": [{"name": r.name, "started": r.driver is not None, "error": r.error} for r in daemon.inventory.runners.values()],
        "resources": resources,
    }


def unregistered(daemon: Daemon, *, served_only: bool) -> dict[str, str]:
    """Resources the kubelet does not have from us, and why; `served_only` leaves out the ones
    whose socket could not be served (logged already, and no wait will fix them)."""
    why: dict[str, str] = {}
    for name, server in sorted(daemon.servers.items()):
        if not server.serving:
            if not served_only:
                why[name] = f"not served: {server.socket_path} could not be served (see the log)"
        elif not daemon.registrar.registered(name):
            why[name] = "not registered with the kubelet yet"
    return why
