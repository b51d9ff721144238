"""`drivers.sriov`: the SR-IOV plugin's config pastes in; every bad form is one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodedev import config
from nodedev.drivers.sriov.options import SriovOptions, parse_vf_ranges

PLUGIN_CONFIG = {
    "resourceList": [
        {
            "resourceName": "intel_sriov_netdevice",
            "selectors": {"vendors": ["8086"], "devices": ["154c", "10ed", "1889"], "drivers": ["i40evf", "iavf", "ixgbevf"]},
        },
        {
            "resourceName": "intel_sriov_dpdk",
            "resourcePrefix": "intel.com",
            "selectors": [{"vendors": ["8086"], "drivers": ["vfio-pci"], "pfNames": ["enp0s0f0", "enp2s2f1#0,2-7"]}],
        },
        {
            "resourceName": "mlnx_sriov_rdma",
            "resourcePrefix": "mellanox.com",
            "excludeTopology": True,
            "selectors": {"vendors": ["15b3"], "devices": ["1018"], "drivers": ["mlx5_core"], "isRdma": True},
            "additionalInfo": {"*": {"token": "3e49019f-412f-4f02-824e-4cd195944205"}},
        },
        {"resourceName": "ct6dx_vdpa_vhost", "selectors": {"rootDevices": ["0000:86:00.0#0-1,3"], "linkTypes": ["ether"], "needVhostNet": True}},
        {"resourceName": "intel_fpga", "deviceType": "accelerator", "selectors": {"vendors": ["8086"], "devices": ["0d90"]}},
    ]
}


def parse(section: dict[str, Any], tmp_path: Path) -> config.Config:
    return config.parse(yaml.safe_dump({"drivers": {"sriov": {"enabled": True, **section}}}), tmp_path / "config.yaml")


def options(cfg: config.Config) -> SriovOptions:
    (enabled,) = cfg.drivers
    assert isinstance(enabled.options, SriovOptions)
    return enabled.options


def test_the_plugins_config_pastes_in_unchanged(tmp_path: Path) -> None:
    opts = options(parse(PLUGIN_CONFIG, tmp_path))
    names = [r.full_name for r in opts.resources]
    assert names == [
        "intel.com/intel_sriov_netdevice",
        "intel.com/intel_sriov_dpdk",
        "mellanox.com/mlnx_sriov_rdma",
        "intel.com/ct6dx_vdpa_vhost",
        "intel.com/intel_fpga",
    ]
    assert opts.resources[0].selectors[0].devices == ["154c", "10ed", "1889"]
    assert opts.resources[1].selectors[0].pf_items() == [("enp0s0f0", None), ("enp2s2f1", frozenset({0, 2, 3, 4, 5, 6, 7}))]
    assert opts.resources[2].exclude_topology and opts.resources[2].selectors[0].is_rdma
    assert opts.device_info_dir == "/var/run/k8s.cni.cncf.io/devinfo/dp"


def test_config_file_reads_the_plugins_json(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PLUGIN_CONFIG))
    opts = options(parse({"configFile": str(path)}, tmp_path))
    assert [r.resource_name for r in opts.resources][:2] == ["intel_sriov_netdevice", "intel_sriov_dpdk"]


def test_vf_ranges() -> None:
    assert parse_vf_ranges("0,2-4,9") == {0, 2, 3, 4, 9}
    assert parse_vf_ranges("5") == {5}


BAD: list[tuple[dict[str, Any], str]] = [
    ({"resourceList": [{"resourceName": "a b"}]}, r"drivers\.sriov\.resourceList\[0\]\.resourceName: 'a b' may contain only"),
    ({"resourceList": [{}]}, r"drivers\.sriov\.resourceList\[0\]\.resourceName: Field required"),
    ({"resourceList": [{"resourceName": "a"}, {"resourceName": "a"}]}, r"drivers\.sriov\.resourceList: resource 'intel\.com/a' is listed twice"),
    ({"resourceList": [{"resourceName": "a", "selectors": "x"}]}, r"drivers\.sriov\.resourceList\[0\]\.selectors: "),
    ({"resourceList": [{"resourceName": "a", "selectors": {"vendor": ["8086"]}}]}, r"selectors\[0\]\.vendor: unknown key"),
    ({"resourceList": [{"resourceName": "a", "selectors": {"vendors": ["80861"]}}]}, r"selectors\[0\]\.vendors: '80861' is not a 4-digit hex"),
    ({"resourceList": [{"resourceName": "a", "selectors": {"vendors": "8086"}}]}, r"selectors\[0\]\.vendors: Input should be a valid list"),
    ({"resourceList": [{"resourceName": "a", "selectors": {"pciAddresses": ["3b:02.0"]}}]}, r"selectors\[0\]\.pciAddresses: '3b:02\.0' is not a full PCI"),
    ({"resourceList": [{"resourceName": "a", "selectors": {"pfNames": ["ens1#7-2"]}}]}, r"selectors\[0\]\.pfNames: VF range '7-2' is reversed"),
    ({"resourceList": [{"resourceName": "a", "selectors": {"pfNames": ["ens1#0-70000"]}}]}, r"selectors\[0\]\.pfNames: VF range '0-70000' is out of bounds"),
    ({"resourceList": [{"resourceName": "a", "selectors": {"pfNames": ["ens1#-1"]}}]}, r"selectors\[0\]\.pfNames: VF range '-1' is not N or N-M"),
    ({"resourceList": [{"resourceName": "a", "selectors": {"pfNames": ["#1"]}}]}, r"selectors\[0\]\.pfNames: '#1' names no device"),
    ({"resourceList": [{"resourceName": "a", "selectors": {"rootDevices": ["ens1#1"]}}]}, r"selectors\[0\]\.rootDevices: 'ens1#1': 'ens1' is not a full PCI"),
    ({"resourceList": [{"resourceName": "a", "selectors": {"rootDevices": ["0000:86:00.0#3-1"]}}]}, r"selectors\[0\]\.rootDevices: VF range '3-1' is reversed"),
    ({"resourceList": [{"resourceName": "a", "selectors": {"linkTypes": ["eth"]}}]}, r"selectors\[0\]\.linkTypes: unknown link type 'eth'"),
    (
        {"resourceList": [{"resourceName": "a", "selectors": {"isRdma": True, "vdpaType": "vhost"}}]},
        r"selectors\[0\]: isRdma and vdpaType cannot be used",
    ),
    ({"resourceList": [{"resourceName": "a", "selectors": {"vdpaType": "vhost"}}]}, r"selectors\[0\]: vdpaType: vDPA devices are not supported"),
    ({"resourceList": [{"resourceName": "a", "selectors": {"pKeys": ["0x1"]}}]}, r"selectors\[0\]: pKeys: .*not supported"),
    ({"resourceList": [{"resourceName": "a", "selectors": {"isRdma": "true"}}]}, r"selectors\[0\]\.isRdma: Input should be a valid boolean \(got 'true'\)"),
    ({"resourceList": [{"resourceName": "a", "deviceType": "gpu"}]}, r"resourceList\[0\]\.deviceType: Input should be 'netDevice'"),
    ({"resourceList": [{"resourceName": "a", "deviceType": "auxNetDevice"}]}, r"resourceList\[0\]\.deviceType: auxNetDevice .*not supported"),
    (
        {"resourceList": [{"resourceName": "a", "deviceType": "accelerator", "selectors": {"pfNames": ["x"]}}]},
        r"resourceList\[0\]: deviceType accelerator takes only .* \(got pfNames\)",
    ),
    ({"resourceList": [{"resourceName": "a", "additionalInfo": {"*": {"k": 1}}}]}, r"additionalInfo\.'\*'\.k: Input should be a valid string"),
    ({"resourceList": [{"resourceName": "a", "excludeTopology": "yes"}]}, r"resourceList\[0\]\.excludeTopology: Input should be a valid boolean"),
    ({"deviceInfoDir": "relative/dir"}, r"drivers\.sriov\.deviceInfoDir: 'relative/dir' is not an absolute path"),
    ({"configFile": "relative.json"}, r"drivers\.sriov\.configFile: 'relative\.json' is not an absolute path"),
    ({"configFile": "/nonexistent/config.json"}, r"drivers\.sriov\.configFile: /nonexistent/config\.json: cannot read"),
]


@pytest.mark.parametrize(("section", "error"), BAD, ids=[e for _, e in BAD])
def test_bad_config_is_one_line_naming_the_key(section: dict[str, Any], error: str, tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=error) as caught:
        parse(section, tmp_path)
    assert "\n" not in str(caught.value)


BAD_FILES: list[tuple[str, str]] = [
    ('{"resourceList": [', r"configFile: .*config\.json: not valid JSON: .* at line 1 column 19"),
    ("[]", r"configFile: .*: expected a JSON object with resourceList, got list"),
    ('{"resourceList": [{"resourceName": "x", "selectors": {"vendors": ["zz"]}}]}', r"configFile: .*: resourceList\[0\]\.selectors\[0\]\.vendors: 'zz' is not"),
    ('{"resourceList": [{"resourceName": "x"}, {"resourceName": "x"}]}', r"configFile: .*config\.json: resource 'intel\.com/x' is listed twice"),
    ('{"resourceLst": []}', r"configFile: .*: resourceLst: unknown key"),
    ('{"resourceList": [{"resourceName": "x", "selectors": {"isRdma": true, "vdpaType": "vhost"}}]}', r"configFile: .*: isRdma and vdpaType"),
]


@pytest.mark.parametrize(("text", "error"), BAD_FILES, ids=[e for _, e in BAD_FILES])
def test_a_config_file_that_does_not_parse_is_one_line_naming_the_key(text: str, error: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=error) as caught:
        parse({"configFile": str(path)}, tmp_path)
    assert "\n" not in str(caught.value)


def test_config_file_and_resource_list_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PLUGIN_CONFIG))
    with pytest.raises(config.ConfigError, match=r"drivers\.sriov: give resourceList or configFile, not both"):
        parse({"configFile": str(path), "resourceList": [{"resourceName": "y"}]}, tmp_path)


def test_a_resource_name_clash_with_another_driver_is_refused(tmp_path: Path) -> None:
    text = yaml.safe_dump(
        {
            "drivers": {
                "sriov": {"enabled": True, "resourceList": [{"resourceName": "nic", "resourcePrefix": "nodedev.io"}]},
                "netdev": {"enabled": True, "resourceList": [{"resourceName": "nic"}]},
            }
        }
    )
    with pytest.raises(config.ConfigError, match=r"resource 'nodedev\.io/nic' is already served"):
        config.parse(text, tmp_path / "config.yaml")
