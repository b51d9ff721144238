"""`drivers.vfio`: KubeVirt's `permittedHostDevices`, pasted in as it is written there.

    pciHostDevices:
      - pciVendorSelector: "10DE:1EB8"          # vendor:device, 4 hex digits each, any case
        resourceName: nvidia.com/TU104GL_Tesla_T4
        externalResourceProvider: true          # accepted and ignored: nodedev *is* the external provider
    mediatedDevices:
      - mdevNameSelector: "GRID T4-1Q"          # the type's `name`; a space matches `_`, as in KubeVirt
        resourceName: nvidia.com/GRID_T4-1Q

As in KubeVirt, several selectors may feed one resource. Refused, one line naming
the key: a selector that is not `vvvv:dddd`, an empty mdev name, a resource name
the kubelet would refuse, the same selector given twice, and one resource name used
for both PCI and mediated devices (the two hand out different variables).

`checkVfioApi` (default true) is nodedev's own: at start the driver asks
/dev/vfio/vfio for the VFIO API version and a type-1 IOMMU, and PreStartContainer
asks the group node whether the group is viable. A simulation, which has no VFIO
in its kernel, turns both ioctl checks off; the sysfs checks stay.
"""

from __future__ import annotations

import re

from pydantic import field_validator, model_validator

from nodedev.config import resource_name_problem
from nodedev.driver import ConfigSection, DriverOptions

_VENDOR_SELECTOR = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")
MAX_MDEV_NAME = 128


def mdev_key(name: str) -> str:
    """How KubeVirt compares mdev type names: spaces and `_` are the same."""
    return name.strip().replace(" ", "_")


def _resource(value: str) -> str:
    problem = resource_name_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


class PciHostDevice(ConfigSection):
    pci_vendor_selector: str
    resource_name: str
    external_resource_provider: bool = False
    """KubeVirt's switch for "served by an external plugin": nodedev is that plugin."""

    @field_validator("pci_vendor_selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        if not _VENDOR_SELECTOR.match(value):
            raise ValueError(f"{value!r} is not vendor:device in hex, such as '10de:1eb8'")
        return value.lower()

    @field_validator("resource_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _resource(value)

    @property
    def vendor(self) -> str:
        return self.pci_vendor_selector[:4]

    @property
    def device(self) -> str:
        return self.pci_vendor_selector[5:]


class MediatedDevice(ConfigSection):
    mdev_name_selector: str
    resource_name: str
    external_resource_provider: bool = False

    @field_validator("mdev_name_selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name an mdev type, such as 'GRID T4-1Q'")
        if len(value) > MAX_MDEV_NAME or not value.isprintable():
            raise ValueError(f"{value[:40]!r}: an mdev type name is at most {MAX_MDEV_NAME} printable characters")
        return value

    @field_validator("resource_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _resource(value)

    @property
    def key(self) -> str:
        return mdev_key(self.mdev_name_selector)


class VfioOptions(DriverOptions):
    pci_host_devices: list[PciHostDevice] = []
    mediated_devices: list[MediatedDevice] = []
    check_vfio_api: bool = True
    """False only where there is no real VFIO (a simulation): skips the ioctl checks."""

    @field_validator("pci_host_devices")
    @classmethod
    def _pci_unique(cls, values: list[PciHostDevice]) -> list[PciHostDevice]:
        _unique([v.pci_vendor_selector for v in values], "pciVendorSelector")
        return values

    @field_validator("mediated_devices")
    @classmethod
    def _mdev_unique(cls, values: list[MediatedDevice]) -> list[MediatedDevice]:
        _unique([v.key for v in values], "mdevNameSelector")
        return values

    @model_validator(mode="after")
    def _kinds_apart(self) -> VfioOptions:
        pci = {d.resource_name: i for i, d in reversed(list(enumerate(self.pci_host_devices)))}
        for index, mdev in enumerate(self.mediated_devices):
            if mdev.resource_name in pci:
                raise ValueError(
                    f"resourceName {mdev.resource_name!r} is used by pciHostDevices[{pci[mdev.resource_name]}] and "
                    f"mediatedDevices[{index}]; a resource serves PCI devices or mediated devices, not both"
                )
        return self

    def resources(self) -> list[str]:
        """Every resource name, PCI ones first, each once, in the order first given."""
        names = [d.resource_name for d in self.pci_host_devices] + [d.resource_name for d in self.mediated_devices]
        return list(dict.fromkeys(names))


def _unique(selectors: list[str], key: str) -> None:
    seen: dict[str, int] = {}
    for index, selector in enumerate(selectors):
        if selector in seen:
            raise ValueError(f"{key} {selector!r} is given twice ([{seen[selector]}] and [{index}])")
        seen[selector] = index
