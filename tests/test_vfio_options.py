"""`drivers.vfio`: KubeVirt's permittedHostDevices pastes in; every bad form is one line naming the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodedev import config
from nodedev.drivers.vfio.options import VfioOptions, mdev_key

# As KubeVirt's docs write it (externalResourceProvider included), under drivers.vfio.
PERMITTED = """
pciHostDevices:
  - pciVendorSelector: "10DE:1EB8"
    resourceName: "nvidia.com/TU104GL_Tesla_T4"
    externalResourceProvider: true
  - pciVendorSelector: "10de:1db6"
    resourceName: "nvidia.com/GV100GL_Tesla_V100"
  - pciVendorSelector: "10de:1db4"
    resourceName: "nvidia.com/GV100GL_Tesla_V100"
mediatedDevices:
  - mdevNameSelector: "GRID T4-1Q"
    resourceName: "nvidia.com/GRID_T4-1Q"
    externalResourceProvider: true
"""


def parse(section: dict[str, Any], tmp_path: Path) -> config.Config:
    return config.parse(yaml.safe_dump({"drivers": {"vfio": {"enabled": True, **section}}}), tmp_path / "config.yaml")


def options(cfg: config.Config) -> VfioOptions:
    (enabled,) = cfg.drivers
    assert isinstance(enabled.options, VfioOptions)
    return enabled.options


def test_kubevirts_permitted_host_devices_paste_in(tmp_path: Path) -> None:
    opts = options(parse(yaml.safe_load(PERMITTED), tmp_path))
    assert [(e.vendor, e.device) for e in opts.pci_host_devices] == [("10de", "1eb8"), ("10de", "1db6"), ("10de", "1db4")]
    assert opts.pci_host_devices[0].external_resource_provider, "accepted (and ignored)"
    assert opts.resources() == ["nvidia.com/TU104GL_Tesla_T4", "nvidia.com/GV100GL_Tesla_V100", "nvidia.com/GRID_T4-1Q"]
    assert opts.check_vfio_api is True


def test_mdev_names_compare_as_kubevirt_compares_them() -> None:
    assert mdev_key("GRID T4-1Q") == mdev_key("GRID_T4-1Q") == "GRID_T4-1Q"


BAD: list[tuple[dict[str, Any], str]] = [
    (
        {"pciHostDevices": [{"pciVendorSelector": "10de1eb8", "resourceName": "a.io/b"}]},
        r"pciHostDevices\[0\]\.pciVendorSelector: '10de1eb8' is not vendor:device",
    ),
    ({"pciHostDevices": [{"pciVendorSelector": "10de:1eb", "resourceName": "a.io/b"}]}, r"pciHostDevices\[0\]\.pciVendorSelector: '10de:1eb' is not"),
    ({"pciHostDevices": [{"pciVendorSelector": "10dg:1eb8", "resourceName": "a.io/b"}]}, r"pciHostDevices\[0\]\.pciVendorSelector: '10dg:1eb8' is not"),
    ({"pciHostDevices": [{"pciVendorSelector": 0x10DE, "resourceName": "a.io/b"}]}, r"pciHostDevices\[0\]\.pciVendorSelector: Input should be a valid string"),
    ({"pciHostDevices": [{"resourceName": "a.io/b"}]}, r"pciHostDevices\[0\]\.pciVendorSelector: Field required"),
    ({"pciHostDevices": [{"pciVendorSelector": "10de:1eb8"}]}, r"pciHostDevices\[0\]\.resourceName: Field required"),
    (
        {"pciHostDevices": [{"pciVendorSelector": "10de:1eb8", "resourceName": "T4"}]},
        r"pciHostDevices\[0\]\.resourceName: resource name 'T4' must be <domain>/<name>",
    ),
    (
        {"pciHostDevices": [{"pciVendorSelector": "10de:1eb8", "resourceName": "kubernetes.io/t4"}]},
        r"pciHostDevices\[0\]\.resourceName: resource name 'kubernetes\.io/t4' is in the reserved",
    ),
    (
        {"pciHostDevices": [{"pciVendorSelector": "10de:1eb8", "resourceName": "nvidia.com/Tesla T4"}]},
        r"pciHostDevices\[0\]\.resourceName: .*is not a valid name",
    ),
    (
        {"pciHostDevices": [{"pciVendorSelector": "10de:1eb8", "resourceName": "a.io/b", "externalResourceProvider": "true"}]},
        r"pciHostDevices\[0\]\.externalResourceProvider: Input should be a valid boolean",
    ),
    (
        {"pciHostDevices": [{"pciVendorSelector": "10de:1eb8", "resourceName": "a.io/b", "pciDeviceSelector": "x"}]},
        r"pciHostDevices\[0\]\.pciDeviceSelector: unknown key",
    ),
    (
        {"pciHostDevices": [{"pciVendorSelector": "10de:1eb8", "resourceName": "a.io/b"}, {"pciVendorSelector": "10DE:1EB8", "resourceName": "a.io/c"}]},
        r"drivers\.vfio\.pciHostDevices: pciVendorSelector '10de:1eb8' is given twice \(\[0\] and \[1\]\)",
    ),
    ({"pciHostDevices": {"pciVendorSelector": "10de:1eb8", "resourceName": "a.io/b"}}, r"drivers\.vfio\.pciHostDevices: Input should be a valid list"),
    ({"mediatedDevices": [{"mdevNameSelector": " ", "resourceName": "a.io/b"}]}, r"mediatedDevices\[0\]\.mdevNameSelector: .*must name an mdev type"),
    ({"mediatedDevices": [{"mdevNameSelector": "GRID\nT4", "resourceName": "a.io/b"}]}, r"mediatedDevices\[0\]\.mdevNameSelector: .*printable"),
    ({"mediatedDevices": [{"mdevNameSelector": "GRID T4-1Q", "resourceName": "nodomain"}]}, r"mediatedDevices\[0\]\.resourceName: resource name 'nodomain'"),
    (
        {"mediatedDevices": [{"mdevNameSelector": "GRID T4-1Q", "resourceName": "a.io/b"}, {"mdevNameSelector": "GRID_T4-1Q", "resourceName": "a.io/c"}]},
        r"drivers\.vfio\.mediatedDevices: mdevNameSelector 'GRID_T4-1Q' is given twice \(\[0\] and \[1\]\)",
    ),
    (
        {
            "pciHostDevices": [{"pciVendorSelector": "10de:1eb8", "resourceName": "nvidia.com/t4"}],
            "mediatedDevices": [{"mdevNameSelector": "GRID T4-1Q", "resourceName": "nvidia.com/t4"}],
        },
        r"drivers\.vfio: resourceName 'nvidia\.com/t4' is used by pciHostDevices\[0\] and mediatedDevices\[0\]; a resource serves",
    ),
    ({"checkVfioApi": "false"}, r"drivers\.vfio\.checkVfioApi: Input should be a valid boolean \(got 'false'\)"),
]


@pytest.mark.parametrize(("section", "message"), BAD)
def test_bad_config_is_one_line_naming_the_key(section: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as caught:
        parse(section, tmp_path)
    text = str(caught.value)
    assert "\n" not in text
    assert re.search(message, text), text
    assert "drivers.vfio" in text


def test_a_resource_another_driver_serves_is_refused(tmp_path: Path) -> None:
    text = yaml.safe_dump(
        {
            "drivers": {
                "kvm": {"enabled": True},
                "vfio": {"enabled": True, "pciHostDevices": [{"pciVendorSelector": "10de:1eb8", "resourceName": "devices.kubevirt.io/kvm"}]},
            }
        }
    )
    with pytest.raises(config.ConfigError, match=r"drivers\.vfio: resource 'devices\.kubevirt\.io/kvm' is already served by drivers\.kvm"):
        config.parse(text, tmp_path / "config.yaml")
