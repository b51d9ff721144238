"""The node config file: one YAML document, validated whole before anything starts.

Every problem becomes one `ConfigError` line naming the file, the key path and
what is wrong, so `nodedev serve` can exit 2 without a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from nodedev import drivers
from nodedev.driver import ConfigSection, Driver, DriverOptions

DEFAULT_PATH = Path("/etc/nodedev/config.yaml")

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A config problem, already worded for one line: `file: key.path: problem`."""


class HotplugSettings(ConfigSection):

    source: Literal["auto", "udev", "kernel"] = "auto"
    """Netlink source: `udev` events after udevd processed them, `kernel` raw uevents."""
    resync_seconds: float = Field(default=300.0, ge=0)
    """Full rescan of every driver every so often (0 disables), for events never sent."""


class _FileModel(ConfigSection):

    plugin_dir: str = "/var/lib/kubelet/device-plugins"
    sysfs_root: str = "/sys"
    dev_root: str = "/dev"
    proc_root: str = "/proc"
    hotplug: HotplugSettings = HotplugSettings()
    metrics_address: str = ""
    drivers: dict[str, dict[str, Any] | None] = {}

    @field_validator("metrics_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            _, colon, port = value.rpartition(":")
            if not colon or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected host:port such as 0.0.0.0:9465 or :9465, got {value!r}")
        return value


@dataclass(frozen=True)
class EnabledDriver:
    name: str
    cls: type[Driver]
    options: DriverOptions


@dataclass(frozen=True)
class Config:
    path: Path
    plugin_dir: Path
    sysfs_root: Path
    dev_root: Path
    proc_root: Path
    hotplug: HotplugSettings
    metrics_address: str
    drivers: tuple[EnabledDriver, ...]


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def resource_name_problem(name: str) -> str | None:
    """Why the kubelet would refuse `name` as an extended resource, or None if it would not."""
    domain, slash, short = name.partition("/")
    if not slash:
        return f"resource name {name!r} must be <domain>/<name>"
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        return f"resource name {name!r} is in the reserved kubernetes.io domain"
    if name.startswith("requests."):
        return f"resource name {name!r} must not start with 'requests.'"
    if len(domain) > 253 or not _DNS_SUBDOMAIN.match(domain):
        return f"resource name {name!r}: {domain!r} is not a DNS subdomain"
    if len(short) > 63 or not _QUALIFIED_NAME.match(short):
        return f"resource name {name!r}: {short!r} is not a valid name (at most 63 of A-Z a-z 0-9 - _ .)"
    return None


def load(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Reads and validates the whole file; raises ConfigError naming the first problem.

    `overrides` (from `--simulate`) are merged over the file's keys before validation;
    with no path they stand alone.
    """
    if path is None:
        return parse("", Path("(no config file)"), overrides)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    return parse(text, path, overrides)


def parse(text: str, path: Path, overrides: Mapping[str, Any] | None = None) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(raw).__name__}")
    if overrides:
        raw = _merged(raw, overrides)

    model = _validate(_FileModel, raw, path, prefix="")
    enabled = tuple(_driver(name, section, path) for name, section in model.drivers.items())
    enabled = tuple(d for d in enabled if d.options.enabled)
    _check_resources(enabled, path)
    return Config(
        path=path,
        plugin_dir=Path(model.plugin_dir),
        sysfs_root=Path(model.sysfs_root),
        dev_root=Path(model.dev_root),
        proc_root=Path(model.proc_root),
        hotplug=model.hotplug,
        metrics_address=model.metrics_address,
        drivers=enabled,
    )


def _merged(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _driver(name: str, section: Any, path: Path) -> EnabledDriver:
    if name not in drivers.NAMES:
        known = ", ".join(sorted(drivers.NAMES))
        raise ConfigError(f"{path}: drivers.{name}: unknown driver (known: {known})")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: drivers.{name}: expected a mapping of options, got {type(section).__name__}")
    cls = drivers.load(name)
    options = _validate(cls.Options, section, path, prefix=f"drivers.{name}")
    return EnabledDriver(name=name, cls=cls, options=options)


def _check_resources(enabled: tuple[EnabledDriver, ...], path: Path) -> None:
    owner: dict[str, str] = {}
    for d in enabled:
        for resource in d.cls.declared_resources(d.options):
            if problem := resource_name_problem(resource):
                raise ConfigError(f"{path}: drivers.{d.name}: {problem}")
            if resource in owner:
                raise ConfigError(
                    f"{path}: drivers.{d.name}: resource {resource!r} is already served by drivers.{owner[resource]}"
                )
            owner[resource] = d.name


def _validate(model: type[M], data: dict[str, Any], path: Path, prefix: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        keys = [prefix] if prefix else []
        keys += [str(part) if not isinstance(part, int) else f"[{part}]" for part in first["loc"]]
        where = ".".join(keys).replace(".[", "[") or "(top level)"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        elif "input" in first and first["type"] not in ("missing",):
            message = f"{message} (got {first['input']!r})"
        raise ConfigError(f"{path}: {where}: {message}") from None
