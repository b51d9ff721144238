"""The driver contract: all a device-class module implements, and all it knows of the host.

A driver knows its hardware. It does not know gRPC, sockets, the kubelet or the
other drivers. The host owns the wire and the data flows one way: the driver
reports full snapshots, the host diffs them and pushes to the kubelet.

Where each method runs, and what may overlap
--------------------------------------------
- `__init__(options, host)` runs on the host's event loop: store, do not block.
- `start()` runs in a worker thread, once, before the first `scan()`. It may
  block (open a library, a device). Raising `DriverError` disables this driver
  only; the others keep serving.
- `scan(changed)` runs in a worker thread. Never two scans of one driver at
  once, never overlapping `start()` or `stop()`. It returns a *full* snapshot,
  for every resource the driver serves, of its devices with their health.
  `changed` names the kernel devices (interface names, PCI addresses) whose
  events caused this scan; the driver may re-read just those and reuse what it
  read before for the rest. A change in a watched directory (`watch_paths()`)
  names the directory and the entries that changed in it, so a fixture tree
  laid out as sysfs is yields the names a uevent would; names a driver does not
  know (`driver`, `carrier`) may be ignored. `None` means "read everything": at
  start, at the periodic resync, after lost events, and when a watched
  directory itself appeared, vanished or was replaced.
- `allocate()` and `preferred_allocation()` run on the event loop, possibly
  while a `scan()` runs in its thread: they must not block or do I/O, and they
  must read state that `scan()` publishes whole (assign a new dict, never
  mutate one in place).
- `pre_start()` runs in a worker thread and may block; it may overlap a scan.
- `stop()` runs in a worker thread after the last scan has returned; no scan
  follows it.
- `labels()` runs on the event loop after each scan: no I/O, return what the
  last `scan()` computed (published whole, like the state allocate() reads).
- `HostContext.rescan()` is thread-safe and may be called from anywhere.

What a container gets
---------------------
Each `Device` carries its own `ContainerEdits` (device nodes, env values,
mounts, annotations, CDI names). The host assembles an Allocate response from
the edits of the requested devices (see `ContainerEdits.merge`), then adds
what `Driver.allocate()` returns for the request as a whole. Most drivers
override `allocate()` only to refuse a request or to add a value that depends
on the whole request.
"""

from __future__ import annotations

import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

MAX_DEVICE_ID_LENGTH = 63


class Health(enum.StrEnum):
    """The two states the kubelet knows. Unhealthy devices count in capacity only."""

    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


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


ENV_SEPARATOR = ","


@dataclass(frozen=True, slots=True)
class ContainerEdits:
    """What a container needs: for one device, for a whole request, or the merged answer.

    Env values and annotation values of the same key from several devices are
    joined with "," in request order (each distinct value once), which is how
    every peer plugin lists several devices in one variable (NVIDIA_VISIBLE_DEVICES,
    PCIDEVICE_*, NETDEV_*). Device nodes, mounts and CDI names appear once each.
    """

    devices: Sequence[DeviceNode] = ()
    mounts: Sequence[Mount] = ()
    envs: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    cdi_devices: Sequence[str] = ()

    @staticmethod
    def merge(parts: Iterable[ContainerEdits], overrides: ContainerEdits | None = None) -> ContainerEdits:
        """Joins per-device edits as documented above; `overrides` (the driver's own
        answer for the whole request) replaces env and annotation values by key."""
        devices: dict[DeviceNode, None] = {}
        mounts: dict[str, Mount] = {}
        envs: dict[str, dict[str, None]] = {}
        annotations: dict[str, dict[str, None]] = {}
        cdi: dict[str, None] = {}
        for part in parts:
            devices.update(dict.fromkeys(part.devices))
            for mount in part.mounts:
                mounts.setdefault(mount.container_path, mount)
            for key, value in part.envs.items():
                envs.setdefault(key, {})[value] = None
            for key, value in part.annotations.items():
                annotations.setdefault(key, {})[value] = None
            cdi.update(dict.fromkeys(part.cdi_devices))
        joined_envs = {key: ENV_SEPARATOR.join(values) for key, values in envs.items()}
        joined_annotations = {key: ENV_SEPARATOR.join(values) for key, values in annotations.items()}
        if overrides is not None:
            devices.update(dict.fromkeys(overrides.devices))
            for mount in overrides.mounts:
                mounts.setdefault(mount.container_path, mount)
            joined_envs.update(overrides.envs)
            joined_annotations.update(overrides.annotations)
            cdi.update(dict.fromkeys(overrides.cdi_devices))
        return ContainerEdits(
            devices=tuple(devices),
            mounts=tuple(mounts.values()),
            envs=joined_envs,
            annotations=joined_annotations,
            cdi_devices=tuple(cdi),
        )


NO_EDITS = ContainerEdits()


@dataclass(frozen=True, slots=True)
class Device:
    """One schedulable unit of a resource, as the kubelet and operators see it.

    `reason` is for people: why a device is Unhealthy (or what was checked when it
    is Healthy). It is shown by `nodedev discover` and logged on every change; it
    never reaches the kubelet, so a changed reason alone does not cause an update.

    `edits` is what a container allocated this device gets. It takes no part in
    equality: two snapshots that differ only in edits are "no change" to the
    change log and to the kubelet, though Allocate always uses the latest.
    """

    id: str
    health: Health = Health.HEALTHY
    reason: str = ""
    numa_nodes: tuple[int, ...] = ()
    edits: ContainerEdits = field(default=NO_EDITS, compare=False, hash=False)

    @property
    def healthy(self) -> bool:
        return self.health is Health.HEALTHY


Snapshot = Mapping[str, Sequence[Device]]
"""Resource name -> every device of that resource, as found right now."""


@dataclass(frozen=True, slots=True)
class UdevMatch:
    """Kernel device events a driver wants to hear about.

    `subsystem` is the uevent SUBSYSTEM (pci, net, misc, infiniband, ...);
    `sys_name` is an optional fnmatch glob on the device's kernel name (`kvm`,
    `mlx5_*`); `actions` limits the match to these ACTIONs (add, remove, change,
    bind, unbind, move; `link` for rtnetlink link messages), empty meaning all;
    `properties` are fnmatch globs on the event's KEY=value properties
    (`{"PCI_CLASS": "2*"}`, `{"DRIVER": "vfio-pci"}`), all of which must match.
    A property the event lacks does not match. An event that matches triggers a
    (coalesced) `scan()`.
    """

    subsystem: str
    sys_name: str | None = None
    actions: frozenset[str] = frozenset()
    properties: Mapping[str, str] = field(default_factory=dict)


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
    """Base of every driver's config section: `drivers.<name>` in the config file.

    `sysfsRoot`, `devRoot` and `procRoot` here replace the top-level keys for this
    driver alone: how `--simulate` points one driver at a fixture tree and leaves
    the others on the real one.
    """

    enabled: bool = False
    sysfs_root: str | None = None
    dev_root: str | None = None
    proc_root: str | None = None


OptionsT = TypeVar("OptionsT", bound=DriverOptions)


@dataclass(frozen=True, slots=True)
class HostContext:
    """What the host lends a driver: where the trees are, and a way to ask for a rescan."""

    sysfs_root: Path
    dev_root: Path
    """Where the driver finds device nodes; also the host path handed to containers."""
    proc_root: Path
    rescan: Callable[[], None]
    """Thread-safe: asks the host to call `scan()` soon. Calls coalesce."""
    log: logging.Logger


class Driver(ABC, Generic[OptionsT]):
    """Base class of every device-class driver. See the module docstring for the contract."""

    name: ClassVar[str]
    Options: ClassVar[type[DriverOptions]] = DriverOptions
    """The pydantic model of this driver's config section; `OptionsT` must be it."""

    def __init__(self, options: OptionsT, host: HostContext) -> None:
        self.options = options
        self.host = host

    @classmethod
    def declared_resources(cls, options: OptionsT) -> list[str]:
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
    def scan(self, changed: Collection[str] | None = None) -> Snapshot:
        """Every resource's full device list with health, as of now. Runs in a thread."""

    def allocate(self, resource: str, devices: Sequence[Device]) -> ContainerEdits:
        """What one container gets beyond its devices' own `edits`; raise
        AllocationError to refuse. IDs are already checked (known, Healthy, not
        repeated). Runs on the loop: no I/O."""
        return NO_EDITS

    def preferred_allocation(
        self,
        resource: str,
        available: Sequence[str],
        must_include: Sequence[str],
        size: int,
    ) -> list[str]:
        """The IDs to allocate out of `available`, including `must_include`. Optional.

        The host has checked the request: `must_include` is within `available`,
        no ID repeats, and `len(must_include) <= size <= len(available)`.
        """
        raise NotImplementedError

    def pre_start(self, resource: str, device_ids: Sequence[str]) -> None:
        """Prepares devices before the container starts (reset, bind). Optional; may block."""
        raise NotImplementedError

    def labels(self) -> Mapping[str, str]:
        """Node feature labels for Node Feature Discovery (`nvidia.com/gpu.present` -> `true`). Optional.

        Called on the loop after each scan: no I/O; return what `scan()` computed.
        Keys are label names with a DNS-subdomain prefix; values at most 63 of
        [A-Za-z0-9._-]. The host merges every driver's labels into one file.
        """
        return {}

    def udev_matches(self) -> Sequence[UdevMatch]:
        """Kernel events that should make the host rescan this driver."""
        return ()

    def watch_paths(self) -> Sequence[Path]:
        """Directories whose changes should trigger a rescan; asked again after every scan.

        Each directory is watched for entries appearing, vanishing or being
        replaced (a `driver` symlink on rebind) and for files in it rewritten
        (`sriov_numvfs`, `operstate`). List the directories whose changes a scan
        must hear of that are not under the real /sys (which sends uevents
        instead and where inotify sees nothing): a fixture tree, a bind-mounted
        /dev. Where the kernel records a change in two places, one will do: every
        bind also links `bus/pci/drivers/<name>/<address>`, so a few driver
        directories can stand for thousands of function directories. A change reaches
        `scan()` as the directory's name plus the changed entries' names (see
        the module docstring): watch the directory named after what changed,
        `devices/.../<pci>` for its `driver` link, not a parent of it.
        """
        return ()

    @classmethod
    def simulations(cls) -> Sequence[str]:
        """Names of the simulated nodes this driver ships for `--simulate`."""
        return ()

    @classmethod
    def simulate(cls, fixture: str, workdir: Path) -> dict[str, Any] | None:
        """Builds a simulated node for `fixture` under `workdir`, for `--simulate`.

        `fixture` is one of `simulations()` or a path to a file; a driver that does
        not recognise it returns None. Otherwise it makes whatever it needs (fixture
        trees, a fake library loaded into this process) and returns its own config
        section, merged over the user's `drivers.<name>`: usually `enabled: true`
        and its own `sysfsRoot`/`devRoot`/`procRoot`, so other drivers keep the
        real roots.
        """
        return None

    @classmethod
    def implements(cls, hook: str) -> bool:
        """Whether this driver overrides an optional hook, which the kubelet is then told."""
        return getattr(cls, hook) is not getattr(Driver, hook)
