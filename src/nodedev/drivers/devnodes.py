"""Shareable device nodes, drop-in for KubeVirt virt-handler's built-in plugins.

KubeVirt advertises /dev/kvm, /dev/net/tun and /dev/vhost-net as `maxDevices`
identical IDs (`kvm0`, `kvm1`, ...) under `devices.kubevirt.io/<name>`, so many
VMs on one node can each request one. We keep the same resource names and ID
shapes so existing VirtualMachine specs schedule unchanged when nodedev replaces
those plugins. Every ID stands for the same node, so all IDs share one health
and one `ContainerEdits`: the host merges the node into a request once however
many IDs it names.

A node is Healthy only if it is what it claims to be: a character device inside
the dev root. Anything else at that path (a regular file, a directory, a
socket, a symlink to /etc/hostname) would be handed to containers read-write,
so it is Unhealthy with a reason that says what was found instead.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from nodedev import native
from nodedev.driver import (
    ContainerEdits,
    Device,
    DeviceNode,
    Driver,
    DriverOptions,
    Health,
    HostContext,
    Snapshot,
    UdevMatch,
)

RESOURCE_DOMAIN = "devices.kubevirt.io"

NODE_ACTIONS = frozenset({"add", "remove"})
"""A misc node's health changes only when it appears or goes (module load/unload);
`change` uevents (udev re-applying permissions) need no rescan."""


class DevNodeOptions(DriverOptions):
    shares: int = Field(default=1000, ge=1, le=100_000)
    """How many pods may hold the node at once. KubeVirt's `--max-devices` default is 1000;
    the cap keeps a typo from making every ListAndWatch carry millions of IDs."""


def _kvm_check(path: Path) -> tuple[bool, str]:
    """A /dev/kvm that opens but answers another API version would make QEMU refuse to start."""
    try:
        version = native.kvm_api_version(path)
    except OSError as err:
        return False, f"KVM_GET_API_VERSION on {path} failed: [Errno {err.errno}] {err.strerror}"
    if version != native.KVM_API_VERSION:
        return False, f"{path} answers KVM API {version}, expected {native.KVM_API_VERSION}"
    return True, f"{path} present, KVM API {version}"


_FILE_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """What a non-character file is, in the words a reason uses."""
    for test, words in _FILE_KINDS:
        if test(mode):
            return words
    return f"a file of type {stat.S_IFMT(mode):#o}"


def _outside(path: Path, root: Path) -> str | None:
    """Where `path` really is, if that is outside `root` (through a symlink on the
    node or on a directory above it); else None.

    A node that resolves outside the dev root is not the kernel's node but some
    other file (/etc/hostname, a host socket) that containers would get read-write.
    """
    real_root = os.path.realpath(root)
    target = os.path.realpath(path)
    if os.path.commonpath([real_root, target]) == real_root:
        return None
    return target


def node_problem(path: Path, root: Path) -> str | None:
    """Why `path` is not a usable character device under `root`, or None if it is."""
    try:
        outside = _outside(path, root)
        if outside is not None:
            how = "is a symlink to" if path.is_symlink() else "resolves to"
            return f"{path} {how} {outside}, outside {root}"
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"{path} is a symlink to {os.readlink(path)}, which is missing"
        return f"{path} is missing"
    except OSError as err:
        return f"cannot stat {path}: [Errno {err.errno}] {err.strerror}"
    if not stat.S_ISCHR(mode):
        return f"{path} is {file_kind(mode)}, not a character device"
    return None


class DevNodeDriver(Driver[DevNodeOptions]):
    """One device node offered as `shares` identical IDs; subclasses only set the data."""

    Options: ClassVar[type[DriverOptions]] = DevNodeOptions

    node: ClassVar[str]
    """Path of the node relative to the dev root, and under /dev in the container."""
    kernel_name: ClassVar[str]
    """The misc device's kernel name, which its uevents carry."""

    def __init__(self, options: DevNodeOptions, host: HostContext) -> None:
        super().__init__(options, host)
        self._ids = tuple(f"{self.name}{i}" for i in range(options.shares))
        node = DeviceNode(host_path=str(self.host_path), container_path=f"/dev/{self.node}", permissions="rw")
        self._edits = ContainerEdits(devices=(node,))

    @classmethod
    def resource(cls) -> str:
        return f"{RESOURCE_DOMAIN}/{cls.name}"

    @classmethod
    def declared_resources(cls, options: DevNodeOptions) -> list[str]:
        return [cls.resource()]

    @property
    def host_path(self) -> Path:
        return self.host.dev_root / self.node

    def _health(self) -> tuple[Health, str]:
        path = self.host_path
        problem = node_problem(path, self.host.dev_root)
        if problem is not None:
            return Health.UNHEALTHY, problem
        healthy, reason = self.check(path)
        return (Health.HEALTHY if healthy else Health.UNHEALTHY), reason

    def check(self, path: Path) -> tuple[bool, str]:
        """Beyond being a character device: (healthy, reason). Most nodes need no more."""
        return True, f"{path} present"

    def scan(self, changed: Collection[str] | None = None) -> Snapshot:
        """One node, one health: `changed` cannot narrow anything, so it is not read."""
        health, reason = self._health()
        devices = [Device(id=device_id, health=health, reason=reason, edits=self._edits) for device_id in self._ids]
        return {self.resource(): devices}

    def udev_matches(self) -> Sequence[UdevMatch]:
        return (UdevMatch("misc", self.kernel_name, actions=NODE_ACTIONS),)

    def watch_paths(self) -> Sequence[Path]:
        return (self.host_path.parent,)


class KvmDriver(DevNodeDriver):
    name = "kvm"
    node = "kvm"
    kernel_name = "kvm"

    def check(self, path: Path) -> tuple[bool, str]:
        return _kvm_check(path)


class TunDriver(DevNodeDriver):
    name = "tun"
    node = "net/tun"
    kernel_name = "tun"


class VhostNetDriver(DevNodeDriver):
    name = "vhost-net"
    node = "vhost-net"
    kernel_name = "vhost-net"
