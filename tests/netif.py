"""Real network interfaces for tests, made with `ip` and always removed again.

Every name is unique (`ndt` + random hex, within the kernel's 15 characters), so
tests running side by side, or an interface leaked by a killed run, never clash.
`NetIfs` deletes everything it made when its `with` block or the `netifs`
fixture ends, whether the test passed or not; deleting one end of a veth pair
removes the other, and a macvlan goes with its parent, so deletion order does
not matter and "already gone" is not an error.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

PREFIX = "ndt"
SYS_CLASS_NET = Path("/sys/class/net")


def ip_available() -> str | None:
    """Why real-interface tests cannot run here, or None when they can."""
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating interfaces needs root"
    return None


def unique_name(prefix: str = PREFIX) -> str:
    return f"{prefix}{secrets.token_hex(4)}"[:15]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def exists(name: str) -> bool:
    return (SYS_CLASS_NET / name).exists()


def wait_link(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Waits until `predicate()` holds, re-checking on every rtnetlink link message.

    Operstate and carrier settle in the kernel's linkwatch work, after `ip` has
    returned; each change then sends RTM_NEWLINK. The socket is open before the
    first check, so a change between check and wait still wakes us.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 1))  # RTMGRP_LINK
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            if select.select([sock], [], [], left)[0]:
                try:
                    while sock.recv(65536):
                        pass
                except BlockingIOError:
                    pass


class NetIfs:
    """Creates interfaces and remembers them; `close()` (or leaving `with`) deletes them all."""

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self.made: list[str] = []

    def __enter__(self) -> NetIfs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def name(self) -> str:
        return unique_name(self.prefix)

    def veth(self, a: str | None = None, b: str | None = None) -> tuple[str, str]:
        a, b = a or self.name(), b or self.name()
        self._remember(a, b)
        ip("link", "add", a, "type", "veth", "peer", "name", b)
        return a, b

    def tap(self, name: str | None = None) -> str:
        return self._tuntap(name, "tap")

    def tun(self, name: str | None = None) -> str:
        return self._tuntap(name, "tun")

    def _tuntap(self, name: str | None, mode: str) -> str:
        name = name or self.name()
        self._remember(name)
        ip("tuntap", "add", "dev", name, "mode", mode)
        return name

    def macvlan(self, parent: str, name: str | None = None, mode: str = "bridge") -> str:
        name = name or self.name()
        self._remember(name)
        ip("link", "add", "link", parent, "name", name, "type", "macvlan", "mode", mode)
        return name

    def rename(self, old: str, new: str) -> None:
        """Renames a (down) interface; it is cleaned up under its new name."""
        self._remember(new)
        ip("link", "set", "dev", old, "name", new)

    def up(self, *names: str) -> None:
        for name in names:
            ip("link", "set", name, "up")

    def down(self, *names: str) -> None:
        for name in names:
            ip("link", "set", name, "down")

    def batch(self, commands: Sequence[str], made: Sequence[str]) -> None:
        """Runs many `ip` commands in one process (`ip -batch -`), one kernel burst.
        `made` names every interface the commands create, for cleanup."""
        self._remember(*made)
        result = subprocess.run(["ip", "-batch", "-"], input="\n".join(commands) + "\n", capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"ip -batch failed ({result.returncode}): {result.stderr.strip()[:500]}")

    def delete(self, name: str) -> None:
        ip("link", "del", name, check=False)

    def uevent(self, name: str, action: str) -> None:
        """Asks the kernel to send a synthetic uevent (`add`, `change`, `remove`) for an interface."""
        (SYS_CLASS_NET / name / "uevent").write_text(f"{action}\n")

    def _remember(self, *names: str) -> None:
        for name in names:
            if name not in self.made:
                self.made.append(name)

    def close(self) -> None:
        """Deletes every interface made here that still exists; one `ip -batch` for many."""
        left = [name for name in reversed(self.made) if exists(name)]
        self.made.clear()
        if len(left) > 8:
            subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"link del {n}\n" for n in left), capture_output=True, text=True, timeout=120)
            left = [name for name in left if exists(name)]
        for name in left:
            self.delete(name)
        still = [name for name in left if exists(name)]
        if still:
            raise RuntimeError(f"could not delete test interfaces: {', '.join(still)}")


@pytest.fixture
def netifs() -> Iterator[NetIfs]:
    """Real interfaces for one test, deleted at its end whatever happened."""
    if reason := ip_available():
        pytest.skip(reason)
    with NetIfs(prefix=unique_name()[:7]) as made:  # `ndt` + 4 hex of its own: `<prefix>*` is this test's
        yield made
