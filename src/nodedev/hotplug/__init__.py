"""Kernel device events for the whole daemon: uevents, rtnetlink link messages and
inotify path watches, read on the event loop and routed to the drivers that asked.

`engine.py` routes, `uevents.py` and `rtnetlink.py` are the netlink channels,
`paths.py` (over `inotify.py`) is the one inotify descriptor the daemon and the
engine share.
Importing this package does not import pyudev; opening a uevent channel does.
"""

from nodedev.hotplug.engine import REOPEN_DELAYS_S, SETTLE_S, HotplugEngine, OnMatch, fits, under_sysfs
from nodedev.hotplug.paths import Changes, PathWatcher, WatchHandle
from nodedev.hotplug.rtnetlink import RTM_DELLINK, RTM_NEWLINK, parse_link_messages
from nodedev.hotplug.uevents import DEFAULT_RECEIVE_BUFFER, UDEV_CONTROL, Source, Uevent, resolve_source

__all__ = [
    "DEFAULT_RECEIVE_BUFFER",
    "REOPEN_DELAYS_S",
    "RTM_DELLINK",
    "RTM_NEWLINK",
    "SETTLE_S",
    "UDEV_CONTROL",
    "Changes",
    "HotplugEngine",
    "OnMatch",
    "PathWatcher",
    "Source",
    "Uevent",
    "WatchHandle",
    "fits",
    "parse_link_messages",
    "resolve_source",
    "under_sysfs",
]
