"""`nodedev status`: a running daemon's own account, over a local unix socket.

The daemon listens on `statusSocket` (default `<pluginDir>/nodedev/status.sock`:
a directory in the plugin directory survives the kubelet's restarts, which remove
files only, and the plugin-directory lock already makes it one daemon's). The
directory is 0700 and the socket 0600, so only root asks. A client connects and
reads one JSON document, made on the event loop, then the daemon closes the
connection; nothing a client sends is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_NAME = Path("nodedev") / "status.sock"
CLIENT_TIMEOUT_S = 5.0


class StatusError(Exception):
    """The socket cannot be served or asked; one line naming the path and why."""


def socket_path(plugin_dir: Path, configured: str) -> Path:
    return Path(configured) if configured else plugin_dir / DEFAULT_NAME


class StatusServer:
    def __init__(self, path: Path, report: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self._report = report
        self._server: asyncio.Server | None = None
        self._made_dir = False

    async def start(self) -> None:
        """Listens, replacing a socket a dead daemon left; refuses one a live daemon answers on."""
        try:
            self._made_dir = not self.path.parent.is_dir()
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise StatusError(f"statusSocket {self.path}: cannot create its directory: {err.strerror}") from None
        if _answers(self.path):
            raise StatusError(f"statusSocket {self.path}: another nodedev answers on it; set a different statusSocket")
        try:
            self.path.unlink(missing_ok=True)
            self._server = await asyncio.start_unix_server(self._answer, path=str(self.path))
            os.chmod(self.path, 0o600)
        except OSError as err:
            await self.close()
            raise StatusError(f"statusSocket {self.path}: cannot listen: {err.strerror or err}") from None

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
        if self._made_dir:  # leaves the plugin directory as it was found
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(self._report(), sort_keys=True).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), CLIENT_TIMEOUT_S)
        except (OSError, TimeoutError):
            pass  # a client that went away or does not read
        finally:
            writer.close()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def fetch(path: Path, timeout: float = CLIENT_TIMEOUT_S) -> dict[str, Any]:
    """Asks the daemon listening on `path`; StatusError, in one line, if none can be asked."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        try:
            client.connect(str(path))
            chunks = []
            while chunk := client.recv(1 << 16):
                chunks.append(chunk)
        except FileNotFoundError:
            raise StatusError(f"{path}: no such socket; is `nodedev serve` running with this config?") from None
        except ConnectionRefusedError:
            raise StatusError(f"{path}: nobody answers (the daemon that made it has stopped)") from None
        except TimeoutError:
            raise StatusError(f"{path}: no answer within {timeout:g} s") from None
        except OSError as err:
            raise StatusError(f"{path}: {err.strerror or err}") from None
    try:
        report: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        raise StatusError(f"{path}: the answer is not a nodedev status (not JSON)") from None
    return report


def summary(report: dict[str, Any]) -> str:
    """The lines above the device table: the daemon, its registration, its resources, failed drivers."""
    lines = [
        f"nodedev {report['version']}, PID {report['pid']}, {report['phase']}; config {report['config']}",
        f"registration: {report['registration']['mode']} mode; kubelet restarts seen: {report['kubeletRestarts']}",
    ]
    resources = report["resources"]
    if resources:
        width = max(len(r["name"]) for r in resources)
        for r in resources:
            state = "registered" if r["registered"] else ("served, not registered" if r["served"] else "NOT SERVED")
            healthy = sum(d["health"] == "Healthy" for d in r["devices"])
            lines.append(f"  {r['name'].ljust(width)}  {r['driver']}: {state}; {len(r['devices'])} device(s), {healthy} Healthy")
    for driver in report["drivers"]:
        if driver["error"] is not None:
            lines.append(f"  driver {driver['name']} FAILED: {driver['error']}")
    return "\n".join(lines)
