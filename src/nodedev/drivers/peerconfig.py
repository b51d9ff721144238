"""The peer plugins' own JSON config files (SR-IOV's, RDMA's), read into our models,
and the checks the keys they share get (resource names, PCI IDs, lists of names).

A user switching to nodedev points `configFile` at the file they already have;
every problem in it is one ValueError line naming the file and the key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

_SHORT_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")
_PCI_ID = re.compile(r"^[0-9a-fA-F]{4}$")


def short_name(value: str) -> str:
    """A `resourceName` before its prefix, as the peers allow it."""
    if not _SHORT_NAME.match(value):
        raise ValueError(f"{value!r} may contain only letters, digits, '_' and '-'")
    return value


def pci_ids(values: list[str], example: str) -> list[str]:
    """Vendor or device IDs, 4 hex digits each, lower-cased as sysfs spells them."""
    for value in values:
        if not _PCI_ID.match(value):
            raise ValueError(f"{value!r} is not a 4-digit hex PCI ID such as {example!r}")
    return [v.lower() for v in values]


def nonblank(values: list[str]) -> list[str]:
    """Names of drivers, interfaces, ...: an empty one would match nothing, or everything."""
    if any(not v.strip() for v in values):
        raise ValueError("entries must not be empty")
    return values


class Named(Protocol):
    @property
    def full_name(self) -> str: ...


def unique_names(resources: Iterable[Named], list_key: str) -> None:
    """Refuses a resource listed twice, as the peers refuse it."""
    seen: set[str] = set()
    for resource in resources:
        if resource.full_name in seen:
            raise ValueError(f"resource {resource.full_name!r} is listed twice in {list_key}")
        seen.add(resource.full_name)


def read_json(path: str, model: type[M], list_key: str) -> M:
    """The file at `path` (absolute), validated as `model`, whose resources are under `list_key`."""
    if not Path(path).is_absolute():
        raise ValueError(f"{path!r} is not an absolute path")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with {list_key}, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        message = "unknown key" if first["type"] == "extra_forbidden" else str(first["msg"]).removeprefix("Value error, ")
        raise ValueError(f"{path}: {where or list_key}: {message}") from None
