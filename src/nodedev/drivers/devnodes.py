"""Shareable device nodes, drop-in for KubeVirt virt-handler's built-in plugins.

KubeVirt advertises /dev/kvm, /dev/net/tun and /dev/vhost-net as `maxDevices`
identical IDs (`kvm0`, `kvm1`, ...) under `devices.kubevirt.io/<name>`, so many
VMs on one node can each request one. We keep the same resource names and ID
shapes so existing VirtualMachine specs schedule unchanged when nodedev replaces
those plugins. Every ID stands for the same node, so all IDs share one health.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from nodedev import native
from nodedev.driver import (
    Allocation,
    AllocationError,
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


class DevNodeDriver(Driver):
    """One device node offered as `shares` identical IDs; subclasses only set the data."""

    Options: ClassVar[type[DriverOptions]] = DevNodeOptions

    node: ClassVar[str]
    """Path of the node relative to the dev root, and under /dev in the container."""
    kernel_name: ClassVar[str]
    """The misc device's kernel name, which its uevents carry."""
    extra_check: ClassVar[Callable[[Path], tuple[bool, str]] | None] = None
    """Beyond existence: (healthy, reason) for a node that is there."""

    def __init__(self, options: DriverOptions, host: HostContext) -> None:
        super().__init__(options, host)
        shares = options.shares if isinstance(options, DevNodeOptions) else DevNodeOptions().shares
        self._ids = tuple(f"{self.name}{i}" for i in range(shares))

    @classmethod
    def resource(cls) -> str:
        return f"{RESOURCE_DOMAIN}/{cls.name}"

    @classmethod
    def declared_resources(cls, options: DriverOptions) -> list[str]:
        return [cls.resource()]

    @property
    def host_path(self) -> Path:
        return self.host.dev_root / self.node

    def _health(self) -> tuple[Health, str]:
        path = self.host_path
        try:
            os.stat(path)
        except FileNotFoundError:
            return Health.UNHEALTHY, f"{path} is missing"
        except OSError as err:
            return Health.UNHEALTHY, f"cannot stat {path}: [Errno {err.errno}] {err.strerror}"
        check = type(self).extra_check
        if check is None:
            return Health.HEALTHY, f"{path} present"
        healthy, reason = check(path)
        return (Health.HEALTHY if healthy else Health.UNHEALTHY), reason

    def scan(self) -> Snapshot:
        health, reason = self._health()
        devices = [Device(id=device_id, health=health, reason=reason) for device_id in self._ids]
        return {self.resource(): devices}

    def allocate(self, resource: str, device_ids: Sequence[str]) -> Allocation:
        """Any number of IDs still means the one node: the container gets it once."""
        if resource != self.resource():
            raise AllocationError(f"{self.name}: unknown resource {resource!r}")
        node = DeviceNode(host_path=str(self.host_path), container_path=f"/dev/{self.node}", permissions="rw")
        return Allocation(devices=[node])

    def udev_matches(self) -> Sequence[UdevMatch]:
        return (UdevMatch("misc", self.kernel_name),)

    def watch_paths(self) -> Sequence[Path]:
        return (self.host_path.parent,)


class KvmDriver(DevNodeDriver):
    name = "kvm"
    node = "kvm"
    kernel_name = "kvm"
    extra_check = staticmethod(_kvm_check)


class TunDriver(DevNodeDriver):
    name = "tun"
    node = "net/tun"
    kernel_name = "tun"


class VhostNetDriver(DevNodeDriver):
    name = "vhost-net"
    node = "vhost-net"
    kernel_name = "vhost-net"
