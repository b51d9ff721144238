"""Bounds of the `drivers.nvidia` keys nodedev adds: each edge value is accepted, one
step past it is refused with one line naming `drivers.nvidia.<key path>`, and a
relative path is refused in the words the host uses for its own root keys."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodedev import config
from nodedev.drivers.nvidia.options import NvidiaOptions

FILE = Path("/etc/nodedev.yaml")


def parse(section: dict[str, Any]) -> NvidiaOptions:
    text = yaml.safe_dump({"drivers": {"nvidia": {"enabled": True, **section}}})
    (driver,) = config.parse(text, FILE).drivers
    assert isinstance(driver.options, NvidiaOptions)
    return driver.options


def refusal(section: dict[str, Any]) -> str:
    with pytest.raises(config.ConfigError) as err:
        parse(section)
    message = str(err.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def below(value: float) -> float:
    return math.nextafter(value, -math.inf)


def above(value: float) -> float:
    return math.nextafter(value, math.inf)


def nested(path: str, value: Any) -> dict[str, Any]:
    """`{"health": {"probeIntervalSeconds": value}}` from "health.probeIntervalSeconds"."""
    *parents, key = path.split(".")
    section: dict[str, Any] = {key: value}
    for parent in reversed(parents):
        section = {parent: section}
    return section


def read(options: NvidiaOptions, path: str) -> Any:
    """The parsed value at a camelCase key path."""
    node: Any = options
    for key in path.split("."):
        node = getattr(node, next(name for name, f in type(node).model_fields.items() if f.alias == key))
    return node


# ---------------------------------------------------------------- seconds

BOUNDS = {
    "health.probeIntervalSeconds": "must be from 0.1 to 3600 seconds",
    "health.quietPeriodSeconds": "must be from 0 to 86400 seconds",
}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("health.probeIntervalSeconds", 0.1),
        ("health.probeIntervalSeconds", 3600),
        ("health.probeIntervalSeconds", 3600.0),
        ("health.quietPeriodSeconds", 0),
        ("health.quietPeriodSeconds", 0.0),
        ("health.quietPeriodSeconds", 86400),
        ("health.quietPeriodSeconds", None),  # never recover, as NVIDIA's plugin
    ],
)
def test_seconds_at_their_edges_are_accepted(key: str, value: float | None) -> None:
    assert read(parse(nested(key, value)), key) == value


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("health.probeIntervalSeconds", 0.000001),  # would re-probe without pause and burn a core
        ("health.probeIntervalSeconds", below(0.1)),
        ("health.probeIntervalSeconds", above(3600)),
        ("health.probeIntervalSeconds", 0),
        ("health.probeIntervalSeconds", math.inf),
        ("health.probeIntervalSeconds", math.nan),
        ("health.quietPeriodSeconds", below(0)),
        ("health.quietPeriodSeconds", -1),
        ("health.quietPeriodSeconds", above(86400)),
        ("health.quietPeriodSeconds", 86401),
        ("health.quietPeriodSeconds", math.inf),
        ("health.quietPeriodSeconds", math.nan),
    ],
)
def test_seconds_one_step_past_an_edge_are_refused_naming_the_key(key: str, value: float) -> None:
    assert refusal(nested(key, value)) == f"{FILE}: drivers.nvidia.{key}: {BOUNDS[key]}, got {float(value)!r}"


def test_the_probe_interval_that_burns_a_core_is_refused_in_plain_words() -> None:
    assert refusal({"health": {"probeIntervalSeconds": 0.000001}}) == (
        f"{FILE}: drivers.nvidia.health.probeIntervalSeconds: must be from 0.1 to 3600 seconds, got 1e-06"
    )


# ---------------------------------------------------------------- paths

PATHS = ["cdiRoot", "flags.nvidiaDriverRoot", "flags.nvidiaDevRoot"]


@pytest.mark.parametrize("key", PATHS)
@pytest.mark.parametrize("value", ["/", "/run/nvidia/driver"])
def test_absolute_paths_are_accepted(key: str, value: str) -> None:
    assert read(parse(nested(key, value)), key) == value


def test_path_defaults_are_unchanged() -> None:
    options = parse({})
    assert (options.cdi_root, options.flags.nvidia_driver_root, options.flags.nvidia_dev_root) == ("/var/run/cdi", None, None)


def host_says(value: str) -> str:
    """What the host answers for its own `devRoot: value`, after the key."""
    with pytest.raises(config.ConfigError) as err:
        config.parse(yaml.safe_dump({"devRoot": value}), FILE)
    prefix = f"{FILE}: devRoot: "
    assert str(err.value).startswith(prefix)
    return str(err.value).removeprefix(prefix)


@pytest.mark.parametrize("key", PATHS)
@pytest.mark.parametrize("value", ["run/nvidia/driver", "./dev", "", "~/cdi", "/a\0b"])
def test_relative_paths_are_refused_as_the_host_refuses_its_roots(key: str, value: str) -> None:
    assert refusal(nested(key, value)) == f"{FILE}: drivers.nvidia.{key}: {host_says(value)}"
