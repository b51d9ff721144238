"""systemd's view of `nodedev serve`: READY=1 only once every resource is registered,
RELOADING=1/READY=1 around a reload, STOPPING=1 at stop, WATCHDOG=1 while it runs.
The test plays systemd: a unix datagram socket passed as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nodedev.sdnotify import Notifier
from tests.devtree import dev_tree
from tests.kubelet import KubeletDouble

TUN = "devices.kubevirt.io/tun"
VHOST = "devices.kubevirt.io/vhost-net"


class FakeSystemd:
    """Reads every datagram sent to NOTIFY_SOCKET, as `KEY=value` dicts, in order."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._cond:
                self.messages.append(message)
                self._cond.notify_all()

    def wait(self, predicate: Callable[[dict[str, str]], bool], timeout: float = 10.0, after: int = 0) -> int:
        """Waits for a message matching `predicate` (from message `after` on); returns its index."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, message in enumerate(self.messages[after:], after):
                    if predicate(message):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching sd_notify message within {timeout} s; got {self.messages}")
                self._cond.wait(left)

    def states(self) -> list[dict[str, str]]:
        with self._cond:
            return [m for m in self.messages if set(m) - {"STATUS", "MONOTONIC_USEC"}]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    directory = tempfile.mkdtemp(prefix="nd-sd-", dir="/tmp")
    fake = FakeSystemd(os.path.join(directory, "notify"))
    yield fake
    fake.close()
    os.unlink(fake.address)
    os.rmdir(directory)


def has(key: str, value: str = "1") -> Callable[[dict[str, str]], bool]:
    return lambda m: m.get(key) == value


def test_ready_only_once_every_resource_is_registered_then_reload_and_stop(
    systemd: FakeSystemd, plugin_dir: Path, nodedev, tmp_path: Path
) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun", "vhost-net")
    config = {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 2}, "vhost-net": {"enabled": True, "shares": 2}}}
    process = nodedev(config, env={"NOTIFY_SOCKET": systemd.address})

    # No kubelet yet: serving, but not ready; systemd is told what it waits for.
    waiting = systemd.wait(lambda m: "waiting for the kubelet to register 2 resource(s)" in m.get("STATUS", ""))
    process.wait_log("cannot register yet")
    assert not any("READY" in m for m in systemd.states()), systemd.messages

    kubelet = KubeletDouble(plugin_dir)
    kubelet.start()
    try:
        ready = systemd.wait(has("READY"), after=waiting)
        # Registration is recorded before its log line; READY=1 is sent after both were recorded.
        process.wait_log(f"{TUN}: registered")
        process.wait_log(f"{VHOST}: registered")
        assert kubelet.registration_count(TUN) == 1 and kubelet.registration_count(VHOST) == 1
        assert "all registered" in systemd.messages[ready]["STATUS"]

        process.proc.send_signal(signal.SIGHUP)
        reloading = systemd.wait(has("RELOADING"), after=ready + 1)
        assert int(systemd.messages[reloading]["MONOTONIC_USEC"]) > 0
        systemd.wait(has("READY"), after=reloading + 1)

        assert process.stop() == 0
        systemd.wait(has("STOPPING"), after=reloading + 1)
        assert [next(iter(set(m) - {"STATUS", "MONOTONIC_USEC"})) for m in systemd.states()] == ["READY", "RELOADING", "READY", "STOPPING"]
    finally:
        kubelet.stop()


def test_watchdog_pings_at_half_the_interval_and_a_stopped_loop_stops_them(
    systemd: FakeSystemd, kubelet: KubeletDouble, nodedev, tmp_path: Path
) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun")
    process = nodedev({"devRoot": str(dev), "drivers": {"tun": {"enabled": True}}}, env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "200000"})
    first = systemd.wait(has("WATCHDOG"))
    third = systemd.wait(has("WATCHDOG"), after=systemd.wait(has("WATCHDOG"), after=first + 1) + 1)
    assert third > first

    # SIGSTOP freezes the whole process: no pings, so systemd would kill and restart it.
    process.proc.send_signal(signal.SIGSTOP)
    try:
        with systemd._cond:
            count = len(systemd.messages)
        with pytest.raises(AssertionError, match="no matching"):
            systemd.wait(has("WATCHDOG"), timeout=0.5, after=count + 1)
    finally:
        process.proc.send_signal(signal.SIGCONT)
    systemd.wait(has("WATCHDOG"), after=count)


def test_watchdog_for_another_pid_or_without_a_socket_is_off() -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000"}).watchdog_s == 1.0
    assert Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "junk"}).watchdog_s is None
    off = Notifier({})
    assert not off.enabled
    off.ready()  # outside systemd: nothing, no error


def test_an_abstract_socket_address_is_used_and_a_dead_socket_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    name = f"nodedev-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("serving 3 resource(s)\nwith a newline")
        assert listener.recv(4096) == b"READY=1\nSTATUS=serving 3 resource(s) with a newline"

    notifier.stopping()
    notifier.stopping()
    notifier.close()
    warnings = [r.getMessage() for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1 and f"NOTIFY_SOCKET @{name}" in warnings[0]
