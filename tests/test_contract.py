"""What every driver in `nodedev.drivers.NAMES` must do, whatever its hardware.

Each driver runs on a node made for it: a fixture tree from `SETUPS` below, or else
its own first simulation (`cls.simulate(cls.simulations()[0], workdir)`). A driver
added to NAMES with neither fails here, on purpose: the contract is checked for all.
Drivers are built as the inventory builds them, from a parsed config file.
"""

from __future__ import annotations

import builtins
import io
import logging
import os
import re
import stat
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from nodedev import config, drivers
from nodedev.driver import MAX_DEVICE_ID_LENGTH, ContainerEdits, Device, Driver, DriverOptions, HostContext, Snapshot
from tests.netif import FixtureNet

Setup = Callable[[Path], dict[str, Any]]
"""Builds a node under a work directory; returns the driver's config section."""


def devnode(node: str, device: int) -> Setup:
    """A dev root holding one real character device node (mknod: the tests run as root)."""

    def setup(workdir: Path) -> dict[str, Any]:
        if os.geteuid() != 0:
            pytest.skip("mknod of a character device needs root")
        path = workdir / "dev" / node
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(path, stat.S_IFCHR | 0o600, device)
        return {"enabled": True, "devRoot": str(workdir / "dev"), "shares": 5}

    return setup


def netdev(workdir: Path) -> dict[str, Any]:
    net = FixtureNet(workdir)
    net.add("eth1", driver="ice", numa=0)
    net.add("eth2", up=False, operstate="down")
    net.add("eth3", operstate="notpresent")
    net.add("ib0", arphrd=32)
    net.add("lo", arphrd=772, operstate="unknown")
    resources = [{"resourceName": "eth", "selectors": {"linkTypes": ["ether"]}}, {"resourceName": "ib"}]
    return {"enabled": True, "sysfsRoot": str(net.root), "procRoot": str(net.proc), "resourceList": resources}


def vfio(workdir: Path) -> dict[str, Any]:
    """Its own simulation, whose group nodes are character devices only for root."""
    if os.geteuid() != 0:
        pytest.skip("the VFIO fixture's group nodes need root (mknod)")
    from nodedev.drivers.vfio import simulate

    section = simulate.simulate(simulate.NAME, workdir)
    assert section is not None
    return section


SETUPS: dict[str, Setup] = {
    "kvm": devnode("kvm", os.makedev(10, 232)),
    "tun": devnode("net/tun", os.makedev(10, 200)),
    "vhost-net": devnode("vhost-net", os.makedev(10, 238)),
    "netdev": netdev,
    "vfio": vfio,
}

NAMES = sorted(drivers.NAMES)


def section_for(name: str, workdir: Path) -> dict[str, Any]:
    if name in SETUPS:
        return SETUPS[name](workdir)
    cls = drivers.load(name)
    simulations = list(cls.simulations())
    if not simulations:
        pytest.fail(f"driver {name!r} has no simulation and no entry in SETUPS of {__file__}: the contract cannot be checked")
    section = cls.simulate(simulations[0], workdir)
    assert section is not None, f"{name}: simulate({simulations[0]!r}) returned None for its own simulation"
    return {**section, "enabled": True}


def parse(name: str, section: dict[str, Any], workdir: Path) -> config.Config:
    return config.parse(yaml.safe_dump({"drivers": {name: section}}), workdir / "config.yaml")


def build(name: str, section: dict[str, Any], workdir: Path) -> Driver[Any]:
    """As the inventory does: a parsed config's EnabledDriver, its roots, a HostContext."""
    cfg = parse(name, section, workdir)
    (enabled,) = cfg.drivers
    options = enabled.options
    host = HostContext(
        sysfs_root=Path(options.sysfs_root) if options.sysfs_root else cfg.sysfs_root,
        dev_root=Path(options.dev_root) if options.dev_root else cfg.dev_root,
        proc_root=Path(options.proc_root) if options.proc_root else cfg.proc_root,
        rescan=lambda: None,
        log=logging.getLogger(f"test.contract.{name}"),
    )
    return enabled.cls(options, host)


@pytest.fixture
def restored_environ() -> Iterator[None]:
    """A simulation may set variables (which fake library to load, and what it reads)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(params=NAMES)
def node(request: pytest.FixtureRequest, tmp_path: Path, restored_environ: None) -> tuple[str, dict[str, Any], Path]:
    return request.param, section_for(request.param, tmp_path), tmp_path


@pytest.fixture
def started(node: tuple[str, dict[str, Any], Path]) -> Iterator[Driver[Any]]:
    name, section, workdir = node
    driver = build(name, section, workdir)
    driver.start()
    try:
        yield driver
    finally:
        driver.stop()


def as_lists(snapshot: Snapshot) -> dict[str, list[Device]]:
    return {resource: list(devices) for resource, devices in snapshot.items()}


def with_edits(snapshot: Snapshot) -> dict[str, list[tuple[Device, ContainerEdits]]]:
    """Device equality leaves the edits out; this compares them too."""
    return {resource: [(d, d.edits) for d in devices] for resource, devices in snapshot.items()}


# -- the checks ------------------------------------------------------------------------


def test_ids_are_valid_and_unique_within_each_resource(started: Driver[Any]) -> None:
    snapshot = started.scan()
    assert any(snapshot.values()), f"{started.name}: the contract node should give it devices to check"
    for resource, devices in snapshot.items():
        assert config.resource_name_problem(resource) is None, resource
        ids = [d.id for d in devices]
        assert len(ids) == len(set(ids)), f"{resource}: repeated IDs {sorted(i for i in ids if ids.count(i) > 1)}"
        bad = [i for i in ids if not 1 <= len(i) <= MAX_DEVICE_ID_LENGTH]
        assert not bad, f"{resource}: IDs of bad length {bad}"
        assert all(isinstance(d.edits, ContainerEdits) for d in devices)


def test_snapshots_are_full_and_stable(started: Driver[Any]) -> None:
    first = started.scan()
    second = started.scan()
    assert with_edits(first) == with_edits(second)
    declared = type(started).declared_resources(started.options)
    assert set(declared) <= set(first), f"declared but not in the snapshot: {sorted(set(declared) - set(first))}"


def test_a_scan_told_nothing_changed_equals_a_full_scan(started: Driver[Any]) -> None:
    full = started.scan(None)
    assert with_edits(started.scan(changed=set())) == with_edits(full)
    assert with_edits(started.scan(None)) == with_edits(full)


IO_CALLS = [
    (builtins, "open"),
    (io, "open"),
    (os, "open"),
    (os, "stat"),
    (os, "lstat"),
    (os, "listdir"),
    (os, "scandir"),
    (os, "readlink"),
    (os, "access"),
]


def test_allocate_does_no_io_and_answers_the_same_twice(started: Driver[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = started.scan()
    requests = {resource: [d for d in devices if d.healthy][:2] for resource, devices in snapshot.items()}
    requests = {resource: devices for resource, devices in requests.items() if devices}
    assert requests, f"{started.name}: no Healthy device to allocate"
    answers: dict[str, list[ContainerEdits]] = {}

    def no_io(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"allocate() did I/O: {args!r}")

    with monkeypatch.context() as blocked:
        for module, attr in IO_CALLS:
            blocked.setattr(module, attr, no_io)
        for resource, devices in requests.items():
            answers[resource] = [started.allocate(resource, devices) for _ in range(2)]
    for resource, (first, second) in answers.items():
        assert isinstance(first, ContainerEdits), resource
        assert first == second, f"{resource}: two answers to one request"


def test_stop_twice_is_harmless(node: tuple[str, dict[str, Any], Path]) -> None:
    name, section, workdir = node
    driver = build(name, section, workdir)
    driver.start()
    driver.scan()
    driver.stop()
    driver.stop()


# -- options ----------------------------------------------------------------------------


def test_an_unknown_option_is_refused(node: tuple[str, dict[str, Any], Path]) -> None:
    name, section, workdir = node
    with pytest.raises(config.ConfigError, match=rf"drivers\.{name}\.noSuchOption: unknown key"):
        parse(name, {**section, "noSuchOption": 1}, workdir)


def test_a_quoted_number_is_refused(node: tuple[str, dict[str, Any], Path]) -> None:
    name, section, workdir = node
    keys, value = scalar_option(drivers.load(name).Options)
    text = str(value).lower()  # "5", "1.0", "true"
    where = re.escape(".".join(["drivers", name, *keys]))
    with pytest.raises(config.ConfigError, match=rf"{where}: .*\(got '{re.escape(text)}'\)"):
        parse(name, set_nested(section, keys, text), workdir)


BASE_FIELDS = frozenset(DriverOptions.model_fields)


def scalar_option(model: type[BaseModel]) -> tuple[list[str], object]:
    """The key path of the driver's first number option (nested sections included),
    else of its first boolean one, else `enabled`; with a value of that type. Found
    by reading the model, so a driver added later is checked without a new case."""
    found = _first_option(model, (int, float)) or _first_option(model, (bool,))
    return found or (["enabled"], True)


def _first_option(model: type[BaseModel], kinds: tuple[type, ...], top: bool = True) -> tuple[list[str], object] | None:
    for name, field in model.model_fields.items():
        if top and name in BASE_FIELDS:
            continue
        key = field.alias or name
        for candidate in _types(field.annotation):
            if candidate in kinds:  # by identity: bool is not taken for int, nor int for bool
                return [key], candidate(5)
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                inner = _first_option(candidate, kinds, top=False)
                if inner is not None:
                    return [key, *inner[0]], inner[1]
    return None


def _types(annotation: Any) -> list[Any]:
    """`int | None` -> [int, NoneType]; a plain type -> [it]; containers are not entered."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return list(typing.get_args(annotation))
    return [annotation]


def set_nested(section: dict[str, Any], keys: list[str], value: object) -> dict[str, Any]:
    """A copy of `section` with `value` at the key path, making mappings on the way."""
    copy = dict(section)
    if len(keys) == 1:
        copy[keys[0]] = value
    else:
        inner = copy.get(keys[0])
        copy[keys[0]] = set_nested(inner if isinstance(inner, dict) else {}, keys[1:], value)
    return copy
