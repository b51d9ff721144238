"""NVIDIA's environment variables, over the config file, as NVIDIA's plugin takes them.

NVIDIA's plugin reads each setting from its command-line flag, else from its
environment variable, else from the config file. nodedev has no per-setting
flags, so here the environment wins over the file: the Helm chart and the GPU
operator set these variables, and a node moved to nodedev must behave the same.

Values are parsed the way NVIDIA's CLI library parses them: booleans as Go's
`strconv.ParseBool` (1, t, true, TRUE, ... / 0, f, false, ...), lists as
comma-separated items, and an empty variable counts as unset. Each value
replaces the file's key before validation, so a bad value is refused with the
same rules and names the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


@dataclass(frozen=True, slots=True)
class Variable:
    names: tuple[str, ...]
    """The variable and its aliases; the first one set wins, as in NVIDIA's CLI."""
    key: tuple[str, ...]
    """Where it goes in `drivers.nvidia`, in the file's spelling."""
    kind: type = str

    @property
    def dotted(self) -> str:
        return ".".join(self.key)


VARIABLES: tuple[Variable, ...] = (
    Variable(("MIG_STRATEGY",), ("flags", "migStrategy")),
    Variable(("FAIL_ON_INIT_ERROR",), ("flags", "failOnInitError"), bool),
    Variable(("NVIDIA_DRIVER_ROOT",), ("flags", "nvidiaDriverRoot")),
    Variable(("NVIDIA_DEV_ROOT",), ("flags", "nvidiaDevRoot")),
    Variable(("MPS_ROOT",), ("flags", "mpsRoot")),
    Variable(("GDRCOPY_ENABLED",), ("flags", "gdrcopyEnabled"), bool),
    Variable(("GDS_ENABLED",), ("flags", "gdsEnabled"), bool),
    Variable(("MOFED_ENABLED",), ("flags", "mofedEnabled"), bool),
    Variable(("DEVICE_DISCOVERY_STRATEGY",), ("flags", "deviceDiscoveryStrategy")),
    Variable(("PASS_DEVICE_SPECS",), ("flags", "plugin", "passDeviceSpecs"), bool),
    Variable(("DEVICE_LIST_STRATEGY",), ("flags", "plugin", "deviceListStrategy"), list),
    Variable(("DEVICE_ID_STRATEGY",), ("flags", "plugin", "deviceIDStrategy")),
    Variable(("CDI_ANNOTATION_PREFIX",), ("flags", "plugin", "cdiAnnotationPrefix")),
    Variable(("NVIDIA_CDI_HOOK_PATH", "NVIDIA_CTK_PATH"), ("flags", "plugin", "nvidiaCTKPath")),
    Variable(("DRIVER_ROOT_CTR_PATH", "CONTAINER_DRIVER_ROOT"), ("flags", "plugin", "containerDriverRoot")),
    Variable(("SHARED_DEVICES_ALLOCATION_POLICY",), ("flags", "plugin", "sharedDevicesAllocationPolicy")),
)


IGNORED: dict[str, str] = {
    "CONFIG_FILE": "nodedev reads the file given by --config",
    "KUBELET_SOCKET": "nodedev uses <pluginDir>/kubelet.sock",
    "IMEX_CHANNEL_IDS": "IMEX channels are not supported by nodedev",
    "IMEX_REQUIRED": "IMEX channels are not supported by nodedev",
    "CDI_FEATURE_FLAGS": "nodedev writes its own CDI spec, without the toolkit's feature flags",
    "CDI_DISABLE_HOOKS": "the CDI spec has a hook only when flags.plugin.nvidiaCTKPath is set",
}
"""NVIDIA's variables nodedev does not use, and why: each one set gets a warning at start."""


def ignored(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per NVIDIA variable that is set but has no effect here."""
    env = os.environ if environ is None else environ
    return [f"environment {name}={env[name]} ignored: {why}" for name, why in IGNORED.items() if env.get(name, "") != ""]


@dataclass(frozen=True, slots=True)
class Override:
    """One setting the environment decided."""

    variable: str
    key: str
    """`flags.migStrategy`"""
    value: str
    """As the environment spelled it."""
    file_value: Any
    """What the config file said; None when it did not set the key."""

    def describe(self) -> str:
        replaced = f" over the file's {self.file_value!r}" if self.file_value is not None else ""
        return f"{self.variable}={self.value} ({self.key}{replaced})"


def _parse(variable: Variable, name: str, raw: str) -> Any:
    if variable.kind is bool:
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise ValueError(f"environment {name}={raw!r}: not a boolean (true or false, 1 or 0)")
    if variable.kind is list:
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def _lookup(data: Mapping[str, Any], key: tuple[str, ...]) -> Any:
    node: Any = data
    for part in key:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _assign(data: dict[str, Any], key: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of `data` with `key` set, copying only the mappings on the way."""
    head, rest = key[0], key[1:]
    out = dict(data)
    if not rest:
        out[head] = value
        return out
    inner = out.get(head)
    if inner is not None and not isinstance(inner, Mapping):
        return out  # not a mapping: left for validation to refuse in the file's words
    out[head] = _assign(dict(inner or {}), rest, value)
    return out


DEFAULT_IGNORED_XIDS: tuple[int, ...] = (13, 31, 43, 45, 68, 109)
"""NVIDIA's default: application errors (13, 31, 43, 45, 68) and 109 (context switch timeout)."""


def _xids(name: str, raw: str) -> list[int]:
    try:
        return [int(item) for item in raw.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"environment {name}={raw!r}: want 'all' or a comma list of Xid numbers") from None


def _health(data: dict[str, Any], env: Mapping[str, str], overrides: list[Override]) -> dict[str, Any]:
    """NVIDIA's DP_DISABLE_HEALTHCHECKS (`all`/`xids`: no health checks; else Xids added to
    the ignored ones) and DP_ENABLE_HEALTHCHECKS (`all`: no Xid ignored; else Xids always critical)."""
    health = data.get("health")
    if health is not None and not isinstance(health, Mapping):
        return data
    health = dict(health or {})
    disable, enable = env.get("DP_DISABLE_HEALTHCHECKS", ""), env.get("DP_ENABLE_HEALTHCHECKS", "")
    if disable:
        words = {w.strip().lower() for w in disable.split(",")}
        if words & {"all", "xids"}:
            overrides.append(Override("DP_DISABLE_HEALTHCHECKS", "health.enabled", disable, health.get("enabled")))
            health["enabled"] = False
        else:
            ignored = list(health.get("ignoredXids", list(DEFAULT_IGNORED_XIDS)))
            overrides.append(Override("DP_DISABLE_HEALTHCHECKS", "health.ignoredXids", disable, health.get("ignoredXids")))
            health["ignoredXids"] = ignored + [x for x in _xids("DP_DISABLE_HEALTHCHECKS", disable) if x not in ignored]
    if enable:
        if enable.strip().lower() == "all":
            overrides.append(Override("DP_ENABLE_HEALTHCHECKS", "health.ignoredXids", enable, health.get("ignoredXids")))
            health["ignoredXids"] = []
        else:
            critical = list(health.get("criticalXids", []))
            overrides.append(Override("DP_ENABLE_HEALTHCHECKS", "health.criticalXids", enable, health.get("criticalXids")))
            health["criticalXids"] = critical + [x for x in _xids("DP_ENABLE_HEALTHCHECKS", enable) if x not in critical]
    if not disable and not enable:
        return data
    return {**data, "health": health}


def overlay(data: Any, environ: Mapping[str, str] | None = None) -> tuple[Any, tuple[Override, ...]]:
    """The section with the environment's values put in, and what each variable replaced.

    A section that is not a mapping is returned as it is, for validation to refuse."""
    if not isinstance(data, Mapping):
        return data, ()
    env = os.environ if environ is None else environ
    out: dict[str, Any] = dict(data)
    overrides: list[Override] = []
    for variable in VARIABLES:
        name = next((n for n in variable.names if env.get(n, "") != ""), None)
        if name is None:
            continue
        raw = env[name]
        overrides.append(Override(name, variable.dotted, raw, _lookup(data, variable.key)))
        out = _assign(out, variable.key, _parse(variable, name, raw))
    out = _health(out, env, overrides)
    return out, tuple(overrides)
