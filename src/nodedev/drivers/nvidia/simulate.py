"""A simulated NVIDIA node: the fake NVML library plus the sysfs, /dev and /proc trees around it.

The fake `libnvidia-ml.so.1` (native/fake_nvml/fake_nvml.c) answers the real pynvml
bindings from a fixture file, so the NVIDIA driver runs unchanged without a GPU.
NVML alone is not a node, though: the driver also reads NUMA nodes from sysfs,
hands out /dev/nvidia* paths and finds MIG capability minors under /proc. `prepare`
builds all of that from the same fixture, so the pieces cannot disagree.

The node also gets a driver root (`flags.nvidiaDriverRoot`): the driver's
libraries by their versioned names, its binaries and GSP firmware, and stand-in
`nvidia-ctk` and `nvidia-cuda-mps-control` scripts that record how they were
called, so the CDI spec the driver writes names files that exist.

`simulate` is what `NvidiaDriver.simulate` (and so `nodedev --simulate`) calls: it
returns the driver's own config section pointing at the trees, never the host's
top-level roots, so the other drivers keep the real /sys and /dev.

The fixture format and the control-file syntax for injecting events are documented
at the top of fake_nvml.c; `SimulatedNode.inject` appends a control line.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodedev.drivers.nvidia.fakeroot import CALLS_FILE, CTK_RELPATH, build_driver_root

PACKAGE_DIR = Path(__file__).resolve().parent
FIXTURES_DIR = PACKAGE_DIR / "fixtures"
FIXTURE_SUFFIX = ".conf"
FAKE_LIBRARY_RELPATH = Path("fake") / "libnvidia-ml.so.1"
"""Where build.py puts the compiled fake, relative to this package."""
ENV_FIXTURE = "NODEDEV_FAKE_NVML"
ENV_EVENTS = "NODEDEV_FAKE_NVML_EVENTS"
NVIDIA_VENDOR = 0x10DE
PCI_CLASS_3D_CONTROLLER = 0x030200
TOP_LEVEL_KEYS = frozenset(
    {"gpu", "mig", "nvlink", "topology", "driver_version", "nvml_version", "cuda_driver_version", "init_error"}
)
"""Keys that start a line outside a block: a file whose first key is one of these is an NVML fixture."""

# /proc/driver/nvidia-caps/mig-minors numbers every (gpu, gi, ci) capability up front:
# "config" is 1, "monitor" is 2, then per GPU 15 GPU instances x (1 access + 8 CIs).
_MIG_CAP_FIRST = 3
_MIG_GPU_INSTANCES = 15
_MIG_COMPUTE_INSTANCES = 8
_MIG_CAPS_PER_GI = 1 + _MIG_COMPUTE_INSTANCES
_MIG_CAPS_PER_GPU = _MIG_GPU_INSTANCES * _MIG_CAPS_PER_GI
_CAP_FILE_MODE_READ_ALL = 0o444  # as the driver publishes gi/ci access files
_CAP_FILE_MODE_CONFIG = 0o400


_loaded: list[ctypes.CDLL] = []  # keeps the fake loaded for the life of the process
log = logging.getLogger("nodedev.drivers.nvidia")


class FixtureError(ValueError):
    """A fixture name that is not shipped, or a fixture file that does not parse."""


@dataclass(frozen=True, slots=True)
class FixtureGpu:
    """What the trees outside NVML need to know about one GPU of a fixture."""

    index: int
    uuid: str
    name: str
    bus_id: str
    """NVML form: 00000000:07:00.0 (8-digit domain, upper-case hex)."""
    minor: int
    numa_node: int
    pci_device_id: int
    """NVML form: (device << 16) | vendor."""
    pci_subsystem_id: int
    present: bool = True
    """False: off the bus at start (`present 0`), until `SimulatedNode.plug`."""

    @property
    def sysfs_bus_id(self) -> str:
        return nvml_to_sysfs_bus_id(self.bus_id)


@dataclass(frozen=True, slots=True)
class FixtureMig:
    parent: int
    gpu_instance_id: int
    compute_instance_id: int
    uuid: str
    profile: str


@dataclass(frozen=True, slots=True)
class Fixture:
    path: Path
    driver_version: str
    gpus: tuple[FixtureGpu, ...]
    migs: tuple[FixtureMig, ...]


@dataclass(frozen=True, slots=True)
class SimulatedNode:
    """Where a prepared simulation lives. Point the driver's roots at these."""

    fixture: Path
    sysfs_root: Path
    """Holds bus/pci/devices/<0000:07:00.0>/{numa_node,vendor,device,class,...}."""
    dev_root: Path
    """Holds nvidiactl, nvidia-uvm, nvidia-uvm-tools, nvidia-modeset, nvidia<minor>, nvidia-caps/."""
    proc_root: Path
    """Holds driver/nvidia/capabilities/... (MIG capability minors) and driver/nvidia-caps/mig-minors."""
    cdi_root: Path
    """Where the driver writes its CDI spec in a simulation: never the host's /var/run/cdi."""
    events_file: Path
    """The fake's control file (NODEDEV_FAKE_NVML_EVENTS); see `inject`."""
    library: Path
    driver_root: Path
    """The simulated `nvidiaDriverRoot`: usr/lib/..., usr/bin/..., lib/firmware/nvidia/<version>/, and dev/."""
    driver_version: str
    gpus: tuple[FixtureGpu, ...] = field(default=())
    migs: tuple[FixtureMig, ...] = field(default=())

    def inject(self, line: str) -> None:
        """Appends one control line (e.g. "xid 0 48", "lost 3"); the fake reads it within 10 ms."""
        if "\n" in line:
            raise ValueError(f"one control line at a time, got {line!r}")
        with self.events_file.open("a") as f:
            f.write(line + "\n")

    def plug(self, index: int) -> None:
        """GPU `index` of the fixture arrives: its PCI device and node appear, then NVML can list it."""
        gpu = self.gpus[index]
        add_pci_device(self.sysfs_root, gpu)
        _write(self.dev_root / f"nvidia{gpu.minor}", "")
        self.inject(f"plug {index}")

    def unplug(self, index: int, *, pci_gone: bool = True) -> None:
        """GPU `index` leaves the bus: NVML loses it at once (Xid 79); unless `pci_gone` is
        False its PCI device and node go too, as on a hot removal."""
        gpu = self.gpus[index]
        self.inject(f"unplug {index}")
        if pci_gone:
            remove_pci_device(self.sysfs_root, gpu.sysfs_bus_id)
            (self.dev_root / f"nvidia{gpu.minor}").unlink(missing_ok=True)

    @property
    def ctk(self) -> Path:
        """The stand-in nvidia-ctk, for `flags.plugin.nvidiaCTKPath`."""
        return self.driver_root / CTK_RELPATH

    def calls(self) -> list[list[str]]:
        """What the stand-in binaries were run with, one argument list per run."""
        path = self.driver_root / CALLS_FILE
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    def config_section(self) -> dict[str, Any]:
        """The `drivers.nvidia` keys that point the driver at this simulation.

        The driver's own roots, not the top-level ones: under `--simulate` kvm, tun
        and netdev keep reading the real /dev and /sys.
        """
        return {
            "enabled": True,
            "sysfsRoot": str(self.sysfs_root),
            "devRoot": str(self.dev_root),
            "procRoot": str(self.proc_root),
            "cdiRoot": str(self.cdi_root),
            "flags": {"nvidiaDriverRoot": str(self.driver_root)},
        }

    def environ(self) -> dict[str, str]:
        """Variables a subprocess needs to load this simulation through the dynamic linker."""
        search = [str(self.library.parent), *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
        return {
            ENV_FIXTURE: str(self.fixture),
            ENV_EVENTS: str(self.events_file),
            "LD_LIBRARY_PATH": ":".join(search),
        }


def fixture_names() -> list[str]:
    return sorted(p.name.removesuffix(FIXTURE_SUFFIX) for p in FIXTURES_DIR.glob(f"*{FIXTURE_SUFFIX}"))


def find_fixture(name_or_path: str) -> Path | None:
    """A shipped fixture's file, or a file that reads as an NVML fixture; None for anything else.

    A shipped name wins over a file of that name in the working directory. A file
    is taken when its first key is an NVML fixture key, so another driver's
    simulation file is left for that driver.
    """
    shipped = FIXTURES_DIR / f"{name_or_path}{FIXTURE_SUFFIX}"
    if "/" not in name_or_path and shipped.is_file():
        return shipped
    path = Path(name_or_path).expanduser()
    if path.is_file() and _first_key(path) in TOP_LEVEL_KEYS:
        return path.resolve()
    return None


def resolve_fixture(name_or_path: str) -> Path:
    """Like `find_fixture`, but a name or file it does not take is an error naming the shipped ones."""
    path = find_fixture(name_or_path)
    if path is None:
        raise FixtureError(
            f"no NVML fixture {name_or_path!r}: not an NVML fixture file, and not one of the shipped "
            f"fixtures ({', '.join(fixture_names())}) in {FIXTURES_DIR}"
        )
    return path


def _first_key(path: Path) -> str | None:
    """The first key of a fixture-like file; None when it is unreadable, binary or empty."""
    try:
        with path.open(encoding="utf-8") as lines:
            for raw in lines:
                line = _strip_comment(raw).strip()
                if line:
                    return line.split()[0]
    except (OSError, UnicodeDecodeError):
        return None
    return None


def fake_library_path() -> Path:
    """The fake library inside the installed package (built by build.py / pip install)."""
    return PACKAGE_DIR / FAKE_LIBRARY_RELPATH


def nvml_to_sysfs_bus_id(bus_id: str) -> str:
    """00000000:07:00.0 (NVML) -> 0000:07:00.0 (sysfs: 4-digit domain, lower case)."""
    try:
        domain, bus, rest = bus_id.split(":")
        device, function = rest.split(".")
        return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{int(function, 16):x}"
    except ValueError:
        raise FixtureError(f"bad PCI bus id {bus_id!r} (want 00000000:07:00.0)") from None


def mig_cap_minor(gpu_minor: int, gpu_instance_id: int, compute_instance_id: int | None = None) -> int:
    """The nvidia-caps minor of a GPU instance's access file, or of one of its compute instances."""
    base = _MIG_CAP_FIRST + gpu_minor * _MIG_CAPS_PER_GPU + gpu_instance_id * _MIG_CAPS_PER_GI
    return base if compute_instance_id is None else base + 1 + compute_instance_id


def load_fixture(path: Path) -> Fixture:
    """Parses the parts of a fixture that the sysfs, /dev and /proc trees need.

    The C library is the authority on the format; this reads the same lines and
    ignores the keys only NVML answers.
    """
    gpus: list[dict[str, str]] = []
    migs: list[dict[str, str]] = []
    driver_version = "550.54.15"
    block: dict[str, str] | None = None
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        key, _, value = line.partition(" ")
        value = value.strip()
        where = f"{path}:{lineno}"
        if key == "gpu":
            block = {"index": value, "where": where}
            gpus.append(block)
        elif key == "mig":
            block = {"parent": value, "where": where}
            migs.append(block)
        elif key in ("nvlink", "topology", "nvml_version", "cuda_driver_version", "init_error"):
            block = None
        elif key == "driver_version":
            driver_version, block = value, None
        elif block is None:
            raise FixtureError(f"{where}: key {key!r} outside a gpu/mig block")
        else:
            block[key] = value
    return Fixture(
        path=path,
        driver_version=driver_version,
        gpus=tuple(_fixture_gpu(g) for g in gpus),
        migs=tuple(_fixture_mig(m) for m in migs),
    )


def _strip_comment(line: str) -> str:
    for i, ch in enumerate(line):
        if ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _fixture_gpu(block: dict[str, str]) -> FixtureGpu:
    try:
        index = int(block["index"])
        return FixtureGpu(
            index=index,
            uuid=block["uuid"],
            name=block["name"],
            bus_id=block["bus_id"],
            minor=int(block.get("minor", index)),
            numa_node=int(block.get("numa_node", "-1")),
            pci_device_id=int(block.get("pci_device_id", "0"), 0),
            pci_subsystem_id=int(block.get("pci_subsystem_id", "0"), 0),
            present=block.get("present", "1") != "0",
        )
    except (KeyError, ValueError) as err:
        raise FixtureError(f"{block['where']}: GPU block: bad or missing {err}") from None


def _fixture_mig(block: dict[str, str]) -> FixtureMig:
    try:
        return FixtureMig(
            parent=int(block["parent"]),
            gpu_instance_id=int(block["gpu_instance_id"]),
            compute_instance_id=int(block["compute_instance_id"]),
            uuid=block["uuid"],
            profile=block["profile"],
        )
    except (KeyError, ValueError) as err:
        raise FixtureError(f"{block['where']}: MIG block: bad or missing {err}") from None


def simulate(fixture: str, workdir: Path) -> dict[str, Any] | None:
    """`NvidiaDriver.simulate`: None for a fixture that is not NVIDIA's, else the section
    that runs the driver on it (the fake library is loaded into this process)."""
    path = find_fixture(fixture)
    if path is None:
        return None
    node = prepare(path, workdir)
    log.info("simulating %s: %d GPU(s) from %s", fixture, len(node.gpus), node.fixture)
    return node.config_section()


def prepare(fixture: Path, workdir: Path) -> SimulatedNode:
    """Makes this process's pynvml talk to the fake, and builds the trees under workdir.

    Sets NODEDEV_FAKE_NVML and NODEDEV_FAKE_NVML_EVENTS (an empty workdir/nvml-events)
    in os.environ; the fake reads them at the next nvmlInit after a full shutdown, so
    calling prepare again with another fixture switches fixtures in-process.
    """
    fixture = Path(fixture).resolve()
    parsed = load_fixture(fixture)
    library = fake_library_path()
    if not library.is_file():
        raise FileNotFoundError(
            f"fake NVML library {library} is missing: run `python build.py` in the source tree "
            "(or reinstall nodedev with pip, which builds it)"
        )
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    node = SimulatedNode(
        fixture=fixture,
        sysfs_root=workdir / "sys",
        dev_root=workdir / "dev",
        proc_root=workdir / "proc",
        cdi_root=workdir / "cdi",
        events_file=workdir / "nvml-events",
        library=library,
        driver_root=workdir,
        driver_version=parsed.driver_version,
        gpus=parsed.gpus,
        migs=parsed.migs,
    )
    node.events_file.write_text("")
    _build_sysfs(node.sysfs_root, parsed)
    _build_dev(node.dev_root, parsed)
    _build_proc(node.proc_root, parsed)
    build_driver_root(node.driver_root, parsed.driver_version)
    os.environ[ENV_FIXTURE] = str(fixture)
    os.environ[ENV_EVENTS] = str(node.events_file)
    # Loaded by path and globally: pynvml's CDLL("libnvidia-ml.so.1") then finds this
    # object by its SONAME instead of searching the disk for a real driver.
    _loaded.append(ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL))
    return node


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _build_sysfs(root: Path, fixture: Fixture) -> None:
    (root / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
    (root / "bus" / "pci" / "drivers" / "nvidia").mkdir(parents=True, exist_ok=True)
    for gpu in fixture.gpus:
        if gpu.present:
            add_pci_device(root, gpu)


def add_pci_device(root: Path, gpu: FixtureGpu) -> None:
    """The PCI device, built aside and renamed in, so a watcher never sees half of it."""
    bdf = gpu.sysfs_bus_id
    devices = root / "bus" / "pci" / "devices"
    staging = root / "bus" / "pci" / f".{bdf}.new"
    _write(staging / "vendor", f"0x{NVIDIA_VENDOR:04x}\n")
    _write(staging / "device", f"0x{gpu.pci_device_id >> 16:04x}\n")
    _write(staging / "subsystem_vendor", f"0x{gpu.pci_subsystem_id & 0xFFFF:04x}\n")
    _write(staging / "subsystem_device", f"0x{gpu.pci_subsystem_id >> 16:04x}\n")
    _write(staging / "class", f"0x{PCI_CLASS_3D_CONTROLLER:06x}\n")
    _write(staging / "numa_node", f"{gpu.numa_node}\n")
    _symlink(staging / "driver", Path("..") / ".." / "drivers" / "nvidia")
    remove_pci_device(root, bdf)
    staging.rename(devices / bdf)
    _symlink(root / "bus" / "pci" / "drivers" / "nvidia" / bdf, Path("..") / ".." / "devices" / bdf)


def remove_pci_device(root: Path, bdf: str) -> None:
    device = root / "bus" / "pci" / "devices" / bdf
    (root / "bus" / "pci" / "drivers" / "nvidia" / bdf).unlink(missing_ok=True)
    if device.is_dir():
        for entry in device.iterdir():
            entry.unlink()
        device.rmdir()


def _symlink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def _build_dev(root: Path, fixture: Fixture) -> None:
    """Plain files stand in for the character devices: paths are what the driver hands out."""
    names = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"]
    names += [f"nvidia{gpu.minor}" for gpu in fixture.gpus if gpu.present]
    if fixture.migs:
        names += ["nvidia-caps/nvidia-cap1", "nvidia-caps/nvidia-cap2"]
        names += [f"nvidia-caps/nvidia-cap{minor}" for minor in _mig_minors_in_use(fixture)]
    for name in names:
        _write(root / name, "")


def _mig_minors_in_use(fixture: Fixture) -> list[int]:
    minors: set[int] = set()
    for mig in fixture.migs:
        gpu_minor = fixture.gpus[mig.parent].minor
        minors.add(mig_cap_minor(gpu_minor, mig.gpu_instance_id))
        minors.add(mig_cap_minor(gpu_minor, mig.gpu_instance_id, mig.compute_instance_id))
    return sorted(minors)


def _cap_file(minor: int, mode: int) -> str:
    return f"DeviceFileMinor: {minor}\nDeviceFileMode: {mode}\nDeviceFileModify: 1\n"


def _build_proc(root: Path, fixture: Fixture) -> None:
    nvidia = root / "driver" / "nvidia"
    _write(
        nvidia / "version",
        f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {fixture.driver_version}  (simulated by nodedev)\n",
    )
    caps = nvidia / "capabilities"
    _write(caps / "mig" / "config", _cap_file(1, _CAP_FILE_MODE_CONFIG))
    _write(caps / "mig" / "monitor", _cap_file(2, _CAP_FILE_MODE_READ_ALL))
    for mig in fixture.migs:
        gpu_minor = fixture.gpus[mig.parent].minor
        gi_dir = caps / f"gpu{gpu_minor}" / "mig" / f"gi{mig.gpu_instance_id}"
        _write(gi_dir / "access", _cap_file(mig_cap_minor(gpu_minor, mig.gpu_instance_id), _CAP_FILE_MODE_READ_ALL))
        _write(
            gi_dir / f"ci{mig.compute_instance_id}" / "access",
            _cap_file(
                mig_cap_minor(gpu_minor, mig.gpu_instance_id, mig.compute_instance_id), _CAP_FILE_MODE_READ_ALL
            ),
        )
    lines = ["config 1", "monitor 2"]
    for gpu in fixture.gpus:
        for gi in range(_MIG_GPU_INSTANCES):
            lines.append(f"gpu{gpu.minor}/gi{gi}/access {mig_cap_minor(gpu.minor, gi)}")
            for ci in range(_MIG_COMPUTE_INSTANCES):
                lines.append(f"gpu{gpu.minor}/gi{gi}/ci{ci}/access {mig_cap_minor(gpu.minor, gi, ci)}")
    _write(root / "driver" / "nvidia-caps" / "mig-minors", "\n".join(lines) + "\n")
