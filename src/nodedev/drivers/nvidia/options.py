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
          plugin:
            passDeviceSpecs: false
            deviceListStrategy: envvar    # or a list / comma list of envvar, volume-mounts,
                                          # cdi-annotations, cdi-cri
            deviceIDStrategy: uuid        # uuid | index
            cdiAnnotationPrefix: cdi.k8s.io/
            sharedDevicesAllocationPolicy: distributed   # distributed | packed
        sharing:
          timeSlicing:
            renameByDefault: false
            failRequestsGreaterThanOne: false
            resources:
              - name: nvidia.com/gpu
                replicas: 4
        health:
          enabled: true
          ignoredXids: [13, 31, 43, 45, 68, 109]   # replaces the default list
          criticalXids: []                          # always critical, even if ignored
          quietPeriodSeconds: 300                   # 0 to 86400; null: never recover (NVIDIA's behaviour)
          probeIntervalSeconds: 5                   # 0.1 to 3600
        cdiRoot: /var/run/cdi                       # absolute, as are nvidiaDriverRoot and nvidiaDevRoot
        procRoot: null                    # where driver/nvidia/capabilities is; null = the host's /proc

What NVIDIA accepts and nodedev refuses, so a pasted config fails loudly rather
than silently behaving differently: `sharing.mps` (needs NVIDIA's MPS control
daemon), per-resource `rename`/`devices` (NVIDIA itself strips them),
`resources`, `imex`, and the container-toolkit paths (`nvidiaCTKPath`,
`containerDriverRoot`), since nodedev writes its own CDI spec.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from nodedev.config import path_problem
from nodedev.driver import ConfigSection, DriverOptions

GPU_RESOURCE = "nvidia.com/gpu"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
DEFAULT_IGNORED_XIDS: tuple[int, ...] = (13, 31, 43, 45, 68, 109)
"""NVIDIA's default: application errors (13, 31, 43, 45, 68) and 109 (context switch timeout)."""

DEVICE_LIST_STRATEGIES = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")
CDI_STRATEGIES = frozenset({"cdi-annotations", "cdi-cri"})

OWN_CDI_SPEC = "not used: nodedev writes its own CDI spec (cdiRoot) without the NVIDIA container toolkit"
NVIDIA_IGNORES_IT = "NVIDIA's plugin strips it before use, so nodedev refuses it rather than pretend"

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


def refuse_keys(data: Any, refused: dict[str, str]) -> Any:
    """Raises for an NVIDIA key nodedev deliberately does not take, saying why, so a
    pasted config fails with a reason instead of a bare "unknown key"."""
    if isinstance(data, dict):
        for key, why in refused.items():
            if key in data:
                raise ValueError(f"{key}: {why}")
    return data


class PluginFlags(ConfigSection):
    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        return refuse_keys(data, {"nvidiaCTKPath": OWN_CDI_SPEC, "containerDriverRoot": OWN_CDI_SPEC})

    pass_device_specs: bool = False
    """Also return the device nodes as DeviceSpecs, for kubelets with the static CPU manager."""
    device_list_strategy: str | list[str] = "envvar"
    device_id_strategy: Literal["uuid", "index"] = Field(default="uuid", alias="deviceIDStrategy")
    cdi_annotation_prefix: str = "cdi.k8s.io/"
    shared_devices_allocation_policy: Literal["distributed", "packed"] = "distributed"

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


class Flags(ConfigSection):
    mig_strategy: Literal["none", "single", "mixed"] = "none"
    fail_on_init_error: bool = True
    nvidia_driver_root: AbsolutePath | None = None
    nvidia_dev_root: AbsolutePath | None = None
    gdrcopy_enabled: bool = False
    gds_enabled: bool = False
    mofed_enabled: bool = False
    device_discovery_strategy: Literal["auto", "nvml"] = "auto"
    plugin: PluginFlags = PluginFlags()


class ReplicatedResource(ConfigSection):
    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        return refuse_keys(data, {"rename": f"{NVIDIA_IGNORES_IT}; use renameByDefault", "devices": NVIDIA_IGNORES_IT})

    name: str
    replicas: int = Field(ge=2, le=1000)
    """NVIDIA requires at least 2; the cap keeps a typo from making ListAndWatch huge."""

    @field_validator("name")
    @classmethod
    def _nvidia_resource(cls, value: str) -> str:
        if value != GPU_RESOURCE and not value.startswith(MIG_RESOURCE_PREFIX):
            raise ValueError(f"must be {GPU_RESOURCE} or {MIG_RESOURCE_PREFIX}<profile>")
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


class Sharing(ConfigSection):
    time_slicing: TimeSlicing | None = None
    mps: Any = None

    @field_validator("mps")
    @classmethod
    def _no_mps(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("MPS sharing is not supported by nodedev; use sharing.timeSlicing")
        return value


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
    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        return refuse_keys(
            data,
            {
                "resources": "renaming GPUs and MIG profiles by pattern is not supported; "
                "resources are nvidia.com/gpu and nvidia.com/mig-<profile>",
                "imex": "IMEX channels are not supported by nodedev",
            },
        )

    version: Literal["v1"] = "v1"
    flags: Flags = Flags()
    sharing: Sharing = Sharing()
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

    @property
    def replicas(self) -> dict[str, int]:
        """Resource name (before any rename) -> replicas per device."""
        slicing = self.sharing.time_slicing
        return {r.name: r.replicas for r in slicing.resources} if slicing else {}

    def shared_name(self, resource: str) -> str:
        """The advertised name: `<name>.shared` for a replicated resource under renameByDefault."""
        slicing = self.sharing.time_slicing
        if slicing is not None and slicing.rename_by_default and resource in self.replicas:
            return f"{resource}.shared"
        return resource
