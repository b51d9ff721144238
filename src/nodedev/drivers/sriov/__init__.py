"""Driver `sriov`: SR-IOV VFs as the SR-IOV network device plugin serves them, plus live
changes and link health. `options` holds the plugin's config, `reading` what a scan reads
of the node, `driver` the choice of devices and Allocate, `devinfo` the CNI device-info
files, `nfd` the node labels, `simulate` the `--simulate sriov` node."""

from nodedev.drivers.sriov.driver import SriovDriver

__all__ = ["SriovDriver"]
