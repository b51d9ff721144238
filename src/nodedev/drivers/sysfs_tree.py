"""Fixture trees: sysfs and /dev laid out exactly as the kernel lays them out.

Used by the tests and by `--simulate`. Every symlink has the kernel's shape
(relative, through `devices/`), so code that reads the real /sys reads a
fixture tree unchanged, `realpath` walks included:

    bus/pci/devices/X            -> ../../../devices/pci0000:00/X
    devices/pci0000:00/X/driver  -> ../../../bus/pci/drivers/NAME
    bus/pci/drivers/NAME/X       -> ../../../../devices/pci0000:00/X
    devices/pci0000:00/X/iommu_group -> ../../../kernel/iommu_groups/N
    kernel/iommu_groups/N/devices/X  -> ../../../../devices/pci0000:00/X
    devices/pci0000:00/PF/virtfnI    -> ../VF        VF/physfn -> ../PF
    class/net/IF                 -> ../../devices/pci0000:00/X[/SUB]/net/IF
    X[/SUB]/net/IF/device        -> ../../../X  (or ../../../SUB)
    class/infiniband/HCA         -> ../../devices/pci0000:00/X/infiniband/HCA

Every function sits directly under `pci0000:00` (no bridges); that is the only
simplification. Char devices are made with `os.mknod` under the dev root (the
tests run as root); `char_devices=False` makes empty regular files instead, for
a non-root `--simulate`.

Mutations are made the way the kernel makes them, so inotify sees what it
would: `set_numvfs` rewrites `sriov_numvfs` and adds or removes the VFs (and
their `virtfn` links), `bind` replaces the `driver` link, `set_carrier`
rewrites `carrier` and `operstate`, `remove` deletes a function (a PF with its
VFs). VF addresses follow the PF: VF i of PF `D:BB:00.0` is
`D:(BB+1):(i // 8).(i % 8)`, so give each PF a bus of its own with the next
one free.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

IFF_UP = 0x1
FLAGS_UP = 0x1003  # UP | BROADCAST | MULTICAST
FLAGS_DOWN = 0x1002
ARPHRD_ETHER = 1
ARPHRD_INFINIBAND = 32
VFIO_DRIVER = "vfio-pci"
VFIO_GROUP_MAJOR = 241
IB_MAJOR = 231

CHAR_DEVICES = {
    "vfio/vfio": (10, 196),
    "vhost-net": (10, 238),
    "net/tun": (10, 200),
    "infiniband/rdma_cm": (10, 59),
}
"""Well-known nodes `add_char` makes by name (relative to the dev root): (major, minor)."""


@dataclass
class _Function:
    address: str
    netdev: str | None = None
    """The interface it gets when bound to a network driver (a VF keeps its name across rebinds)."""
    netdev_sub: str | None = None
    netdev_up: bool = True
    vfs: list[str] = field(default_factory=list)


class SysfsTree:
    """A sysfs root at `root/sys` and a dev root at `root/dev`, built up by the methods below."""

    def __init__(self, root: Path, *, char_devices: bool = True) -> None:
        self.root = Path(root)
        self.sys = self.root / "sys"
        self.dev = self.root / "dev"
        self.proc = self.root / "proc"
        self.char_devices = char_devices
        self._functions: dict[str, _Function] = {}
        self._next_group = 0
        for directory in ("devices/pci0000:00", "bus/pci/devices", "bus/pci/drivers", "class/net", "class/infiniband", "kernel/iommu_groups"):
            (self.sys / directory).mkdir(parents=True, exist_ok=True)
        self.dev.mkdir(parents=True, exist_ok=True)
        (self.proc / "net").mkdir(parents=True, exist_ok=True)
        self.set_default_route()

    # -- reading back where things are ---------------------------------------------------

    def device_dir(self, address: str) -> Path:
        return self.sys / "devices" / "pci0000:00" / address

    def netdev_dir(self, ifname: str) -> Path:
        return Path(os.path.realpath(self.sys / "class" / "net" / ifname))

    def vf_address(self, pf: str, index: int) -> str:
        domain, bus, _ = pf.split(":")
        return f"{domain}:{int(bus, 16) + 1:02x}:{index // 8:02x}.{index % 8}"

    def vfs(self, pf: str) -> list[str]:
        return list(self._functions[pf].vfs)

    # -- building -----------------------------------------------------------------------

    def add_pci(
        self,
        address: str,
        *,
        vendor: int = 0x8086,
        device: int = 0x1592,
        pci_class: int = 0x020000,
        driver: str | None = None,
        numa_node: int = -1,
        iommu: bool = True,
        total_vfs: int | None = None,
        netdev: str | None = None,
        netdev_sub: str | None = None,
        physfn: str | None = None,
        netdev_up: bool = True,
    ) -> Path:
        """One PCI function. `netdev` names its interface (made while a network driver is
        bound, i.e. any driver but vfio-pci); `netdev_sub` puts it one level down, at
        `X/<sub>/net/IF` as virtio does, administratively up with carrier unless
        `netdev_up` is false. `total_vfs` makes it an SR-IOV PF with 0 VFs."""
        base = self.device_dir(address)
        base.mkdir()
        _write(base / "vendor", f"0x{vendor:04x}")
        _write(base / "device", f"0x{device:04x}")
        _write(base / "class", f"0x{pci_class:06x}")
        _write(base / "numa_node", str(numa_node))
        _write(base / "uevent", f"PCI_CLASS={pci_class:X}\nPCI_SLOT_NAME={address}")
        _symlink(base / "subsystem", "../../../bus/pci")
        if iommu:
            group = self._next_group
            self._next_group += 1
            group_dir = self.sys / "kernel" / "iommu_groups" / str(group)
            (group_dir / "devices").mkdir(parents=True)
            _symlink(group_dir / "devices" / address, f"../../../../devices/pci0000:00/{address}")
            _symlink(base / "iommu_group", f"../../../kernel/iommu_groups/{group}")
        if total_vfs is not None:
            _write(base / "sriov_totalvfs", str(total_vfs))
            _write(base / "sriov_numvfs", "0")
        if physfn is not None:
            _symlink(base / "physfn", f"../{physfn}")
        self._functions[address] = _Function(address, netdev=netdev, netdev_sub=netdev_sub, netdev_up=netdev_up)
        # Listed once complete: a daemon watching the tree reads it when this link appears.
        _symlink(self.sys / "bus" / "pci" / "devices" / address, f"../../../devices/pci0000:00/{address}")
        if driver is not None:
            self.bind(address, driver)
        return base

    def add_netdev(self, address: str, ifname: str, *, sub: str | None = None, up: bool = True, carrier: bool = True, arphrd: int = ARPHRD_ETHER) -> Path:
        """The interface `ifname` of a function, linked from `class/net`."""
        parent = self.device_dir(address) / sub if sub else self.device_dir(address)
        parent.mkdir(exist_ok=True)
        base = parent / "net" / ifname
        base.mkdir(parents=True)
        _write(base / "type", str(arphrd))
        _write(base / "ifindex", str(len(os.listdir(self.sys / "class" / "net")) + 2))
        _write(base / "flags", hex(FLAGS_UP if up else FLAGS_DOWN))
        _write(base / "operstate", ("up" if carrier else "down") if up else "down")
        if up:  # the kernel answers EINVAL for `carrier` of a down link: leave it out
            _write(base / "carrier", "1" if carrier else "0")
        _symlink(base / "device", f"../../../{sub}" if sub else f"../../../{address}")
        relative = os.path.relpath(base, self.sys / "class" / "net")
        _symlink(self.sys / "class" / "net" / ifname, relative)
        return base

    def remove_netdev(self, ifname: str) -> None:
        target = self.netdev_dir(ifname)
        (self.sys / "class" / "net" / ifname).unlink()
        shutil.rmtree(target)

    def add_rdma(self, address: str, hca: str, index: int, *, state: str = "ACTIVE", link_layer: str = "Ethernet") -> None:
        """An RDMA function: `infiniband/<hca>` with port 1 in `state` (`ports/1/state`
        reads "4: ACTIVE", "1: DOWN"), `uverbs<index>`, `umad<index>`, `issm<index>`,
        `class/infiniband/<hca>`, and their nodes under `<dev>/infiniband` (with rdma_cm)."""
        base = self.device_dir(address)
        port = base / "infiniband" / hca / "ports" / "1"
        port.mkdir(parents=True)
        _write(port / "state", _port_state(state))
        _write(port / "link_layer", link_layer)
        _symlink(base / "infiniband" / hca / "device", "../../../" + address)
        _symlink(self.sys / "class" / "infiniband" / hca, f"../../devices/pci0000:00/{address}/infiniband/{hca}")
        (base / "infiniband_verbs" / f"uverbs{index}").mkdir(parents=True)
        (base / "infiniband_mad" / f"umad{index}").mkdir(parents=True)
        (base / "infiniband_mad" / f"issm{index}").mkdir(parents=True)
        self.add_char(f"infiniband/uverbs{index}", IB_MAJOR, 192 + index)
        self.add_char(f"infiniband/umad{index}", IB_MAJOR, index)
        self.add_char(f"infiniband/issm{index}", IB_MAJOR, 64 + index)
        self.add_char("infiniband/rdma_cm")

    def set_port_state(self, hca: str, state: str, port: int = 1) -> None:
        """Rewrites `ports/<port>/state` of an HCA: "ACTIVE", "DOWN", "INIT", "ARMED"."""
        _rewrite(self.sys / "class" / "infiniband" / hca / "ports" / str(port) / "state", _port_state(state))

    def add_char(self, relative: str, major: int | None = None, minor: int | None = None) -> Path:
        """A character device at `<dev>/<relative>`; well-known ones need no numbers."""
        path = self.dev / relative
        if path.exists():
            return path
        if major is None or minor is None:
            major, minor = CHAR_DEVICES[relative]
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.char_devices:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(major, minor))
        else:
            path.touch()
        return path

    def set_default_route(self, *ifnames: str) -> None:
        """`<proc>/net/route` with an IPv4 default route through each of `ifnames`."""
        header = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        rows = "".join(f"{name}\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n" for name in ifnames)
        _rewrite(self.proc / "net" / "route", header + rows)
        _rewrite(self.proc / "net" / "ipv6_route", "")

    # -- mutations ----------------------------------------------------------------------

    def bind(self, address: str, driver: str) -> None:
        """Binds `driver`, replacing any other: the `driver` link is replaced in one rename,
        the interface comes (network driver) or goes (vfio-pci, which also gets its
        `/dev/vfio/<group>` node). The `bus/pci/drivers/<name>/<address>` links change
        last, the old one removed after the new one is made: a daemon watching the tree
        learns of the rebind there, so the function must be complete by then."""
        base = self.device_dir(address)
        function = self._functions[address]
        drivers = self.sys / "bus" / "pci" / "drivers"
        old = _readlink_name(base / "driver")
        if driver == VFIO_DRIVER:
            self._drop_netdev(function)
            group = _readlink_name(base / "iommu_group")
            if group is not None:
                self.add_char("vfio/vfio")
                self.add_char(f"vfio/{group}", VFIO_GROUP_MAJOR, int(group))
        _replace_symlink(base / "driver", f"../../../bus/pci/drivers/{driver}")
        if driver != VFIO_DRIVER and function.netdev is not None and not (self.sys / "class" / "net" / function.netdev).exists():
            self.add_netdev(address, function.netdev, sub=function.netdev_sub, up=function.netdev_up)
        (drivers / driver).mkdir(exist_ok=True)
        if not (drivers / driver / address).is_symlink():
            _symlink(drivers / driver / address, f"../../../../devices/pci0000:00/{address}")
        if old is not None and old != driver and (drivers / old / address).is_symlink():
            (drivers / old / address).unlink()

    def unbind(self, address: str) -> None:
        """The interface and the `driver` link go first, the `bus/pci/drivers` link last (see `bind`)."""
        base = self.device_dir(address)
        old = _readlink_name(base / "driver")
        if old is None:
            return
        self._drop_netdev(self._functions[address])
        (base / "driver").unlink()
        link = self.sys / "bus" / "pci" / "drivers" / old / address
        if link.is_symlink():
            link.unlink()

    def set_numvfs(self, pf: str, count: int, *, driver: str | None = "iavf", vendor: int = 0x8086, device: int = 0x1889) -> list[str]:
        """Enables `count` VFs (after removing any), as writing `sriov_numvfs` does. VFs
        bound to a network driver get interfaces named `<pf if>v<i>`, administratively
        down (as they wait for a pod). Returns the VFs."""
        function = self._functions[pf]
        base = self.device_dir(pf)
        for index, vf in enumerate(function.vfs):
            (base / f"virtfn{index}").unlink()
            self._remove_function(vf)
        function.vfs = []
        numa = (base / "numa_node").read_text().strip()
        for index in range(count):
            vf = self.vf_address(pf, index)
            netdev = f"{function.netdev}v{index}" if function.netdev else None
            pci_class = int((base / "class").read_text(), 16)
            self.add_pci(vf, vendor=vendor, device=device, pci_class=pci_class, numa_node=int(numa), physfn=pf, netdev=netdev, netdev_up=False)
            if driver is not None:
                self.bind(vf, driver)
            _symlink(base / f"virtfn{index}", f"../{vf}")
            function.vfs.append(vf)
        _rewrite(base / "sriov_numvfs", str(count))
        return list(function.vfs)

    def set_carrier(self, ifname: str, carrier: bool) -> None:
        """Cable in or out on an up interface: `carrier` and `operstate` rewritten."""
        base = self.netdev_dir(ifname)
        _rewrite(base / "operstate", "up" if carrier else "down")
        _rewrite(base / "carrier", "1" if carrier else "0")

    def set_up(self, ifname: str, up: bool) -> None:
        base = self.netdev_dir(ifname)
        _rewrite(base / "flags", hex(FLAGS_UP if up else FLAGS_DOWN))
        if up:
            _rewrite(base / "carrier", "1")
            _rewrite(base / "operstate", "up")
        else:
            (base / "carrier").unlink(missing_ok=True)
            _rewrite(base / "operstate", "down")

    def remove(self, address: str) -> None:
        """Hot-unplug: a function (a PF with its VFs first, as the kernel does)."""
        function = self._functions[address]
        for vf in function.vfs:
            self._remove_function(vf)
        function.vfs = []
        self._remove_function(address)

    # -- internals ----------------------------------------------------------------------

    def _drop_netdev(self, function: _Function) -> None:
        if function.netdev is not None and (self.sys / "class" / "net" / function.netdev).is_symlink():
            self.remove_netdev(function.netdev)

    def _remove_function(self, address: str) -> None:
        base = self.device_dir(address)
        self.unbind(address)
        group = _readlink_name(base / "iommu_group")
        if group is not None:
            shutil.rmtree(self.sys / "kernel" / "iommu_groups" / group)
        for hca in os.listdir(base / "infiniband") if (base / "infiniband").is_dir() else ():
            (self.sys / "class" / "infiniband" / hca).unlink(missing_ok=True)
        (self.sys / "bus" / "pci" / "devices" / address).unlink()
        shutil.rmtree(base)
        del self._functions[address]


_PORT_STATES = {"DOWN": 1, "INIT": 2, "ARMED": 3, "ACTIVE": 4, "ACTIVE_DEFER": 5}


def _port_state(state: str) -> str:
    return f"{_PORT_STATES[state]}: {state}"


def _write(path: Path, text: str) -> None:
    path.write_text(text + "\n")


def _rewrite(path: Path, text: str) -> None:
    """Rewrites a file in place (as sysfs attributes change: same inode, IN_MODIFY)."""
    with open(path, "w") as f:
        f.write(text + "\n")


def _symlink(path: Path, target: str) -> None:
    os.symlink(target, path)


def _replace_symlink(path: Path, target: str) -> None:
    temporary = path.with_name(f".{path.name}.new")
    os.symlink(target, temporary)
    os.replace(temporary, path)


def _readlink_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None
