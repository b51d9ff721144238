"""`nodedev status`: a running daemon's own account, over a local unix socket.

The daemon listens on `statusSocket` (default `<pluginDir>/nodedev/status.sock`:
a directory in the plugin directory survives the kubelet's restarts, which remove
files only, and the plugin-directory lock already makes it one daemon's). The
directory is 0700 and the socket 0600, so only root asks.

The protocol is lines. A client sends one request line, then reads:

- `status` (or nothing: end of file, or no line within a second): one JSON
  document, made on the event loop, then the daemon closes the connection;
- `watch`: the same document at once, then a new one (one per line) each time
  anything in it changes, until either side closes. The daemon calls `notify()`
  when a resource's devices changed, and also compares the report every
  `recheck_s` (1 s), so nothing is missed however it changed; a client that does
  not read within 5 s is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

DEFAULT_NAME = Path("nodedev") / "status.sock"
CLIENT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 1.0
"""How long the daemon waits for a request line before it answers `status`."""
RECHECK_S = 1.0
"""How often a `watch` stream compares the report even when nobody called notify()."""
MAX_REPORT_BYTES = 64 << 20
"""The longest report line a client reads (a node with 10,000 devices makes about 2 MB)."""


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
        self._watchers: set[asyncio.Event] = set()
        self._streams: set[asyncio.StreamWriter] = set()
        self._closing = asyncio.Event()
        self.recheck_s = RECHECK_S

    def notify(self) -> None:
        """Something in the report may have changed: `watch` streams compare it now. Loop only."""
        for wake in self._watchers:
            wake.set()

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
        self._closing.set()
        for stream in list(self._streams):  # ends `watch` streams: their clients see end of file
            stream.close()
        server.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
        if self._made_dir:  # leaves the plugin directory as it was found
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = (await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)).strip()
            except (TimeoutError, ValueError):
                request = b""
            if request == b"watch":
                await self._stream(reader, writer)
            elif request in (b"", b"status"):
                await self._send(writer, self._report())
            else:
                await self._send(writer, {"error": f"unknown request {request[:40].decode(errors='replace')!r}; send status or watch"})
        except (OSError, TimeoutError):
            pass  # a client that went away or does not read
        finally:
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, report: dict[str, Any]) -> str:
        return await self._send_text(writer, json.dumps(report, sort_keys=True))

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """`watch`: the report now, then again whenever it differs, until either side closes."""
        wake = asyncio.Event()
        self._watchers.add(wake)
        self._streams.add(writer)
        gone = asyncio.ensure_future(reader.read(1))  # end of file (or anything) from the client: it is leaving
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            sent = await self._send(writer, self._report())
            while True:
                woken = asyncio.ensure_future(wake.wait())
                done, _ = await asyncio.wait({woken, gone, closing}, timeout=self.recheck_s, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if gone in done or closing in done:
                    return
                wake.clear()
                text = json.dumps(self._report(), sort_keys=True)
                if text != sent:
                    sent = await self._send_text(writer, text)
        finally:
            gone.cancel()
            closing.cancel()
            self._watchers.discard(wake)
            self._streams.discard(writer)

    async def _send_text(self, writer: asyncio.StreamWriter, text: str) -> str:
        writer.write(text.encode() + b"\n")
        await asyncio.wait_for(writer.drain(), CLIENT_TIMEOUT_S)
        return text


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
            client.sendall(b"status\n")
            chunks = []
            while chunk := client.recv(1 << 16):
                chunks.append(chunk)
        except OSError as err:  # TimeoutError included
            raise _unreachable(path, err, timeout) from None
    try:
        report: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        raise StatusError(f"{path}: the answer is not a nodedev status (not JSON)") from None
    return report


def _unreachable(path: Path, err: OSError, timeout: float) -> StatusError:
    """Why the daemon on `path` cannot be asked, in one line."""
    if isinstance(err, FileNotFoundError):
        return StatusError(f"{path}: no such socket; is `nodedev serve` running with this config?")
    if isinstance(err, ConnectionRefusedError):
        return StatusError(f"{path}: nobody answers (the daemon that made it has stopped)")
    if isinstance(err, TimeoutError):
        return StatusError(f"{path}: no answer within {timeout:g} s")
    return StatusError(f"{path}: {err.strerror or err}")


async def subscribe(path: Path, timeout: float = CLIENT_TIMEOUT_S) -> AsyncGenerator[dict[str, Any], None]:
    """Follows the daemon on `path` (`watch`): each report as it changes, the first at once.

    Connecting and the first report each have `timeout`; StatusError, in one line, if
    none can be had. The iteration ends when the daemon closes the stream (it stopped).
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=MAX_REPORT_BYTES), timeout)
    except OSError as err:  # TimeoutError included
        raise _unreachable(path, err, timeout) from None
    try:
        writer.write(b"watch\n")
        first = True
        while True:
            try:
                line = await (asyncio.wait_for(reader.readline(), timeout) if first else reader.readline())
            except TimeoutError:
                raise StatusError(f"{path}: no answer within {timeout:g} s") from None
            except (OSError, ValueError) as err:
                raise StatusError(f"{path}: the status stream broke: {err}") from None
            if not line:
                if first:
                    raise StatusError(f"{path}: the daemon closed the connection without an answer")
                return
            first = False
            try:
                report: dict[str, Any] = json.loads(line)
            except ValueError:
                raise StatusError(f"{path}: the answer is not a nodedev status (not JSON)") from None
            if "error" in report:  # a daemon that does not know `watch`
                raise StatusError(f"{path}: the daemon cannot stream: {report['error']}")
            yield report
    finally:
        writer.close()


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
