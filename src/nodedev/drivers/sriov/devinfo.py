"""The CNI device-info files: how sriov-cni and Multus learn what a pod's device is.

One file per offered device, `<deviceInfoDir>/<resource with / as ->-<address>-device.json`,
holding `{"type":"pci","version":"1.1.0","pci":{"pci-address":...,"rdma-device":...}}`.
They are written when a scan finds the device (atomically, mode 0444, only when their
content changes) and removed when a scan no longer offers it, so Allocate does no I/O.
They are left in place when the daemon stops: a pod being set up across a restart still
finds its file, and the next start removes those of devices that have gone.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path

from nodedev.files import write_atomically

VERSION = "1.1.0"


def file_name(resource: str, address: str) -> str:
    """`<resource with / as ->-<address>-device.json`."""
    return f"{resource.replace('/', '-')}-{address}-device.json"


def content(address: str, rdma_device: str) -> str:
    """The file's content (keys sorted, as `json.dumps(sort_keys=True)` has them; built by
    hand because a 4,096-VF node writes 4,096 at start)."""
    pci = f'{{"pci-address": {json.dumps(address)}, "rdma-device": {json.dumps(rdma_device)}}}'
    return f'{{"pci": {pci}, "type": "pci", "version": "{VERSION}"}}'


class DeviceInfoFiles:
    """The files of one driver's resources in one directory, and what this process wrote there."""

    def __init__(self, directory: Path, resources: Collection[str], log: logging.Logger) -> None:
        self.directory = directory
        self._prefixes = tuple(f"{r.replace('/', '-')}-" for r in resources)
        self._log = log
        self._written: dict[str, str] = {}
        """File name -> the content this process last wrote there."""
        self._cleaned = False
        self.failed = False
        """The last sync failed: the next must check every file, not just what changed."""

    @property
    def written(self) -> Mapping[str, str]:
        return self._written

    def sync(self, wanted: Mapping[str, str], stale: Collection[str]) -> None:
        """Writes `wanted` (name -> content) where it differs and removes `stale`; the
        first sync also removes files of our resources an earlier run left for devices
        now gone. A failure is one warning, and `failed` until a sync succeeds."""
        if not wanted and not self._written and not self.directory.is_dir():
            return  # nothing offered: do not create the directory on a node without SR-IOV
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not self._cleaned:
                self._remove_stale(wanted.keys())
                self._cleaned = True
            for name, text in wanted.items():
                if self._written.get(name) != text:
                    write_atomically(self.directory / name, text, mode=0o444, durable=False)
                    self._written[name] = text
            for name in stale:
                (self.directory / name).unlink(missing_ok=True)
                self._written.pop(name, None)
            self.failed = False
        except OSError as err:
            self._log.warning("device-info files in %s: %s", self.directory, err)
            self.failed = True

    def _remove_stale(self, wanted: Collection[str]) -> None:
        for name in os.listdir(self.directory):
            if name.startswith(self._prefixes) and name.endswith("-device.json") and name not in wanted:
                (self.directory / name).unlink(missing_ok=True)
