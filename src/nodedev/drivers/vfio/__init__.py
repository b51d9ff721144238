"""Driver `vfio`: whole PCI devices by IOMMU group and mediated devices, as KubeVirt serves
them. `options` holds KubeVirt's config shape, `discovery` the sysfs reading, `checks` the
viability rules and ioctls, `driver` the scans and Allocate, `fixture` the fixture trees,
`simulate` the `--simulate vfio` node."""

from nodedev.drivers.vfio.driver import VfioDriver

__all__ = ["VfioDriver"]
