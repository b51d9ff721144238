"""The peer plugins' own JSON config files (SR-IOV's, RDMA's), read into our models.

A user switching to nodedev points `configFile` at the file they already have;
every problem in it is one ValueError line naming the file and the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


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
