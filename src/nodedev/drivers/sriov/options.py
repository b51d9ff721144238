"""`drivers.sriov`: the SR-IOV network device plugin's config, keys and meanings unchanged.

A `resourceList` pastes in as it is written for the plugin's `config.json`
(`resourceName`, `resourcePrefix` default `intel.com`, `deviceType`,
`excludeTopology`, `selectors` as one object or a list, `additionalInfo`), or
`configFile: /etc/pcidp/config.json` reads the plugin's own JSON file, checked
when the config is loaded (and again on every reload). nodedev adds only
`deviceInfoDir`.

Refused with the reason, not silently ignored: `deviceType: auxNetDevice`,
selector keys nodedev cannot honour yet (`ddpProfiles`, `pKeys`, `vdpaType`),
and everything the plugin itself refuses (`isRdma` with `vdpaType`, keys other
than vendors/devices/drivers/pciAddresses/acpiIndexes for an accelerator).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from nodedev.driver import ConfigSection, DriverOptions
from nodedev.drivers.netdev import LINK_TYPES
from nodedev.drivers.pci import is_pci_address
from nodedev.drivers.peerconfig import nonblank, pci_ids, read_json, short_name, unique_names

DEFAULT_PREFIX = "intel.com"
DEFAULT_DEVICE_INFO_DIR = "/var/run/k8s.cni.cncf.io/devinfo/dp"
MAX_VF_INDEX = 65534
"""TotalVFs is a 16-bit register: VF indexes run from 0 to 65534 at most."""
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_LINK_TYPE_NAMES = frozenset(LINK_TYPES.values())
ACCELERATOR_KEYS = frozenset({"vendors", "devices", "drivers", "pci_addresses", "acpi_indexes"})
UNSUPPORTED_KEYS = {
    "ddp_profiles": "ddpProfiles: reading DDP profiles (devlink/ethtool) is not supported by nodedev",
    "p_keys": "pKeys: InfiniBand partition keys are not supported by nodedev",
    "vdpa_type": "vdpaType: vDPA devices are not supported by nodedev",
}


def parse_vf_ranges(text: str) -> frozenset[int]:
    """`0,2-7,9` -> {0, 2, ..., 7, 9}; 0-based VF indexes, as the plugin reads them."""
    indexes: set[int] = set()
    for part in text.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise ValueError(f"VF range {part!r} is not N or N-M")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start:
            raise ValueError(f"VF range {part!r} is reversed")
        if end > MAX_VF_INDEX:
            raise ValueError(f"VF range {part!r} is out of bounds (VF indexes are 0 to {MAX_VF_INDEX})")
        indexes.update(range(start, end + 1))
    return frozenset(indexes)


def split_item(item: str) -> tuple[str, frozenset[int] | None]:
    """`ens1f0#0,2-7` -> ("ens1f0", {0, 2..7}); a bare name -> (name, None) = every VF."""
    name, sep, ranges = item.partition("#")
    if not name.strip():
        raise ValueError(f"{item!r} names no device before '#'")
    return name, (parse_vf_ranges(ranges) if sep else None)


class SriovSelectors(ConfigSection):
    """One selector object: values ORed within a key, keys ANDed; an absent key matches all."""

    vendors: list[str] = []
    devices: list[str] = []
    drivers: list[str] = []
    pci_addresses: list[str] = []
    acpi_indexes: list[str] = []
    pf_names: list[str] = []
    root_devices: list[str] = []
    link_types: list[str] = []
    ddp_profiles: list[str] = []
    p_keys: list[str] = []
    is_rdma: bool = False
    need_vhost_net: bool = False
    vdpa_type: str | None = None

    @field_validator("vendors", "devices")
    @classmethod
    def _hex_ids(cls, values: list[str]) -> list[str]:
        return pci_ids(values, "8086")

    @field_validator("drivers", "acpi_indexes")
    @classmethod
    def _not_blank(cls, values: list[str]) -> list[str]:
        return nonblank(values)

    @field_validator("pci_addresses")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        for value in values:
            if not is_pci_address(value.lower()):
                raise ValueError(f"{value!r} is not a full PCI address such as '0000:3b:02.0'")
        return [v.lower() for v in values]

    @field_validator("pf_names")
    @classmethod
    def _pf_names(cls, values: list[str]) -> list[str]:
        for value in values:
            split_item(value)
        return values

    @field_validator("root_devices")
    @classmethod
    def _root_devices(cls, values: list[str]) -> list[str]:
        for value in values:
            address, _ = split_item(value)
            if not is_pci_address(address.lower()):
                raise ValueError(f"{value!r}: {address!r} is not a full PCI address such as '0000:3b:00.0'")
        return [v.lower() for v in values]

    @field_validator("link_types")
    @classmethod
    def _link_types(cls, values: list[str]) -> list[str]:
        for value in values:
            if value not in _LINK_TYPE_NAMES and not value.isdigit():
                raise ValueError(f"unknown link type {value!r} (use an ARPHRD number or a name such as 'ether', 'infiniband')")
        return values

    @model_validator(mode="after")
    def _supported(self) -> SriovSelectors:
        if self.is_rdma and self.vdpa_type is not None:
            raise ValueError("isRdma and vdpaType cannot be used together")
        for key, reason in UNSUPPORTED_KEYS.items():
            if key in self.model_fields_set and getattr(self, key):
                raise ValueError(reason)
        return self

    def pf_items(self) -> list[tuple[str, frozenset[int] | None]]:
        return [split_item(v) for v in self.pf_names]

    def root_items(self) -> list[tuple[str, frozenset[int] | None]]:
        return [split_item(v) for v in self.root_devices]


class SriovResource(ConfigSection):
    resource_name: str
    resource_prefix: str = DEFAULT_PREFIX
    device_type: Literal["netDevice", "accelerator", "auxNetDevice"] = "netDevice"
    exclude_topology: bool = False
    selectors: list[SriovSelectors] = Field(default_factory=lambda: [SriovSelectors()])
    additional_info: dict[str, dict[str, str]] = {}
    """`{"*": {k: v}, "<pci address>": {...}}` merged into `_INFO`'s `extra`; per-address keys win."""

    @field_validator("resource_name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return short_name(value)

    @field_validator("device_type")
    @classmethod
    def _supported_type(cls, value: str) -> str:
        if value == "auxNetDevice":
            raise ValueError("auxNetDevice (sub-functions on the auxiliary bus) is not supported by nodedev")
        return value

    @field_validator("selectors", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _accelerator_keys(self) -> SriovResource:
        if self.device_type == "accelerator":
            for selector in self.selectors:
                extra = sorted(selector.model_fields_set - ACCELERATOR_KEYS)
                if extra:
                    keys = ", ".join(SriovSelectors.model_fields[k].alias or k for k in extra)
                    raise ValueError(f"deviceType accelerator takes only vendors, devices, drivers, pciAddresses, acpiIndexes selectors (got {keys})")
        return self

    @property
    def full_name(self) -> str:
        return f"{self.resource_prefix}/{self.resource_name}"


class PluginFile(ConfigSection):
    """The SR-IOV plugin's own `config.json`: `{"resourceList": [...]}`."""

    resource_list: list[SriovResource] = []


def read_plugin_file(path: str) -> list[SriovResource]:
    """The resourceList of an SR-IOV plugin JSON file; ValueError in one line naming the key."""
    parsed = read_json(path, PluginFile, "resourceList")
    try:
        unique_names(parsed.resource_list, "resourceList")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return parsed.resource_list


class SriovOptions(DriverOptions):
    resource_list: list[SriovResource] = []
    config_file: str | None = None
    """The SR-IOV plugin's JSON file, read instead of `resourceList`."""
    device_info_dir: str = DEFAULT_DEVICE_INFO_DIR
    """Where the CNI device-info files go (Multus and the SR-IOV CNI read them)."""
    _resources: tuple[SriovResource, ...] = PrivateAttr(default=())

    @field_validator("config_file")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        if value is not None:
            read_plugin_file(value)
        return value

    @field_validator("device_info_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not Path(value).is_absolute():
            raise ValueError(f"{value!r} is not an absolute path")
        return value

    @field_validator("resource_list")
    @classmethod
    def _unique(cls, values: list[SriovResource]) -> list[SriovResource]:
        unique_names(values, "resourceList")
        return values

    @model_validator(mode="after")
    def _one_source(self) -> SriovOptions:
        if self.config_file is not None:
            if self.resource_list:
                raise ValueError("give resourceList or configFile, not both")
            self._resources = tuple(read_plugin_file(self.config_file))
        else:
            self._resources = tuple(self.resource_list)
        return self

    @property
    def resources(self) -> tuple[SriovResource, ...]:
        """The resource list in force, from `resourceList` or from `configFile`."""
        return self._resources
