"""Network interfaces for tests: real ones made with `ip` and always removed again,
private network namespaces, and fixture trees shaped like /sys/class/net.

Every name is unique (`ndt` + random hex, within the kernel's 15 characters), so
tests running side by side, or an interface leaked by a killed run, never clash.
`NetIfs` deletes everything it made when its `with` block or the `netifs`
fixture ends, whether the test passed or not; deleting one end of a veth pair
removes the other, and a macvlan goes with its parent, so deletion order does
not matter and "already gone" is not an error. `NetNs` is a namespace of its
own (its own routes, its own /sys/class/net), deleted with everything in it.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

PREFIX = "ndt"
SYS_CLASS_NET = Path("/sys/class/net")
BATCH = 256
"""Commands per `ip -batch` call: large enough to be one burst, small enough that a
failure part way leaves little for close() to find one by one."""


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

    def ifbs(self, count: int, group: int | None = None, per_batch: int = BATCH) -> list[str]:
        """Creates `count` ifb interfaces (the cheapest kind: no peer, no parent, no
        queue discipline work) in `ip -batch` calls of `per_batch` each; with `group`,
        one `delete_group(group)` removes them all at once. Returns their names."""
        names = [self.name() for _ in range(count)]
        in_group = f" group {group}" if group is not None else ""
        for start in range(0, count, per_batch):
            chunk = names[start : start + per_batch]
            self.batch([f"link add {name}{in_group} type ifb" for name in chunk], chunk)
        return names

    def delete_many(self, names: Sequence[str], per_batch: int = BATCH) -> None:
        """Deletes interfaces in `ip -force -batch` calls (one kernel burst each); the
        `-force` keeps going past one that is already gone."""
        for start in range(0, len(names), per_batch):
            chunk = names[start : start + per_batch]
            _force_batch([f"link del {name}" for name in chunk])

    def delete_group(self, group: int) -> None:
        """Deletes every interface in `group` with one command, as `ip link del group` does."""
        ip("link", "del", "group", str(group), check=False)

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
            for start in range(0, len(left), BATCH):
                _force_batch([f"link del {name}" for name in left[start : start + BATCH]])
            left = [name for name in left if exists(name)]
        for name in left:
            self.delete(name)
        still = [name for name in left if exists(name)]
        if still:
            raise RuntimeError(f"could not delete test interfaces: {', '.join(still)}")


def _force_batch(commands: Sequence[str]) -> None:
    subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"{c}\n" for c in commands), capture_output=True, text=True, timeout=120)


class NetNs:
    """A network namespace of its own, deleted (with every interface in it) on close.

    Routes made here are private, so a test can give an interface the default
    route without touching the machine's. `run_python` runs code inside it through
    `ip netns exec`, which also mounts a /sys that shows this namespace's interfaces.
    """

    def __init__(self) -> None:
        self.name = unique_name("ndtns")
        ip("netns", "add", self.name)

    def __enter__(self) -> NetNs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        return ip("-n", self.name, *args)

    def batch(self, commands: Sequence[str]) -> None:
        text = "\n".join(commands) + "\n"
        result = subprocess.run(["ip", "-n", self.name, "-batch", "-"], input=text, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"ip -n {self.name} -batch failed ({result.returncode}): {result.stderr.strip()[:500]}")

    def run_python(self, code: str, timeout: float = 60) -> str:
        """Runs `code` with this interpreter inside the namespace; returns its stdout."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"python in netns {self.name} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        return result.stdout

    def close(self) -> None:
        ip("netns", "del", self.name, check=False)


@pytest.fixture
def netns() -> Iterator[NetNs]:
    """A private network namespace for one test, deleted at its end whatever happened."""
    if reason := ip_available():
        pytest.skip(reason)
    with NetNs() as made:
        yield made


IFF_UP_BROADCAST_MULTICAST = 0x1003
IFF_DOWN_BROADCAST_MULTICAST = 0x1002
ROUTE_HEADER = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"


class FixtureNet:
    """Fixture trees shaped like <sysfs>/class/net and <proc>/net, for drivers pointed at them.

    `root/sys` is the sysfs root and `root/proc` the proc root; the route tables
    start empty, so the machine's own default route stays out of fixture tests.
    """

    def __init__(self, root: Path) -> None:
        self.root = root / "sys"
        self.proc = root / "proc"
        self.net = self.root / "class" / "net"
        self.proc_net = self.proc / "net"
        self.net.mkdir(parents=True)
        self.proc_net.mkdir(parents=True)
        self.routes()

    def add(
        self,
        name: str,
        *,
        arphrd: int = 1,
        operstate: str = "up",
        up: bool = True,
        carrier: bool = True,
        driver: str | None = None,
        numa: int | None = None,
        lower: tuple[str, ...] = (),
    ) -> Path:
        base = self.net / name
        base.mkdir()
        (base / "type").write_text(f"{arphrd}\n")
        (base / "operstate").write_text(f"{operstate}\n")
        (base / "flags").write_text(f"{hex(IFF_UP_BROADCAST_MULTICAST if up else IFF_DOWN_BROADCAST_MULTICAST)}\n")
        if up:  # the kernel refuses to read `carrier` of a down link; leave it out as a reminder
            (base / "carrier").write_text("1\n" if carrier else "0\n")
        if driver is not None or numa is not None:
            device = self.root / "devices" / "pci0000:00" / f"0000:00:{len(os.listdir(self.net)):02x}.0"
            device.mkdir(parents=True)
            if numa is not None:
                (device / "numa_node").write_text(f"{numa}\n")
            if driver is not None:
                target = self.root / "bus" / "pci" / "drivers" / driver
                target.mkdir(parents=True, exist_ok=True)
                (device / "driver").symlink_to(target)
            (base / "device").symlink_to(device)
        for lower_name in lower:
            (base / f"lower_{lower_name}").symlink_to(self.net / lower_name)
        return base

    def remove(self, name: str) -> None:
        shutil.rmtree(self.net / name)

    def rename(self, old: str, new: str) -> None:
        (self.net / old).rename(self.net / new)

    def set(self, name: str, file: str, value: str) -> None:
        (self.net / name / file).write_text(f"{value}\n")

    def routes(self, ipv4_default: Sequence[str] = (), ipv6_default: Sequence[str] = ()) -> None:
        """Writes route tables in the kernel's format with default routes via these interfaces."""
        (self.proc_net / "route").write_text(
            ROUTE_HEADER + "".join(f"{name}\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n" for name in ipv4_default)
        )
        (self.proc_net / "ipv6_route").write_text(
            "".join(
                f"{'0' * 32} 00 {'0' * 32} 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003 {name:>8}\n"
                for name in ipv6_default
            )
        )


@pytest.fixture
def netifs() -> Iterator[NetIfs]:
    """Real interfaces for one test, deleted at its end whatever happened."""
    if reason := ip_available():
        pytest.skip(reason)
    with NetIfs(prefix=unique_name()[:7]) as made:  # `ndt` + 4 hex of its own: `<prefix>*` is this test's
        yield made
