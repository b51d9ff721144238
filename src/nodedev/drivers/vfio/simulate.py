"""`--simulate vfio`: a KubeVirt passthrough node, built with `fixture.VfioFixture` under the workdir.

  * 0000:3b:00.0, 0000:3c:00.0: NVIDIA Tesla T4 (10de:1eb8) on vfio-pci, NUMA 0, a
    group each; the first also has its iommufd cdev (vfio0, and /dev/iommu).
  * 0000:5e:00.0, 0000:5f:00.0: Samsung NVMe (144d:a808) on vfio-pci, NUMA 1, a group each.
  * One shared group: a PCIe bridge (0000:85:00.0, pcieport), a Tesla V100 (10de:1db6,
    0000:86:00.0) and its audio function (10de:10f2, 0000:86:00.1), both on vfio-pci:
    one device, Healthy.
  * 0000:d8:00.0, a T4 on vfio-pci whose audio function 0000:d8:00.1 is on
    snd_hda_intel: listed Unhealthy, the reason naming the audio function.
  * 0000:af:00.0, a T4 on nvidia with mdevs: two "GRID T4-1Q" (nvidia-222), one
    "GRID T4-2Q" (nvidia-223), each in a group of its own.

There is no VFIO in this kernel, so the section turns `checkVfioApi` off. Group
nodes are real character devices when run as root; otherwise empty files stand in,
and the driver says every device is Unhealthy because of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nodedev.drivers.vfio.fixture import CLASS_BRIDGE, VfioFixture

NAME = "vfio"
NVIDIA, SAMSUNG = 0x10DE, 0x144D
T4, V100, V100_AUDIO, T4_AUDIO, NVME = 0x1EB8, 0x1DB6, 0x10F2, 0x10F8, 0xA808
CLASS_3D, CLASS_AUDIO, CLASS_NVME = 0x030200, 0x040300, 0x010802
T4_GPUS = ("0000:3b:00.0", "0000:3c:00.0")
NVMES = ("0000:5e:00.0", "0000:5f:00.0")
BRIDGE, SHARED_GPU, SHARED_AUDIO = "0000:85:00.0", "0000:86:00.0", "0000:86:00.1"
HELD_GPU, HELD_AUDIO = "0000:d8:00.0", "0000:d8:00.1"
VGPU_PARENT = "0000:af:00.0"
MDEVS = {
    "4b20d080-1b54-4048-85b3-a6a62d165c01": ("nvidia-222", "GRID T4-1Q"),
    "4b20d080-1b54-4048-85b3-a6a62d165c02": ("nvidia-222", "GRID T4-1Q"),
    "4b20d080-1b54-4048-85b3-a6a62d165c03": ("nvidia-223", "GRID T4-2Q"),
}
PERMITTED: dict[str, Any] = {
    "pciHostDevices": [
        {"pciVendorSelector": "10DE:1EB8", "resourceName": "nvidia.com/TU104GL_Tesla_T4", "externalResourceProvider": True},
        {"pciVendorSelector": "10de:1db6", "resourceName": "nvidia.com/GV100GL_Tesla_V100", "externalResourceProvider": True},
        {"pciVendorSelector": "144d:a808", "resourceName": "devices.kubevirt.io/nvme", "externalResourceProvider": True},
    ],
    "mediatedDevices": [
        {"mdevNameSelector": "GRID T4-1Q", "resourceName": "nvidia.com/GRID_T4-1Q", "externalResourceProvider": True},
        {"mdevNameSelector": "GRID T4-2Q", "resourceName": "nvidia.com/GRID_T4-2Q", "externalResourceProvider": True},
    ],
}


def build(root: Path) -> VfioFixture:
    """The node described above, under `root`."""
    node = VfioFixture(root, char_devices=os.geteuid() == 0)
    for index, address in enumerate(T4_GPUS):
        node.add_pci(address, vendor=NVIDIA, device=T4, numa_node=0, cdev=0 if index == 0 else None)
    for address in NVMES:
        node.add_pci(address, vendor=SAMSUNG, device=NVME, pci_class=CLASS_NVME, numa_node=1)
    shared = node.add_pci(BRIDGE, vendor=0x8086, device=0x2030, pci_class=CLASS_BRIDGE, driver="pcieport", numa_node=1)
    node.add_pci(SHARED_GPU, vendor=NVIDIA, device=V100, numa_node=1, group=shared)
    node.add_pci(SHARED_AUDIO, vendor=NVIDIA, device=V100_AUDIO, pci_class=CLASS_AUDIO, numa_node=1, group=shared)
    held = node.add_pci(HELD_GPU, vendor=NVIDIA, device=T4, numa_node=1)
    node.add_pci(HELD_AUDIO, vendor=NVIDIA, device=T4_AUDIO, pci_class=CLASS_AUDIO, driver="snd_hda_intel", numa_node=1, group=held)
    node.add_pci(VGPU_PARENT, vendor=NVIDIA, device=T4, driver="nvidia", numa_node=1)
    for uuid, (type_id, type_name) in MDEVS.items():
        node.add_mdev(VGPU_PARENT, uuid, type_id, type_name)
    return node


def simulate(fixture: str, workdir: Path) -> dict[str, Any] | None:
    if fixture != NAME:
        return None
    node = build(Path(workdir).resolve())
    return {"enabled": True, "sysfsRoot": str(node.sys), "devRoot": str(node.dev), "checkVfioApi": False, **PERMITTED}
