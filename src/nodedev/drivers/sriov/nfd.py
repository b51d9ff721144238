"""Node labels for SR-IOV NICs, named as Node Feature Discovery's network source names them.

`feature.node.kubernetes.io/network-sriov.capable=true` when a network PF
(class 0x02) can have VFs (`sriov_totalvfs` > 0), and `...network-sriov.configured=true`
when one has VFs enabled (`sriov_numvfs` > 0). Made from the functions a scan read,
so the driver's `labels()` only returns them. Only functions of the classes the
configured resources ask for are read: with accelerator resources alone, no label.
"""

from __future__ import annotations

from collections.abc import Iterable

from nodedev.drivers.pci import CLASS_NETWORK, PciDevice

CAPABLE = "feature.node.kubernetes.io/network-sriov.capable"
CONFIGURED = "feature.node.kubernetes.io/network-sriov.configured"


def sriov_labels(devices: Iterable[PciDevice]) -> dict[str, str]:
    pfs = [d for d in devices if d.base_class == CLASS_NETWORK and d.total_vfs]
    labels = {CAPABLE: "true"} if pfs else {}
    if any(d.num_vfs > 0 for d in pfs):
        labels[CONFIGURED] = "true"
    return labels
