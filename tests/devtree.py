"""Device-node fixtures: real character devices (we run as root), as devtmpfs would have them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

TUN = (10, 200)
VHOST_NET = (10, 238)
KVM = (10, 232)


def char_device(path: Path, numbers: tuple[int, int] = TUN) -> Path:
    """A character device node at `path` (parents made), as `mknod path c MAJOR MINOR`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(*numbers))
    return path


def dev_tree(root: Path, *nodes: str) -> Path:
    """A /dev fixture holding the named nodes (`net/tun`, `vhost-net`, `kvm`) as char devices."""
    numbers = {"net/tun": TUN, "vhost-net": VHOST_NET, "kvm": KVM}
    for node in nodes:
        char_device(root / node, numbers.get(node, TUN))
    return root
