"""Driver modules, one per device class. `NAMES` maps a config key to its class.

Classes are imported only when their driver is configured, so a node that does
not enable the NVIDIA driver never loads NVML bindings.
"""

from __future__ import annotations

import importlib
from typing import Any

from nodedev.driver import Driver

NAMES: dict[str, str] = {
    "kvm": "nodedev.drivers.devnodes:KvmDriver",
    "netdev": "nodedev.drivers.netdev:NetdevDriver",
    "nvidia": "nodedev.drivers.nvidia:NvidiaDriver",
    "rdma": "nodedev.drivers.rdma:RdmaDriver",
    "sriov": "nodedev.drivers.sriov:SriovDriver",
    "tun": "nodedev.drivers.devnodes:TunDriver",
    "vfio": "nodedev.drivers.vfio:VfioDriver",
    "vhost-net": "nodedev.drivers.devnodes:VhostNetDriver",
}


def load(name: str) -> type[Driver[Any]]:
    """The class registered as `name`; a registry entry that names no Driver is a bug, said so."""
    module, _, attr = NAMES[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise TypeError(f"drivers.NAMES[{name!r}] = {NAMES[name]!r} is not a Driver subclass")
    return cls
