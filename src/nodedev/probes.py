"""The daemon's HTTP endpoints: /healthz and /readyz for probes, /metrics for Prometheus.

Each address (`healthAddress`, `metricsAddress`; one server when they are the
same) is served by a small threaded HTTP server off the event loop, so a probe
is answered even while the loop is stuck, and says so. Only the paths configured
for an address answer; any other is 404. HEAD answers as GET without the body.

- `/healthz`: 200 while the event loop runs a callback within a second, 503
  otherwise. Liveness: a stuck loop serves no kubelet call.
- `/readyz`: 200 once every enabled driver started and every resource is served
  and registered with the kubelet; 503 with a JSON body naming what is missing.
  The report is made on the loop (it reads the daemon's state), so a stuck loop
  is not ready either.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

log = logging.getLogger("nodedev.probes")

LOOP_TIMEOUT_S = 1.0
"""How long the event loop has to answer a probe."""
REQUEST_TIMEOUT_S = 5.0
"""A client that sends nothing for this long is dropped, so idle connections cannot pile up."""

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


Route = Callable[[Mapping[str, str]], Answer]
"""Answers one path; given the request headers, names lower-cased (the metrics page negotiates its format)."""


class ListenError(Exception):
    """An address cannot be listened on; one line naming the config key, address and why."""


def on_loop(loop: asyncio.AbstractEventLoop, work: Callable[[], Any], timeout: float = LOOP_TIMEOUT_S) -> Any:
    """Runs `work` on the loop from another thread; TimeoutError if the loop does not get to it in time."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up waiting
        try:
            future.set_result(work())
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            future.set_exception(err)

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:  # the loop is closed
        raise TimeoutError("the event loop has stopped") from None
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"the event loop did not answer within {timeout:g} s") from None


def health_routes(loop: asyncio.AbstractEventLoop, readiness: Callable[[], dict[str, Any]]) -> dict[str, Route]:
    """/healthz and /readyz; `readiness` runs on the loop and returns {"ready": bool, ...}."""

    def healthz(headers: Mapping[str, str]) -> Answer:
        try:
            on_loop(loop, lambda: None)
        except TimeoutError as err:
            return Answer(HTTPStatus.SERVICE_UNAVAILABLE, TEXT, f"unhealthy: {err}\n".encode())
        return Answer(HTTPStatus.OK, TEXT, b"ok\n")

    def readyz(headers: Mapping[str, str]) -> Answer:
        try:
            report = on_loop(loop, readiness)
        except TimeoutError as err:
            report = {"ready": False, "missing": {"daemon": str(err)}}
        status = HTTPStatus.OK if report.get("ready") else HTTPStatus.SERVICE_UNAVAILABLE
        return Answer(status, JSON, json.dumps(report, sort_keys=True).encode() + b"\n")

    return {"/healthz": healthz, "/readyz": readyz}


class Endpoints:
    """The HTTP servers, one per address, each with its routes and its own thread."""

    def __init__(self) -> None:
        self._servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def listen(self, address: str, routes: Mapping[str, Route], key: str) -> None:
        """Serves `routes` on `host:port` (an empty host: every address); `key` names the
        config key in the error."""
        from http.server import ThreadingHTTPServer

        host, _, port = address.rpartition(":")
        handler = _handler(dict(routes))
        try:
            server = _server_class(ThreadingHTTPServer, host)((host.strip("[]") or "0.0.0.0", int(port)), handler)
        except OSError as err:  # socket.gaierror included: a host that does not resolve
            raise ListenError(f"{key} {address}: cannot listen: {err.strerror or err}") from None
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, name=f"http-{address}", daemon=True)
        thread.start()
        self._servers.append((server, thread))

    def close(self) -> None:
        """Stops every server; blocks up to the servers' half-second poll, so call it off the loop."""
        servers, self._servers = self._servers, []
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(1.0)


def _server_class(base: type[ThreadingHTTPServer], host: str) -> type[ThreadingHTTPServer]:
    """An IPv6 listener for a bracketed host; the standard class otherwise."""
    if not host.startswith("["):
        return base
    import socket

    return type("ThreadingHTTPServer6", (base,), {"address_family": socket.AF_INET6})


def _handler(routes: dict[str, Route]) -> type[Any]:
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S
        server_version = "nodedev"

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, *, body: bool) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            if route is None:
                known = ", ".join(sorted(routes))
                answer = Answer(HTTPStatus.NOT_FOUND, TEXT, f"not found; this address serves {known}\n".encode())
            else:
                try:
                    answer = route({k.lower(): v for k, v in self.headers.items()})
                except Exception as err:  # a probe must answer, never hang up
                    log.debug("%s failed", self.path, exc_info=True)
                    answer = Answer(HTTPStatus.INTERNAL_SERVER_ERROR, TEXT, f"{type(err).__name__}: {err}\n".encode())
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            if body:
                self.wfile.write(answer.body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
