"""Telling systemd how the daemon is doing: the sd_notify protocol, written out.

systemd passes `NOTIFY_SOCKET` (a unix datagram socket path; a leading `@` is an
abstract name) to a `Type=notify` service; each state is one datagram of
`KEY=value` lines. The protocol is these few lines, so no library is needed.
Outside systemd (no `NOTIFY_SOCKET`) every call does nothing. A send that fails
is logged once and never stops the daemon: systemd's view is a courtesy, the
kubelet's is the job.

`WATCHDOG_USEC` asks for `WATCHDOG=1` at least that often (for this process only,
when `WATCHDOG_PID` names another). The pings come from the event loop, so a
stuck loop misses them and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("nodedev.sdnotify")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_s = _watchdog_interval(env)
        self._socket: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def ready(self, status: str = "") -> None:
        self._send("READY=1", status)

    def reloading(self) -> None:
        """Sent before a reload; READY=1 follows when it is done. MONOTONIC_USEC is what
        systemd 253's Type=notify-reload asks for; older ones ignore it."""
        self._send("RELOADING=1", "", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self._send("STOPPING=1", "stopping")

    def status(self, status: str) -> None:
        self._send("", status)

    def watchdog(self) -> None:
        self._send("WATCHDOG=1", "")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, state: str, status: str, *extra: str) -> None:
        if not self.address:
            return
        lines = [line for line in (state, *extra) if line]
        if status:
            lines.append("STATUS=" + " ".join(status.split()))  # one line, whatever the text
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as err:
            if not self._failed:
                shown = self.address.replace("\0", "@")
                log.warning("NOTIFY_SOCKET %s: cannot notify systemd: %s", shown, err.strerror or err)
                self._failed = True
            return
        self._failed = False


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """How often to ping, in seconds: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0") or 0)
    except ValueError:
        log.warning("WATCHDOG_USEC %r or WATCHDOG_PID %r is not a number; no watchdog pings", env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"))
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 2_000_000
