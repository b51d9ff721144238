"""Driver modules, one per device class. `NAMES` maps a config key to its class.

Classes are imported only when their driver is configured, so a node that does
not enable the NVIDIA driver never loads NVML bindings.
"""

from __future__ import annotations

import importlib

from nodedev.driver import Driver

NAMES: dict[str, str] = {
    "kvm": "nodedev.drivers.devnodes:KvmDriver",
    "netdev": "nodedev.drivers.netdev:NetdevDriver",
    "nvidia": "nodedev.drivers.nvidia:NvidiaDriver",
    "tun": "nodedev.drivers.devnodes:TunDriver",
    "vhost-net": "nodedev.drivers.devnodes:VhostNetDriver",
}


def load(name: str) -> type[Driver]:
    module, _, cls = NAMES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
