"""The driver root of a simulated node: what an NVIDIA driver installs, named by its version.

Libraries are placeholder files under their versioned names with the `.so.1`
links ldconfig would make; binaries and `nvidia-ctk` are stand-in scripts that
append how they were run to `<root>/calls.log`, so tests can check what the
driver (or a container runtime running a CDI hook) asked of them.
"""

from __future__ import annotations

from pathlib import Path

from nodedev.drivers.nvidia import driverroot

ABSENT = frozenset({"libnvidia-pkcs11", "libnvidia-pkcs11-openssl3", "libnvidia-nscq"})
"""Libraries a node without FIPS or NVSwitch lacks: left out, so the CDI spec must skip what is missing."""
LIBRARIES = tuple(name for name in driverroot.LIBRARIES if name not in ABSENT)
"""What the simulated driver root holds, as `<name>.so.<driver version>` plus the `.so.1` link."""
LIBRARY_DIR = driverroot.LIBRARY_DIRS[0]
CTK_RELPATH = "usr/bin/nvidia-ctk"
CALLS_FILE = "calls.log"
"""Each stand-in binary appends `<name> <args...>` here (in the simulation's workdir)."""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _symlink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def _stand_in(path: Path, name: str, calls: Path) -> None:
    """An executable that appends its name and arguments to `calls` and succeeds."""
    _write(path, f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n')
    path.chmod(0o755)


MPS_CONTROL_SCRIPT = """#!/bin/sh
# Stand-in nvidia-cuda-mps-control. `-d` "starts the daemon": it records its
# directories and makes <pipe>/control, as the real daemon makes its socket there.
# Without -d it reads commands from stdin, records each, and fails as the real
# client does when no daemon listens on the pipe; `quit` ends the daemon.
calls="{calls}"
echo "nvidia-cuda-mps-control $*" >> "$calls"
pipe="${{CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}}"
if [ "$1" = "-d" ]; then
    echo "nvidia-cuda-mps-control= CUDA_MPS_PIPE_DIRECTORY=$pipe CUDA_MPS_LOG_DIRECTORY=$CUDA_MPS_LOG_DIRECTORY" >> "$calls"
    : > "$pipe/control"
    exit 0
fi
[ -e "$pipe/control" ] || {{ echo "Cannot find MPS control daemon process" >&2; exit 1; }}
while IFS= read -r line; do
    echo "nvidia-cuda-mps-control< $line" >> "$calls"
    case "$line" in
        quit) rm -f "$pipe/control" ;;
        get_default_active_thread_percentage) echo 100.0 ;;
    esac
done
"""


def build_driver_root(root: Path, version: str) -> None:
    """Libraries, binaries and firmware where a driver installs them, named by `version`."""
    libs = root / LIBRARY_DIR
    for name in LIBRARIES:
        _write(libs / f"{name}.so.{version}", f"simulated {name} {version}\n")
        _symlink(libs / f"{name}.so.1", Path(f"{name}.so.{version}"))
    calls = root / CALLS_FILE
    for name in driverroot.BINARIES:
        _stand_in(root / "usr" / "bin" / name, name, calls)
    _write(root / "usr" / "bin" / "nvidia-cuda-mps-control", MPS_CONTROL_SCRIPT.format(calls=calls))
    _stand_in(root / CTK_RELPATH, "nvidia-ctk", calls)
    for blob in ("gsp_ga10x.bin", "gsp_tu10x.bin"):
        _write(root / "lib" / "firmware" / "nvidia" / version / blob, "simulated GSP firmware\n")
