"""The node config file: one YAML document, validated whole before anything starts.

Every problem becomes one `ConfigError` line naming the file, the key path and
what is wrong, so `nodedev serve` can exit 2 without a traceback. The file is
read defensively, since it is the one input a person types by hand: it is
size-capped before it is read, must be UTF-8, and the YAML may not repeat a key,
nest without end or expand aliases into millions of values. Validation creates
nothing on disk.
"""

from __future__ import annotations

import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ValidationError, ValidationInfo, field_validator
from yaml import MappingNode, Node, ScalarNode, SequenceNode

from nodedev import drivers
from nodedev.addresses import plausible_host
from nodedev.driver import ConfigSection, Driver, DriverOptions
from nodedev.labels import DEFAULT_PATH as DEFAULT_FEATURE_FILE

DEFAULT_PATH = Path("/etc/nodedev/config.yaml")

MAX_FILE_BYTES = 1 << 20
"""A node config is a few kilobytes; anything past 1 MiB is a wrong path, refused before it is read."""
MAX_DEPTH = 32
"""Nesting levels a config may use (the deepest real key, a timeSlicing resource's name, is 6)."""
MAX_VALUES = 10_000
"""Values (keys, scalars, lists, mappings) a document may hold, counted as read and again with every
alias expanded: a real config has a few hundred; PyYAML, in pure Python, takes about 1 s per 10,000
on a small node, and an exponential alias chain ('billion laughs') would never end."""
MAX_SOCKET_PATH = 107
"""A unix socket path's limit in bytes (sun_path holds 108 with the terminating NUL)."""
SOCKET_NAME_ROOM = 48
"""Bytes kept for a socket name after `<pluginDir>/`: `nodedev-` + a 35-character resource + `.sock`
(devices.kubevirt.io/vhost-net is 29); kubelet.sock is shorter."""
MAX_PLUGIN_DIR = MAX_SOCKET_PATH - 1 - SOCKET_NAME_ROOM
MAX_RESYNC_SECONDS = 86_400
SHOWN_PATH_STEPS = 8

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A config problem, already worded for one line: `file: key.path: problem`."""


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
                raise ValueError(f"expected host:port such as 0.0.0.0:9465 or :9465, got {_shown(value)}")
            if not plausible_host(host):
                raise ValueError(f"{_shown(host)} is not a host name or IP address (an IPv6 address goes in brackets: [::1]:9465)")
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
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_./-]{1,80}$")
_DRIVER_ROOTS = {"sysfs_root": "sysfsRoot", "dev_root": "devRoot", "proc_root": "procRoot"}

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def _shown(value: object) -> str:
    """A value as an error quotes it: bounded work and length, whatever the file holds."""
    return _REPR.repr(value)


def _shown_key(key: object) -> str:
    """A key as a path shows it: bare when it is plain, quoted when it could break the line."""
    return key if isinstance(key, str) and _PLAIN_KEY.match(key) else _shown(key)


def _where(keys: list[str] | tuple[str, ...]) -> str:
    """`drivers.netdev.resourceList[0].selectors`; a very deep path is cut after its start."""
    cut = len(keys) > SHOWN_PATH_STEPS
    shown = ".".join(keys[:SHOWN_PATH_STEPS]).replace(".[", "[")
    return shown + "..." if cut else shown or "(top level)"


def path_problem(value: str) -> str | None:
    """Why `value` cannot be one of the trees' roots, or None: they are used from any working directory."""
    if "\0" in value:
        return f"must not contain a NUL byte, got {_shown(value)}"
    if not value.startswith("/"):
        return f"must be an absolute path (starting with /), got {_shown(value)}"
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


def read_text(path: Path) -> str:
    """The file as text, refused at once when it is too large or not UTF-8.

    The size is checked before reading (and the read is capped too, for /dev/zero
    or a pipe, whose size says nothing), so a wrong path to a big file costs
    milliseconds, not memory.
    """
    try:
        with path.open("rb") as file:
            if os.fstat(file.fileno()).st_size > MAX_FILE_BYTES:
                raise _too_large(path)
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    if len(data) > MAX_FILE_BYTES:
        raise _too_large(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}, 0x{data[err.start]:02x}, on line {line})") from None


def _too_large(path: Path) -> ConfigError:
    return ConfigError(f"{path}: file is larger than {MAX_FILE_BYTES} bytes (1 MiB); is this the config file?")


def parse(text: str, path: Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Validates `text` as the contents of `path` (which is only named in errors)."""
    raw = _yaml(text, path)
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


# --- YAML --------------------------------------------------------------------


class _Problem(Exception):
    """A problem in the document at a key path; `parse` adds the file name."""

    def __init__(self, keys: list[str] | tuple[str, ...], message: str) -> None:
        super().__init__(f"{_where(keys)}: {message}")


class _StrictLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML has no type hints
    """SafeLoader that refuses repeated keys and deep nesting, and knows where it is.

    PyYAML keeps the last of two equal keys without a word, so `shares: 2` followed
    by `shares: 5` would silently win. The check is made when a mapping is composed,
    not constructed, because the composer knows the key path. The path is left
    where composition stopped, so a syntax error can name the key it is in.
    """

    def __init__(self, text: str) -> None:
        self.keys: list[str] = []
        self.values = 0
        super().__init__(text)

    def compose_node(self, parent: Node | None, index: object) -> Node:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _Problem(self.keys, f"the document has more than {MAX_VALUES} values (line {self._line()})")
        if parent is None:  # the document itself
            return super().compose_node(parent, index)
        self.keys.append(_step(index))
        if len(self.keys) > MAX_DEPTH:
            raise _Problem(self.keys[:MAX_DEPTH], f"nested more than {MAX_DEPTH} levels deep (line {self._line()})")
        node: Node = super().compose_node(parent, index)
        self.keys.pop()
        return node

    def compose_mapping_node(self, anchor: str | None) -> MappingNode:
        node: MappingNode = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag in _MERGE_TAGS:
                continue
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first:
                seen = first[(key.tag, key.value)]
                earlier = "earlier on the same line" if seen == line else f"on line {seen}"
                raise _Problem([*self.keys, _shown_key(key.value)], f"duplicate key on line {line} (first {earlier})")
            first[(key.tag, key.value)] = line
        return node

    def _line(self) -> int:
        return int(self.peek_event().start_mark.line) + 1


_MERGE_TAGS = ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value")


def _step(index: object) -> str:
    """One element of a key path, from what PyYAML's composer passes as the child's index."""
    if isinstance(index, int):
        return f"[{index}]"
    if isinstance(index, ScalarNode):
        return _shown_key(index.value)
    return "(key)" if index is None else "(complex key)"


def _yaml(text: str, path: Path) -> Any:
    """The document's data, or ConfigError naming the file, the key path and the line."""
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_tree(loader, node)
        return loader.construct_document(node)
    except _Problem as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.reader.ReaderError as err:
        raise ConfigError(f"{path}: {_unprintable(text, err.position)}") from None
    except yaml.YAMLError as err:
        keys = loader.keys if loader is not None else []
        raise ConfigError(f"{path}: {_where(keys)}: not valid YAML{_yaml_problem(err)}") from None
    except RecursionError:  # a guard: the depth limit should stop nesting long before this
        raise ConfigError(f"{path}: nested too deeply to read") from None
    finally:
        if loader is not None:
            loader.dispose()


def _unprintable(text: str, position: int) -> str:
    """YAML refuses control characters (NUL, ESC, ...) anywhere, even in comments."""
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    return f"line {line}, column {column}: character U+{ord(text[position]):04X} is not allowed in YAML"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """` (line L, column C): problem` from PyYAML's multi-line message, on one line."""
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    if context and not context.startswith("while"):  # "expected a single document", "but found another"
        problem = f"{context}, {problem}"
    return f"{where}: " + " ".join(problem.split())


def _check_tree(loader: _StrictLoader, root: Node) -> None:
    """Walks the document as it will be used, aliases expanded, before anything is built from it.

    Depth and size are counted through aliases, so an alias cycle (`&a [*a]`) or an
    exponential alias chain is refused here, with bounded work. Scalars are built
    now (PyYAML caches them for the real build), because a tagged scalar that does
    not convert raises whatever Python does (`!!int x`: ValueError).
    """
    stack: list[tuple[Node, tuple[str, ...]]] = [(root, ())]
    count = 0
    while stack:
        node, keys = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise _Problem(keys, f"the document has more than {MAX_VALUES} values once aliases are expanded")
        if len(keys) > MAX_DEPTH:
            raise _Problem(keys[:MAX_DEPTH], f"nested more than {MAX_DEPTH} levels deep through aliases")
        if isinstance(node, ScalarNode) and node.tag in _MERGE_TAGS:
            continue
        if node.tag not in loader.yaml_constructors:
            raise _Problem(keys, f"unsupported tag {_shown(node.tag)} (line {node.start_mark.line + 1})")
        if isinstance(node, ScalarNode):
            _build_scalar(loader, node, keys)
        elif isinstance(node, SequenceNode):  # pushed last first, so problems come in document order
            stack.extend((child, (*keys, f"[{i}]")) for i, child in reversed(list(enumerate(node.value))))
        elif isinstance(node, MappingNode):
            for key, value in reversed(node.value):
                name = _shown_key(key.value) if isinstance(key, ScalarNode) else "(complex key)"
                stack.append((value, (*keys, name)))
                stack.append((key, (*keys, name)))


def _build_scalar(loader: _StrictLoader, node: ScalarNode, keys: tuple[str, ...]) -> None:
    try:
        loader.construct_object(node)
    except Exception:  # noqa: BLE001 - PyYAML's converters raise ValueError, AttributeError, ...; all mean "not a <tag>"
        tag = str(node.tag).removeprefix("tag:yaml.org,2002:")
        raise _Problem(keys, f"cannot read {_shown(node.value)} as {tag} (line {node.start_mark.line + 1})") from None


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
        raise ConfigError(f"{path}: drivers.{_shown_key(name)}: unknown driver (known: {known})")
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
        message = f"key {_shown(key)}: {'must be a string' if error['type'] == 'invalid_key' else message}"
    elif error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    elif "input" in error and error["type"] != "missing":
        message = f"{message} (got {_shown(error['input'])})"
    keys = [prefix] if prefix else []
    keys += [f"[{part}]" if isinstance(part, int) else _shown_key(part) for part in loc]
    return f"{_where(keys)}: {message}"
