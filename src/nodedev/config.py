"""The node config file: one YAML document, validated whole before anything starts.

Every problem becomes one `ConfigError` line naming the file, the key path and
what is wrong, so `nodedev serve` can exit 2 without a traceback. Reading the
file defensively is `configfile`'s job; this module validates what it read.
Validation creates nothing on disk.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError, ValidationInfo, field_validator

from nodedev import drivers
from nodedev.addresses import plausible_host
from nodedev.configfile import ConfigError as ConfigError  # re-exported: callers catch config.ConfigError
from nodedev.configfile import read_text, read_yaml, shown, shown_key, where
from nodedev.driver import ConfigSection, Driver, DriverOptions
from nodedev.labels import DEFAULT_PATH as DEFAULT_FEATURE_FILE

DEFAULT_PATH = Path("/etc/nodedev/config.yaml")

MAX_SOCKET_PATH = 107
"""A unix socket path's limit in bytes (sun_path holds 108 with the terminating NUL)."""
SOCKET_NAME_ROOM = 48
"""Bytes kept for a socket name after `<pluginDir>/`: `nodedev-` + a 35-character resource + `.sock`
(devices.kubevirt.io/vhost-net is 29); kubelet.sock is shorter."""
MAX_PLUGIN_DIR = MAX_SOCKET_PATH - 1 - SOCKET_NAME_ROOM
MAX_RESYNC_SECONDS = 86_400

M = TypeVar("M", bound=BaseModel)


class HotplugSettings(ConfigSection):

    source: Literal["auto", "udev", "kernel"] = "auto"
    """Netlink source: `udev` events after udevd processed them, `kernel` raw uevents."""
    resync_seconds: float = 300.0
    """Full rescan of every driver every so often (0 disables), for events never sent."""

    @field_validator("resync_seconds")
    @classmethod
    def _resync_bounds(cls, value: float) -> float:
        """A tiny interval would rescan without pause and burn a core; a huge one is a typo."""
        if value == 0 or 1 <= value <= MAX_RESYNC_SECONDS:
            return value
        raise ValueError(f"must be 0 (off) or from 1 to {MAX_RESYNC_SECONDS} seconds, got {value!r}")


class _FileModel(ConfigSection):

    plugin_dir: str = "/var/lib/kubelet/device-plugins"
    sysfs_root: str = "/sys"
    dev_root: str = "/dev"
    proc_root: str = "/proc"
    hotplug: HotplugSettings = HotplugSettings()
    metrics_address: str = ""
    health_address: str = ""
    status_socket: str = ""
    node_feature_file: str = str(DEFAULT_FEATURE_FILE)  # empty: no node labels
    registration: Literal["auto", "kubelet", "pluginWatcher"] = "auto"
    plugins_registry: str = ""  # empty: <dirname(pluginDir)>/plugins_registry
    drivers: dict[str, dict[str, Any] | None] = {}

    @field_validator("plugin_dir", "sysfs_root", "dev_root", "proc_root")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if problem := path_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("node_feature_file")
    @classmethod
    def _feature_file(cls, value: str) -> str:
        """Empty: no labels. Otherwise an absolute path (its directory is NFD's features.d)."""
        if problem := value and path_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("plugin_dir", "plugins_registry")
    @classmethod
    def _socket_room(cls, value: str, info: ValidationInfo) -> str:
        """Every socket path must fit sun_path; checked here so no socket fails to bind later."""
        if problem := value and path_problem(value):
            raise ValueError(problem)
        if (size := len(os.fsencode(value.rstrip("/")))) > MAX_PLUGIN_DIR:
            key = "pluginDir" if info.field_name == "plugin_dir" else "pluginsRegistry"
            raise ValueError(
                f"is {size} bytes long; at most {MAX_PLUGIN_DIR}, so that <{key}>/nodedev-<resource>.sock "
                f"fits the {MAX_SOCKET_PATH}-byte limit of a unix socket path"
            )
        return value

    @field_validator("status_socket")
    @classmethod
    def _socket_path(cls, value: str) -> str:
        """Empty: `<pluginDir>/nodedev/status.sock`. Otherwise a path a unix socket can have."""
        if problem := value and path_problem(value):
            raise ValueError(problem)
        if len(os.fsencode(value)) > MAX_SOCKET_PATH:
            raise ValueError(f"is longer than {MAX_SOCKET_PATH} bytes, the most a unix socket path holds")
        return value

    @field_validator("metrics_address", "health_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            host, colon, port = value.rpartition(":")
            if not colon or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
                raise ValueError(f"expected host:port such as 0.0.0.0:9465 or :9465, got {shown(value)}")
            if not plausible_host(host):
                raise ValueError(f"{shown(host)} is not a host name or IP address (an IPv6 address goes in brackets: [::1]:9465)")
        return value


@dataclass(frozen=True)
class EnabledDriver:
    name: str
    cls: type[Driver[Any]]
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
    health_address: str = ""  # `host:port` for /healthz and /readyz; empty: off
    status_socket: str = ""  # what `nodedev status` asks; empty: <pluginDir>/nodedev/status.sock
    node_feature_file: str = ""  # the NFD local feature file node labels go to; empty: none
    registration: str = "auto"  # auto, kubelet (Register on kubelet.sock) or pluginWatcher
    plugins_registry: Path | None = None  # the plugin watcher's directory; None: beside pluginDir


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DRIVER_ROOTS = {"sysfs_root": "sysfsRoot", "dev_root": "devRoot", "proc_root": "procRoot"}

def path_problem(value: str) -> str | None:
    """Why `value` cannot be one of the trees' roots, or None: they are used from any working directory."""
    if "\0" in value:
        return f"must not contain a NUL byte, got {shown(value)}"
    if not value.startswith("/"):
        return f"must be an absolute path (starting with /), got {shown(value)}"
    return None


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
    return parse(read_text(path), path, overrides)


def parse(text: str, path: Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Validates `text` as the contents of `path` (which is only named in errors)."""
    raw = read_yaml(text, path)
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
        health_address=model.health_address,
        status_socket=model.status_socket,
        node_feature_file=model.node_feature_file,
        registration=model.registration,
        plugins_registry=Path(model.plugins_registry) if model.plugins_registry else None,
        drivers=enabled,
    )


# --- validation ----------------------------------------------------------------


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
        raise ConfigError(f"{path}: drivers.{shown_key(name)}: unknown driver (known: {known})")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: drivers.{name}: expected a mapping of options, got {type(section).__name__}")
    cls = drivers.load(name)
    options = _validate(cls.Options, section, path, prefix=f"drivers.{name}")
    for attribute, key in _DRIVER_ROOTS.items():
        value = getattr(options, attribute)
        if value is not None and (problem := path_problem(value)):
            raise ConfigError(f"{path}: drivers.{name}.{key}: {problem}")
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
        raise ConfigError(f"{path}: {_validation_problem(first, prefix)}") from None


def _validation_problem(error: Any, prefix: str) -> str:
    """`key.path: problem` for pydantic's first error, with the input quoted short."""
    loc = list(error["loc"])
    message = error["msg"]
    if error["type"] == "invalid_key" or loc[-1:] == ["[key]"]:
        if loc[-1:] == ["[key]"]:
            loc.pop()
        key = loc.pop()
        message = f"key {shown(key)}: {'must be a string' if error['type'] == 'invalid_key' else message}"
    elif error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    elif "input" in error and error["type"] != "missing":
        message = f"{message} (got {shown(error['input'])})"
    keys = [prefix] if prefix else []
    keys += [f"[{part}]" if isinstance(part, int) else shown_key(part) for part in loc]
    return f"{where(keys)}: {message}"
