"""The `drivers.nvidia` config section.

Layout decision: the section mirrors NVIDIA k8s-device-plugin's config file
(`version`, `flags`, `flags.plugin`, `sharing.timeSlicing`) with NVIDIA's exact
key spellings, so an existing NVIDIA config can be pasted under `drivers.nvidia`
unchanged. There is one place for each key; NVIDIA's flags are *not* also
accepted flat at the top of the section, so nobody has to guess which of two
spellings wins. nodedev's own keys (`health`, `cdiRoot`) sit at the top of the
section, beside `flags` and `sharing`, with the `sysfsRoot`, `devRoot` and
`procRoot` that every driver's section takes (`--simulate` sets them)::

    drivers:
      nvidia:
        enabled: true
        version: v1                       # optional; only v1 exists
        flags:
          migStrategy: none               # none | single | mixed
          failOnInitError: true
          nvidiaDriverRoot: null          # also the dev root when nvidiaDevRoot is unset
          nvidiaDevRoot: null             # device nodes are <root>/dev/...; null = nodedev's devRoot
          gdrcopyEnabled: false           # NVIDIA_GDRCOPY=enabled in every Allocate
          gdsEnabled: false               # NVIDIA_GDS=enabled
          mofedEnabled: false             # NVIDIA_MOFED=enabled
          deviceDiscoveryStrategy: auto   # auto | nvml (tegra is not supported)
          mpsRoot: null                   # needed by sharing.mps: pipe and log directories go here
          useNodeFeatureAPI: null         # GPU Feature Discovery's: accepted, ignored
          gfd: {}                         # GPU Feature Discovery's: accepted, ignored
          plugin:
            passDeviceSpecs: false
            deviceListStrategy: envvar    # or a list / comma list of envvar, volume-mounts,
                                          # cdi-annotations, cdi-cri
            deviceIDStrategy: uuid        # uuid | index
            cdiAnnotationPrefix: cdi.k8s.io/
            sharedDevicesAllocationPolicy: distributed   # distributed | packed
            nvidiaCTKPath: null           # nvidia-ctk: the CDI spec gets its update-ldcache hook
            containerDriverRoot: null     # where this process sees nvidiaDriverRoot
        resources: {}                     # NVIDIA ignores it (with a log line); so does nodedev
        sharing:
          timeSlicing:                    # or mps: (same keys; needs flags.mpsRoot; wins over timeSlicing)
            renameByDefault: false
            failRequestsGreaterThanOne: false
            resources:
              - name: gpu                 # nvidia.com/ may be left out, as NVIDIA allows
                replicas: 4
                rename: null              # NVIDIA ignores both, with a log line; so does nodedev
                devices: all
        imex: {channelIDs: []}            # accepted while empty; channels are refused
        health:
          enabled: true
          ignoredXids: [13, 31, 43, 45, 68, 109]   # replaces the default list
          criticalXids: []                          # always critical, even if ignored
          quietPeriodSeconds: 300                   # 0 to 86400; null: never recover (NVIDIA's behaviour)
          probeIntervalSeconds: 5                   # 0.1 to 3600
        cdiRoot: /var/run/cdi                       # absolute, as are nvidiaDriverRoot and nvidiaDevRoot
        procRoot: null                    # where driver/nvidia/capabilities is; null = the host's /proc

Every key NVIDIA's config file takes is taken here. What NVIDIA itself ignores
is accepted and ignored with NVIDIA's own log line (per-resource `rename` and
`devices`, top-level `resources`); what belongs to GPU Feature Discovery
(`flags.gfd`, `flags.useNodeFeatureAPI`) is accepted and ignored with one info
line. What nodedev cannot do is refused with the reason: `imex` with channels,
`deviceDiscoveryStrategy: tegra`, and MPS where NVIDIA refuses it too (mixed MIG,
MIG devices, no `mpsRoot`). NVIDIA's environment variables override the file (see
environment.py); `NvidiaOptions.environment` says which did.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PrivateAttr, field_validator, model_validator

from nodedev.config import path_problem
from nodedev.driver import ConfigSection, DriverOptions
from nodedev.drivers.nvidia.environment import DEFAULT_IGNORED_XIDS, Override, overlay

RESOURCE_DOMAIN = "nvidia.com"
GPU_RESOURCE = "nvidia.com/gpu"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"

DEVICE_LIST_STRATEGIES = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")
CDI_STRATEGIES = frozenset({"cdi-annotations", "cdi-cri"})

GFD_IGNORED = "flags.gfd and flags.useNodeFeatureAPI configure GPU Feature Discovery, which nodedev does not run; ignored"
RESOURCES_IGNORED = "Customizing the 'resources' field is not yet supported in the config. Ignoring..."
"""NVIDIA's own words for the keys its plugin strips (DisableResourceNamingInConfig)."""

MIN_PROBE_INTERVAL_S = 0.1
"""Re-probing every GPU more often than this would keep a core busy for nothing."""
MAX_PROBE_INTERVAL_S = 3600.0
MAX_QUIET_PERIOD_S = 86_400.0
"""A day: anything longer is a typo, and `null` already means "never recover"."""


def _absolute(value: str) -> str:
    if problem := path_problem(value):
        raise ValueError(problem)
    return value


AbsolutePath = Annotated[str, AfterValidator(_absolute)]
"""A path key: absolute, refused in the words the host's own root keys use."""


def seconds_within(value: float, low: float, high: float) -> float:
    """`low <= value <= high` (which NaN never is), or a one-line error naming both bounds."""
    if not low <= value <= high:
        raise ValueError(f"must be from {low:g} to {high:g} seconds, got {value!r}")
    return value


class PluginFlags(ConfigSection):
    pass_device_specs: bool = False
    """Also return the device nodes as DeviceSpecs, for kubelets with the static CPU manager."""
    device_list_strategy: str | list[str] = "envvar"
    device_id_strategy: Literal["uuid", "index"] = Field(default="uuid", alias="deviceIDStrategy")
    cdi_annotation_prefix: str = "cdi.k8s.io/"
    shared_devices_allocation_policy: Literal["distributed", "packed"] = "distributed"
    nvidia_ctk_path: AbsolutePath | None = Field(default=None, alias="nvidiaCTKPath")
    """nvidia-ctk (or nvidia-cdi-hook) on the host: the CDI spec gets its update-ldcache hook."""
    container_driver_root: AbsolutePath | None = None
    """Where this process sees nvidiaDriverRoot (nodedev in a container); the CDI spec
    still names host paths under nvidiaDriverRoot."""

    @field_validator("device_list_strategy")
    @classmethod
    def _known_strategies(cls, value: str | list[str]) -> str | list[str]:
        names = _split_strategies(value)
        if not names:
            raise ValueError("at least one device list strategy is needed")
        for name in names:
            if name not in DEVICE_LIST_STRATEGIES:
                raise ValueError(f"unknown device list strategy {name!r} (known: {', '.join(DEVICE_LIST_STRATEGIES)})")
        return value

    @field_validator("cdi_annotation_prefix")
    @classmethod
    def _prefix_ends_in_slash(cls, value: str) -> str:
        if not value.endswith("/") or value.count("/") != 1:
            raise ValueError("must be a domain followed by one '/', like 'cdi.k8s.io/'")
        return value

    @property
    def device_list_strategies(self) -> tuple[str, ...]:
        return _split_strategies(self.device_list_strategy)


def _split_strategies(value: str | list[str]) -> tuple[str, ...]:
    """NVIDIA takes a list or one string, and its CLI form separates several with commas."""
    items = [value] if isinstance(value, str) else value
    seen: dict[str, None] = {}
    for item in items:
        for part in item.split(","):
            if part.strip():
                seen[part.strip()] = None
    return tuple(seen)


_GO_DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")


def _go_duration(value: str | int) -> str | int:
    if isinstance(value, str) and not _GO_DURATION.fullmatch(value):
        raise ValueError(f"not a Go duration like '60s' or '1m30s', got {value!r}")
    return value


GoDuration = Annotated[str | int, AfterValidator(_go_duration)]
"""NVIDIA's Duration: a Go duration string, or a number of nanoseconds."""


class GfdFlags(ConfigSection):
    """GPU Feature Discovery's settings: accepted so NVIDIA's combined config pastes in, unused."""

    oneshot: bool | None = None
    no_timestamp: bool | None = None
    sleep_interval: GoDuration | None = None
    output_file: str | None = None
    machine_type_file: str | None = None


class Flags(ConfigSection):
    mig_strategy: Literal["none", "single", "mixed"] = "none"
    fail_on_init_error: bool = True
    nvidia_driver_root: AbsolutePath | None = None
    nvidia_dev_root: AbsolutePath | None = None
    gdrcopy_enabled: bool = False
    gds_enabled: bool = False
    mofed_enabled: bool = False
    device_discovery_strategy: Literal["auto", "nvml"] = "auto"
    mps_root: AbsolutePath | None = None
    """Only MPS sharing uses it, which nodedev refuses; accepted so NVIDIA's flags paste in."""
    use_node_feature_api: bool | None = Field(default=None, alias="useNodeFeatureAPI")
    gfd: GfdFlags | None = None
    plugin: PluginFlags = PluginFlags()


class ReplicatedResource(ConfigSection):
    name: str
    """`nvidia.com/gpu`, `nvidia.com/mig-<profile>`, or the same without `nvidia.com/`, as NVIDIA takes them."""
    replicas: int = Field(ge=2, le=1000)
    """NVIDIA requires at least 2; the cap keeps a typo from making ListAndWatch huge."""
    rename: str | None = None
    """Ignored with NVIDIA's log line, as NVIDIA's plugin ignores it."""
    devices: str | int | list[str | int] | None = None
    """Ignored with NVIDIA's log line unless `all`: every device is replicated, as in NVIDIA's plugin."""

    @field_validator("name")
    @classmethod
    def _nvidia_resource(cls, value: str) -> str:
        if "/" not in value:
            value = f"{RESOURCE_DOMAIN}/{value}"
        if value != GPU_RESOURCE and not value.startswith(MIG_RESOURCE_PREFIX):
            raise ValueError(f"must be gpu or mig-<profile>, with or without {RESOURCE_DOMAIN}/")
        return value


class TimeSlicing(ConfigSection):
    rename_by_default: bool = False
    fail_requests_greater_than_one: bool = False
    resources: list[ReplicatedResource] = Field(min_length=1)

    @field_validator("resources")
    @classmethod
    def _unique_names(cls, value: list[ReplicatedResource]) -> list[ReplicatedResource]:
        names = [r.name for r in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"{name} is listed more than once")
        return value


    def ignored_lines(self, form: str, shared_name: Callable[[str], str]) -> list[str]:
        """NVIDIA's log lines for the per-resource keys its plugin strips."""
        lines = []
        if any(r.rename is not None and r.rename != shared_name(r.name) for r in self.resources):
            lines.append(f"Setting the 'rename' field in sharing.{form}.resources is not yet supported in the config. Ignoring...")
        if any(r.devices is not None and r.devices != "all" for r in self.resources):
            lines.append(f"Customizing the 'devices' field in sharing.{form}.resources is not yet supported in the config. Ignoring...")
        return lines


class NamePattern(ConfigSection):
    pattern: str
    name: str


class ResourcePatterns(ConfigSection):
    """NVIDIA's top-level `resources`: accepted and ignored, as NVIDIA's plugin ignores it."""

    gpus: list[NamePattern] = []
    mig: list[NamePattern] = []


class Imex(ConfigSection):
    channel_ids: list[int] = Field(default_factory=list, alias="channelIDs")
    required: bool = False

    @field_validator("channel_ids")
    @classmethod
    def _no_channels(cls, value: list[int]) -> list[int]:
        if value:
            raise ValueError("IMEX channels are not supported by nodedev (an empty list is accepted)")
        return value


class Sharing(ConfigSection):
    time_slicing: TimeSlicing | None = None
    mps: TimeSlicing | None = None
    """Same keys as timeSlicing; failRequestsGreaterThanOne is always on, as NVIDIA forces it."""

    @property
    def replicated(self) -> TimeSlicing | None:
        """What replicates devices: MPS when given (NVIDIA's plugin then ignores timeSlicing)."""
        return self.mps if self.mps is not None else self.time_slicing


class HealthOptions(ConfigSection):
    enabled: bool = True
    """Off: no NVML event thread, every GPU NVML can see is Healthy."""
    ignored_xids: list[int] = Field(default_factory=lambda: list(DEFAULT_IGNORED_XIDS))
    """Xids that never mark a device Unhealthy. Replaces NVIDIA's default list when given."""
    critical_xids: list[int] = []
    """Xids that always mark a device Unhealthy, even if also in ignoredXids."""
    quiet_period_seconds: float | None = 300.0
    """A faulted GPU is Healthy again once NVML probes it fine and no critical event came
    for this long (0 to 86400). None keeps it Unhealthy until nodedev restarts, as NVIDIA's
    plugin does."""
    probe_interval_seconds: float = 5.0
    """How often the event thread re-probes GPUs between event waits (0.1 to 3600)."""

    @field_validator("quiet_period_seconds")
    @classmethod
    def _quiet_bounds(cls, value: float | None) -> float | None:
        return None if value is None else seconds_within(value, 0, MAX_QUIET_PERIOD_S)

    @field_validator("probe_interval_seconds")
    @classmethod
    def _probe_bounds(cls, value: float) -> float:
        return seconds_within(value, MIN_PROBE_INTERVAL_S, MAX_PROBE_INTERVAL_S)


class NvidiaOptions(DriverOptions):
    @model_validator(mode="wrap")
    @classmethod
    def _from_environment(cls, data: Any, handler: Callable[[Any], NvidiaOptions]) -> NvidiaOptions:
        """NVIDIA's environment variables replace the file's keys before validation."""
        merged, overrides = overlay(data)
        options = handler(merged)
        options._environment = overrides
        return options

    _environment: tuple[Override, ...] = PrivateAttr(default=())

    version: Literal["v1"] = "v1"
    flags: Flags = Flags()
    resources: ResourcePatterns | None = None
    sharing: Sharing = Sharing()
    imex: Imex | None = None
    health: HealthOptions = HealthOptions()
    cdi_root: AbsolutePath = "/var/run/cdi"
    """Where the CDI spec goes when a cdi-* device list strategy is used."""

    @model_validator(mode="after")
    def _mig_names_need_mixed(self) -> NvidiaOptions:
        slicing = self.sharing.time_slicing
        if slicing is not None and self.flags.mig_strategy != "mixed":
            for resource in slicing.resources:
                if resource.name != GPU_RESOURCE:
                    raise ValueError(
                        f"sharing.timeSlicing.resources: {resource.name} exists only with flags.migStrategy mixed"
                    )
        return self

    @model_validator(mode="after")
    def _mps_as_nvidia_allows_it(self) -> NvidiaOptions:
        """NVIDIA's rules for MPS (validateFlags): not with mixed MIG, and only with an MPS root."""
        if self.sharing.mps is None:
            return self
        if self.flags.mig_strategy == "mixed":
            raise ValueError("sharing.mps: MPS is not supported with flags.migStrategy mixed (nor by NVIDIA's plugin)")
        if self.flags.mps_root is None:
            raise ValueError("sharing.mps needs flags.mpsRoot (NVIDIA's --mps-root, MPS_ROOT), e.g. /run/nvidia/mps")
        for resource in self.sharing.mps.resources:
            if resource.name != GPU_RESOURCE:
                raise ValueError(f"sharing.mps.resources: {resource.name}: MPS shares whole GPUs only ({GPU_RESOURCE})")
        return self

    @property
    def environment(self) -> tuple[Override, ...]:
        """The settings NVIDIA's environment variables decided, in the order of `VARIABLES`."""
        return self._environment

    def ignored(self) -> list[str]:
        """One line for each group of keys accepted and ignored, NVIDIA's own words where it has them."""
        lines = []
        if self.flags.gfd is not None or self.flags.use_node_feature_api is not None:
            lines.append(GFD_IGNORED)
        if self.resources is not None and (self.resources.gpus or self.resources.mig):
            lines.append(RESOURCES_IGNORED)
        if self.sharing.mps is not None:
            lines += self.sharing.mps.ignored_lines("mps", self.shared_name)
            if self.sharing.time_slicing is not None:
                lines.append("sharing.timeSlicing ignored: sharing.mps is given, and NVIDIA's plugin then uses MPS")
            if "fail_requests_greater_than_one" in self.sharing.mps.model_fields_set and not self.sharing.mps.fail_requests_greater_than_one:
                lines.append("sharing.mps.failRequestsGreaterThanOne is always on, as NVIDIA's plugin forces it")
        elif self.sharing.time_slicing is not None:
            lines += self.sharing.time_slicing.ignored_lines("timeSlicing", self.shared_name)
        return lines

    @property
    def replicas(self) -> dict[str, int]:
        """Resource name (before any rename) -> replicas per device."""
        slicing = self.sharing.replicated
        return {r.name: r.replicas for r in slicing.resources} if slicing else {}

    def shared_name(self, resource: str) -> str:
        """The advertised name: `<name>.shared` for a replicated resource under renameByDefault."""
        slicing = self.sharing.replicated
        if slicing is not None and slicing.rename_by_default and resource in self.replicas:
            return f"{resource}.shared"
        return resource
