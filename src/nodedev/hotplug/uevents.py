"""Kernel uevents through one pyudev netlink monitor, and the event type every channel emits.

Source `udev` hears devices after udevd has set them up (nodes created, names
final); `kernel` hears the raw kernel broadcast, the only choice where no udevd
runs (a container, a minimal VM). `auto` picks `udev` exactly when udevd's
control socket exists.

pyudev (and libudev through ctypes) is imported when a monitor is opened, not
with this module: `nodedev serve` must register within 150 ms of starting.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Source = Literal["auto", "udev", "kernel"]

UDEV_CONTROL = Path("/run/udev/control")
"""Exists while a udevd runs; without one, the `udev` netlink group stays silent."""

DEFAULT_RECEIVE_BUFFER = 8 << 20
"""Bytes of socket buffer per netlink channel. A uevent is a few hundred bytes, so
8 MiB holds tens of thousands: a burst of hotplugged VFs while a scan runs fits."""

DRAIN_LIMIT = 256
"""Messages handled per wake-up before the loop gets a turn; the descriptor stays
readable, so the rest are read on the next turn."""


@dataclass(frozen=True, slots=True)
class Uevent:
    """One device event, from the kernel, from rtnetlink, or injected by a test.

    `properties` are the uevent's KEY=value pairs (INTERFACE, IFINDEX, DEVNAME,
    PCI_CLASS, DRIVER, DEVPATH_OLD on a rename, ...), which `UdevMatch.properties`
    filters on.
    """

    action: str
    subsystem: str
    sys_name: str
    devpath: str = ""
    properties: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_pyudev(cls, device: Any) -> Uevent:
        return cls(
            action=device.action or "",
            subsystem=device.subsystem or "",
            sys_name=device.sys_name or "",
            devpath=device.device_path or "",
            properties=dict(device.properties),
        )

    def names(self) -> tuple[str, ...]:
        """The kernel names this event concerns: a rename concerns the old name too,
        because a driver that served the device under its old name must drop it."""
        old = self.properties.get("DEVPATH_OLD")
        if old:
            old_name = old.rsplit("/", 1)[-1]
            if old_name != self.sys_name:
                return (self.sys_name, old_name)
        return (self.sys_name,)


def resolve_source(source: Source, control: Path = UDEV_CONTROL) -> Literal["udev", "kernel"]:
    if source == "auto":
        return "udev" if control.exists() else "kernel"
    return source


class Channel(Protocol):
    """An open descriptor the engine reads on the loop. `drain()` raises OSError when
    the channel is broken and must be reopened; an overrun it reports and survives."""

    kind: str

    def fileno(self) -> int: ...

    def drain(self) -> None: ...

    def close(self) -> None: ...


OnEvent = Callable[[Uevent], None]
OnLost = Callable[[str], None]


def set_receive_buffer(sock: socket.socket, size: int) -> None:
    """SO_RCVBUFFORCE passes net.core.rmem_max (we run as root); plain SO_RCVBUF is
    the fallback, capped by the sysctl, for a daemon without CAP_NET_ADMIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def pending_socket_error(fd: int) -> int:
    """Reads (and clears) a socket's pending error. pyudev's poll() reports POLLERR
    without an errno, and on a netlink socket that error is almost always ENOBUFS."""
    try:
        with socket.fromfd(fd, socket.AF_NETLINK, socket.SOCK_RAW) as sock:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return 0


def open_monitor(source: str, buffer: int, log: logging.Logger) -> Any:
    """A started pyudev netlink monitor; the one place pyudev is imported (tests replace it)."""
    import pyudev

    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
    try:
        monitor.set_receive_buffer_size(buffer)
    except OSError as err:
        log.warning("uevent monitor: cannot set a %d byte receive buffer: %s", buffer, err)
    return monitor


class UeventChannel:
    """The netlink monitor, filtered by libudev to the subscribed subsystems."""

    kind = "uevent monitor"

    def __init__(
        self, source: str, subsystems: Sequence[str], buffer: int, on_event: OnEvent, on_lost: OnLost, log: logging.Logger
    ) -> None:
        self._on_event = on_event
        self._on_lost = on_lost
        self._log = log
        self._monitor = open_monitor(source, buffer, log)
        self._filtered: set[str] = set()
        self.set_subsystems(subsystems)
        self._monitor.start()  # also makes the descriptor non-blocking

    def set_subsystems(self, subsystems: Sequence[str]) -> None:
        """Filters in libudev (and in the kernel for udevd's messages), so unrelated
        devices never reach Python. Filters only grow (libudev cannot remove one once
        the monitor runs): a subsystem no driver wants any more costs a wake-up, and
        routing drops its events."""
        for subsystem in subsystems:
            if subsystem not in self._filtered:
                self._monitor.filter_by(subsystem)
                self._filtered.add(subsystem)

    def fileno(self) -> int:
        return int(self._monitor.fileno())

    def drain(self) -> None:
        for _ in range(DRAIN_LIMIT):
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as err:
                code = err.errno or pending_socket_error(self.fileno())
                if code == errno.ENOBUFS:
                    self._on_lost("uevent monitor: netlink receive buffer overrun (ENOBUFS), events were dropped")
                    continue
                if code and not err.errno:
                    raise OSError(code, f"uevent monitor: {os.strerror(code)}") from err
                raise
            if device is None:
                return
            try:
                event = Uevent.from_pyudev(device)
            except Exception as err:  # noqa: BLE001 - one unreadable event must not stop the others
                self._log.warning("uevent monitor: cannot read an event: %s", err)
                continue
            self._on_event(event)

    def close(self) -> None:
        # libudev closes the socket when the last reference goes; drop ours now.
        self._monitor = None
