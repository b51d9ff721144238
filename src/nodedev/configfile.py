"""Reading the node config file defensively: it is the one input a person types by hand.

The file is size-capped before it is read, must be UTF-8, and the YAML may not
repeat a key, nest without end or expand aliases into millions of values. Every
problem is one `ConfigError` line naming the file and the key path; `config`
validates what comes out.
"""

from __future__ import annotations

import os
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml
from yaml import MappingNode, Node, ScalarNode, SequenceNode

MAX_FILE_BYTES = 1 << 20
"""A node config is a few kilobytes; anything past 1 MiB is a wrong path, refused before it is read."""
MAX_DEPTH = 32
"""Nesting levels a config may use (the deepest real key, a timeSlicing resource's name, is 6)."""
MAX_VALUES = 10_000
"""Values (keys, scalars, lists, mappings) a document may hold, counted as read and again with every
alias expanded: a real config has a few hundred; PyYAML, in pure Python, takes about 1 s per 10,000
on a small node, and an exponential alias chain ('billion laughs') would never end."""
SHOWN_PATH_STEPS = 8


class ConfigError(Exception):
    """A config problem, already worded for one line: `file: key.path: problem`."""


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_./-]{1,80}$")

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def shown(value: object) -> str:
    """A value as an error quotes it: bounded work and length, whatever the file holds."""
    return _REPR.repr(value)


def shown_key(key: object) -> str:
    """A key as a path shows it: bare when it is plain, quoted when it could break the line."""
    return key if isinstance(key, str) and _PLAIN_KEY.match(key) else shown(key)


def where(keys: list[str] | tuple[str, ...]) -> str:
    """`drivers.netdev.resourceList[0].selectors`; a very deep path is cut after its start."""
    cut = len(keys) > SHOWN_PATH_STEPS
    shown = ".".join(keys[:SHOWN_PATH_STEPS]).replace(".[", "[")
    return shown + "..." if cut else shown or "(top level)"


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


class _Problem(Exception):
    """A problem in the document at a key path; `parse` adds the file name."""

    def __init__(self, keys: list[str] | tuple[str, ...], message: str) -> None:
        super().__init__(f"{where(keys)}: {message}")


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
                raise _Problem([*self.keys, shown_key(key.value)], f"duplicate key on line {line} (first {earlier})")
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
        return shown_key(index.value)
    return "(key)" if index is None else "(complex key)"


def read_yaml(text: str, path: Path) -> Any:
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
        raise ConfigError(f"{path}: {where(keys)}: not valid YAML{_yaml_problem(err)}") from None
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
            raise _Problem(keys, f"unsupported tag {shown(node.tag)} (line {node.start_mark.line + 1})")
        if isinstance(node, ScalarNode):
            _build_scalar(loader, node, keys)
        elif isinstance(node, SequenceNode):  # pushed last first, so problems come in document order
            stack.extend((child, (*keys, f"[{i}]")) for i, child in reversed(list(enumerate(node.value))))
        elif isinstance(node, MappingNode):
            for key, value in reversed(node.value):
                name = shown_key(key.value) if isinstance(key, ScalarNode) else "(complex key)"
                stack.append((value, (*keys, name)))
                stack.append((key, (*keys, name)))


def _build_scalar(loader: _StrictLoader, node: ScalarNode, keys: tuple[str, ...]) -> None:
    try:
        loader.construct_object(node)
    except Exception:  # noqa: BLE001 - PyYAML's converters raise ValueError, AttributeError, ...; all mean "not a <tag>"
        tag = str(node.tag).removeprefix("tag:yaml.org,2002:")
        raise _Problem(keys, f"cannot read {shown(node.value)} as {tag} (line {node.start_mark.line + 1})") from None
