"""The `rdma` driver (RDMA shared device plugin drop-in), on fixture trees.

It lives beside sriov (same PCI reading, same fixture builder); until the lead
registers it in `nodedev.drivers.NAMES`, these tests register it themselves."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodedev import config, drivers
from nodedev.driver import Health, HostContext
from nodedev.drivers import rdma
from nodedev.drivers.rdma import RdmaDriver, RdmaOptions
from nodedev.drivers.sysfs_tree import SysfsTree

SHARED = "rdma/hca_shared_devices_a"
EXCLUSIVE = "rdma/hca_exclusive"


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(drivers.NAMES, "rdma", "nodedev.drivers.rdma:RdmaDriver")
    yield


def parse(section: dict[str, Any], tmp_path: Path) -> RdmaOptions:
    cfg = config.parse(yaml.safe_dump({"drivers": {"rdma": {"enabled": True, **section}}}), tmp_path / "config.yaml")
    (enabled,) = cfg.drivers
    assert isinstance(enabled.options, RdmaOptions)
    return enabled.options


@pytest.fixture
def node(tmp_path: Path) -> tuple[RdmaDriver, SysfsTree]:
    """The `--simulate infiniband` node, and its tree for changes."""
    if os.geteuid() != 0:
        pytest.skip("the fixture's character devices need root (mknod)")
    tree = rdma.build_simulation(tmp_path / "node")
    section = rdma.simulation_section(tree)
    options = parse({k: v for k, v in section.items() if k != "enabled"}, tmp_path)
    host = HostContext(tree.sys, tree.dev, tree.proc, lambda: None, logging.getLogger("test.rdma"))
    return RdmaDriver(options, host), tree


def test_shared_and_exclusive_resources_with_health_and_numa(node: tuple[RdmaDriver, SysfsTree]) -> None:
    driver, _ = node
    snapshot = driver.scan()
    shared = snapshot[SHARED]
    assert [d.id for d in shared] == [str(i) for i in range(1000)]
    assert {d.health for d in shared} == {Health.HEALTHY} and shared[0].numa_nodes == (0, 1)
    nodes = [(n.container_path, n.permissions) for n in shared[0].edits.devices]
    assert nodes == [(f"/dev/infiniband/{n}", "rwm") for n in ("uverbs0", "issm0", "umad0", "uverbs1", "issm1", "umad1", "rdma_cm")]
    assert all(os.path.exists(n.host_path) for n in shared[0].edits.devices)
    exclusive = {d.id: d for d in snapshot[EXCLUSIVE]}
    assert (exclusive["mlx5_0"].health, exclusive["mlx5_0"].numa_nodes) == (Health.HEALTHY, (0,))
    assert (exclusive["mlx5_1"].health, exclusive["mlx5_1"].reason) == (Health.UNHEALTHY, "port 1 DOWN")
    assert [n.container_path for n in exclusive["mlx5_1"].edits.devices] == [
        "/dev/infiniband/uverbs1",
        "/dev/infiniband/issm1",
        "/dev/infiniband/umad1",
        "/dev/infiniband/rdma_cm",
    ]


def test_shared_ids_go_unhealthy_only_when_every_hca_is_down(node: tuple[RdmaDriver, SysfsTree]) -> None:
    driver, tree = node
    tree.set_port_state("mlx5_0", "DOWN")
    snapshot = driver.scan()
    assert {d.health for d in snapshot[SHARED]} == {Health.UNHEALTHY}
    assert snapshot[SHARED][0].reason.startswith("no selected HCA has an ACTIVE port")
    tree.set_port_state("mlx5_1", "ACTIVE")
    snapshot = driver.scan()
    assert {d.health for d in snapshot[SHARED]} == {Health.HEALTHY}
    assert {d.id: d.health for d in snapshot[EXCLUSIVE]} == {"mlx5_0": Health.UNHEALTHY, "mlx5_1": Health.HEALTHY}
    watched = set(driver.watch_paths())
    assert tree.sys / "class/infiniband" in watched and len(watched) == 4


def test_selectors_match_as_the_plugin_does(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path / "n", char_devices=False)
    tree.add_pci("0000:81:00.0", vendor=0x15B3, device=0x1017, driver="mlx5_core", numa_node=0)
    tree.add_netdev("0000:81:00.0", "ens1f0")
    tree.add_rdma("0000:81:00.0", "mlx5_0", 0)
    resources = [
        {"resourceName": "by_dev", "rdmaHcaMax": 2, "devices": ["ens1f0"]},
        {"resourceName": "by_other_dev", "rdmaHcaMax": 2, "devices": ["ens9"]},
        {"resourceName": "by_ib", "rdmaHcaMax": 2, "selectors": {"linkTypes": ["infiniband"]}},
        {"resourceName": "by_id", "rdmaHcaMax": 2, "selectors": {"vendors": ["15B3"], "deviceIDs": ["1017"], "ifNames": ["ens1f0", "x"]}},
    ]
    options = parse({"configList": resources}, tmp_path)
    host = HostContext(tree.sys, tree.dev, tree.proc, lambda: None, logging.getLogger("t"))
    snapshot = RdmaDriver(options, host).scan()
    assert {r: {d.health for d in devices} for r, devices in snapshot.items()} == {
        "rdma/by_dev": {Health.HEALTHY},
        "rdma/by_other_dev": {Health.UNHEALTHY},
        "rdma/by_ib": {Health.UNHEALTHY},
        "rdma/by_id": {Health.HEALTHY},
    }
    assert snapshot["rdma/by_ib"][0].reason == "no HCA matches the selectors" and snapshot["rdma/by_ib"][0].edits.devices == ()


def test_the_plugins_config_file_pastes_in(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "periodicUpdateInterval": 300,
                "configList": [
                    {"resourceName": "hca_shared_devices_a", "rdmaHcaMax": 1000, "selectors": {"vendors": ["15b3"], "deviceIDs": ["1017"]}},
                    {"resourceName": "hca_shared_devices_b", "rdmaHcaMax": 500, "devices": ["ib0", "ib1"]},
                ],
            }
        )
    )
    options = parse({"configFile": str(path)}, tmp_path)
    assert [r.full_name for r in options.resources] == ["rdma/hca_shared_devices_a", "rdma/hca_shared_devices_b"]


BAD: list[tuple[dict[str, Any], str]] = [
    ({"configList": [{"resourceName": "a"}]}, r"drivers\.rdma\.configList\[0\]: rdmaHcaMax is required in shared mode"),
    ({"configList": [{"resourceName": "a", "rdmaHcaMax": 0}]}, r"configList\[0\]\.rdmaHcaMax: must be from 1 to 100000 \(got 0\)"),
    ({"configList": [{"resourceName": "a", "rdmaHcaMax": -3}]}, r"configList\[0\]\.rdmaHcaMax: must be from 1"),
    ({"configList": [{"resourceName": "a", "rdmaHcaMax": "5"}]}, r"configList\[0\]\.rdmaHcaMax: Input should be a valid integer \(got '5'\)"),
    (
        {"configList": [{"resourceName": "a", "rdmaHcaMax": 1}, {"resourceName": "a", "rdmaHcaMax": 1}]},
        r"drivers\.rdma\.configList: resource 'rdma/a' is listed twice",
    ),
    ({"configList": [{"resourceName": "a b", "rdmaHcaMax": 1}]}, r"configList\[0\]\.resourceName: 'a b' may contain only"),
    ({"configList": [{"resourceName": "a", "rdmaHcaMax": 1, "selectors": {"vendors": ["15b"]}}]}, r"selectors\.vendors: '15b' is not a 4-digit hex"),
    ({"configList": [{"resourceName": "a", "rdmaHcaMax": 1, "selectors": {"deviceIds": ["1017"]}}]}, r"selectors\.deviceIds: unknown key"),
    ({"configList": [{"resourceName": "a", "rdmaHcaMax": 1, "selectors": {"linkTypes": ["ib"]}}]}, r"selectors\.linkTypes: unknown link type 'ib'"),
    ({"configList": [{"resourceName": "a", "mode": "private"}]}, r"configList\[0\]\.mode: Input should be 'shared' or 'exclusive'"),
    ({"configFile": "config.json"}, r"drivers\.rdma\.configFile: 'config\.json' is not an absolute path"),
]


@pytest.mark.parametrize(("section", "error"), BAD, ids=[e for _, e in BAD])
def test_bad_config_is_one_line_naming_the_key(section: dict[str, Any], error: str, tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=error) as caught:
        parse(section, tmp_path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{", r"configFile: .*: not valid JSON"),
        ('{"configList": [{"resourceName": "a"}]}', r"configFile: .*: configList\[0\]: rdmaHcaMax is required"),
        (
            '{"configList": [{"resourceName": "a", "rdmaHcaMax": 1}, {"resourceName": "a", "rdmaHcaMax": 2}]}',
            r"configFile: .*: resource 'rdma/a' is listed twice",
        ),
    ],
)
def test_a_config_file_that_does_not_parse_names_the_key(text: str, error: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=error):
        parse({"configFile": str(path)}, tmp_path)


def test_the_driver_contract_holds(node: tuple[RdmaDriver, SysfsTree], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/test_contract.py's checks, run here until `rdma` is in NAMES (then it runs them itself)."""
    from tests import test_contract as contract

    driver, tree = node
    driver.start()
    contract.test_ids_are_valid_and_unique_within_each_resource(driver)
    contract.test_snapshots_are_full_and_stable(driver)
    contract.test_a_scan_told_nothing_changed_equals_a_full_scan(driver)
    contract.test_allocate_does_no_io_and_answers_the_same_twice(driver, monkeypatch)
    section = rdma.simulation_section(tree)
    contract.test_an_unknown_option_is_refused(("rdma", section, tmp_path))
    contract.test_a_quoted_number_is_refused(("rdma", section, tmp_path))
    driver.stop()
    driver.stop()


def test_discover_simulates_the_infiniband_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nodedev import cli

    (tmp_path / "config.yaml").write_text("{}\n")
    assert cli.main(["discover", "--simulate", "infiniband", "--json", "--config", str(tmp_path / "config.yaml")]) == 0, capsys.readouterr().err
    rows = {row["resource"]: row["devices"] for row in json.loads(capsys.readouterr().out) if row["driver"] == "rdma"}
    assert len(rows[SHARED]) == 1000 and {d["health"] for d in rows[SHARED]} == {"Healthy"}
    assert [(d["id"], d["health"], d["numa"]) for d in rows[EXCLUSIVE]] == [("mlx5_0", "Healthy", [0]), ("mlx5_1", "Unhealthy", [1])]
