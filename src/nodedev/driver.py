"""The driver contract: all a device-class module implements, and all it knows of the host.

A driver knows its hardware. It does not know gRPC, sockets, the kubelet or the
other drivers. The host owns the wire and the data flows one way:

1. The host builds the driver from its validated config section (`Options`).
2. `start()` opens whatever the driver needs (a library, a device). It may block:
   the host calls it in a worker thread. Raising `DriverError` disables this
   driver only; the others keep serving.
3. `scan()` returns a *full* snapshot, for every resource the driver serves, of
   its devices with their health. The host diffs snapshots and pushes to the
   kubelet only what changed. There are no partial updates. The host calls
   `scan()` in a worker thread: at start, on a kernel event the driver asked for
   (`udev_matches`, `watch_paths`), on a periodic resync, and whenever the
   driver itself calls `HostContext.rescan()` (say, from its own event thread).
4. `allocate()` is called on the host's event loop for one container's devices,
   after the host has checked that every ID is known, Healthy and not repeated.
   It must not block: compute the answer from state gathered in `scan()`.
5. `preferred_allocation()` and `pre_start()` are optional. The host tells the
   kubelet it supports them exactly when a driver overrides them.
   `preferred_allocation()` runs on the loop (no I/O); `pre_start()` runs in a
   worker thread and may block.
6. `stop()` releases what `start()` opened.
"""

from __future__ import annotations

import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

MAX_DEVICE_ID_LENGTH = 63


class Health(enum.StrEnum):
    """The two states the kubelet knows. Unhealthy devices count in capacity only."""

    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


@dataclass(frozen=True, slots=True)
class Device:
    """One schedulable unit of a resource, as the kubelet and operators see it.

    `reason` is for people: why a device is Unhealthy (or what was checked when it
    is Healthy). It is shown by `nodedev discover` and logged on every change; it
    never reaches the kubelet, so a changed reason alone does not cause an update.
    """

    id: str
    health: Health = Health.HEALTHY
    reason: str = ""
    numa_nodes: tuple[int, ...] = ()

    @property
    def healthy(self) -> bool:
        return self.health is Health.HEALTHY


Snapshot = Mapping[str, Sequence[Device]]
"""Resource name -> every device of that resource, as found right now."""


@dataclass(frozen=True, slots=True)
class DeviceNode:
    """A device node for the container (the kubelet's DeviceSpec)."""

    host_path: str
    container_path: str
    permissions: str = "rw"


@dataclass(frozen=True, slots=True)
class Mount:
    host_path: str
    container_path: str
    read_only: bool = False


@dataclass(slots=True)
class Allocation:
    """What one container gets for the devices allocated to it."""

    envs: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    devices: list[DeviceNode] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    cdi_devices: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class UdevMatch:
    """Kernel device events a driver wants to hear about.

    `subsystem` is the uevent SUBSYSTEM (pci, net, misc, infiniband, ...);
    `sys_name` is an optional fnmatch glob on the device's kernel name (`kvm`,
    `mlx5_*`). An event that matches triggers a (coalesced) `scan()`.
    """

    subsystem: str
    sys_name: str | None = None


class DriverError(Exception):
    """A driver cannot start or scan; the message names the device, file or library."""


class AllocationError(Exception):
    """A request the driver refuses; the kubelet gets INVALID_ARGUMENT with this message."""


class ConfigSection(BaseModel):
    """Rules for every mapping in the config file, the host's and each driver's alike.

    Keys are camelCase in YAML, unknown keys are errors, and values are not coerced
    between types, so a typo or a quoted number is reported instead of guessed at.
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
    )


class DriverOptions(ConfigSection):
    """Base of every driver's config section: `drivers.<name>` in the config file."""

    enabled: bool = False


@dataclass(frozen=True, slots=True)
class HostContext:
    """What the host lends a driver: where the trees are, and a way to ask for a rescan."""

    sysfs_root: Path
    dev_root: Path
    rescan: Callable[[], None]
    """Thread-safe: asks the host to call `scan()` soon. Calls coalesce."""
    log: logging.Logger


class Driver(ABC):
    """Base class of every device-class driver. See the module docstring for the contract."""

    name: ClassVar[str]
    Options: ClassVar[type[DriverOptions]] = DriverOptions

    def __init__(self, options: DriverOptions, host: HostContext) -> None:
        self.options = options
        self.host = host

    @classmethod
    def declared_resources(cls, options: DriverOptions) -> list[str]:
        """Resource names known from the config alone, checked for clashes before start.

        A driver whose names depend on hardware (MIG profiles) lists what it can;
        a name a scan reports later that another driver owns is refused then.
        """
        return []

    def start(self) -> None:
        """Opens libraries and devices. Blocking is fine; raise DriverError to stay off."""

    def stop(self) -> None:
        """Releases what start() opened."""

    @abstractmethod
    def scan(self) -> Snapshot:
        """Every resource's full device list with health, as of now. Runs in a thread."""

    @abstractmethod
    def allocate(self, resource: str, device_ids: Sequence[str]) -> Allocation:
        """One container's share. IDs are already checked. Runs on the loop: no I/O."""

    def preferred_allocation(
        self,
        resource: str,
        available: Sequence[str],
        must_include: Sequence[str],
        size: int,
    ) -> list[str]:
        """The IDs to allocate out of `available`, including `must_include`. Optional."""
        raise NotImplementedError

    def pre_start(self, resource: str, device_ids: Sequence[str]) -> None:
        """Prepares devices before the container starts (reset, bind). Optional; may block."""
        raise NotImplementedError

    def udev_matches(self) -> Sequence[UdevMatch]:
        """Kernel events that should make the host rescan this driver."""
        return ()

    def watch_paths(self) -> Sequence[Path]:
        """Directories whose entries appearing or vanishing should trigger a rescan.

        For device nodes under a configurable root, where no uevent accompanies a
        change (a fixture tree, a bind-mounted /dev).
        """
        return ()

    @classmethod
    def implements(cls, hook: str) -> bool:
        """Whether this driver overrides an optional hook, which the kubelet is then told."""
        return getattr(cls, hook) is not getattr(Driver, hook)
