"""The NVIDIA driver's user-space files, found under the driver root, for the CDI spec.

A container started through CDI without the NVIDIA runtime has only what the
spec names. NVIDIA's generator (nvidia-container-toolkit's nvcdi) names the
device nodes, the driver's libraries by their versioned file names, its
binaries and its GSP firmware, all bind-mounted read-only, plus a hook that runs
ldconfig in the container so the libraries resolve. This module finds the same
kind of files, by the driver version NVML reports, under the root this process
sees (`containerDriverRoot`, else `nvidiaDriverRoot`, else /) and names them by
their host path (under `nvidiaDriverRoot`) and their path in the container
(the same path, without the driver root).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

LIBRARIES = (
    "libcuda",
    "libcudadebugger",
    "libnvidia-ml",
    "libnvidia-ptxjitcompiler",
    "libnvidia-nvvm",
    "libnvidia-opencl",
    "libnvidia-allocator",
    "libnvidia-cfg",
    "libnvidia-gpucomp",
    "libnvidia-pkcs11",
    "libnvidia-pkcs11-openssl3",
    "libnvidia-nscq",
)
"""Compute and management libraries, looked up as `<name>.so.<driver version>`."""
LIBRARY_DIRS = (
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",
    "usr/lib",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "lib64",
    "lib",
)
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control", "nvidia-cuda-mps-server")
BINARY_DIRS = ("usr/bin", "usr/sbin", "bin", "sbin")
FIRMWARE_DIR = "lib/firmware/nvidia"
MOUNT_OPTIONS = ("ro", "nosuid", "nodev", "bind")
HOOK_TOOLS = {"nvidia-ctk": ("hook", "update-ldcache"), "nvidia-cdi-hook": ("update-ldcache",)}
"""The tools that can update the container's ld cache, and the arguments that ask them to."""


@dataclass(frozen=True, slots=True)
class DriverFiles:
    """What a container needs from the driver, relative to the driver root (`usr/bin/nvidia-smi`)."""

    version: str
    libraries: tuple[str, ...] = ()
    binaries: tuple[str, ...] = ()
    firmware: tuple[str, ...] = ()

    @property
    def library_dirs(self) -> tuple[str, ...]:
        """Container directories holding the libraries, for the ld cache hook."""
        return tuple(dict.fromkeys(str(PurePosixPath("/", rel).parent) for rel in self.libraries))

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.libraries, *self.binaries, *self.firmware)


def _first(root: Path, dirs: tuple[str, ...], name: str) -> str | None:
    for directory in dirs:
        rel = f"{directory}/{name}"
        if os.path.isfile(root / rel):
            return rel
    return None


def find_binary(root: Path, name: str) -> Path | None:
    """A driver binary (nvidia-smi, nvidia-cuda-mps-control) as this process sees it."""
    rel = _first(root, BINARY_DIRS, name)
    return root / rel if rel else None


def find(root: Path, version: str) -> DriverFiles:
    """The driver's files of `version` under `root` (as this process sees it). A library
    is taken by its real versioned name, never a `.so.1` link, which the ld cache hook makes."""
    libraries = [rel for name in LIBRARIES if (rel := _first(root, LIBRARY_DIRS, f"{name}.so.{version}"))]
    binaries = [rel for name in BINARIES if (rel := _first(root, BINARY_DIRS, name))]
    firmware_dir = root / FIRMWARE_DIR / version
    try:
        firmware = sorted(f"{FIRMWARE_DIR}/{version}/{e.name}" for e in os.scandir(firmware_dir) if e.is_file() and e.name.endswith(".bin"))
    except OSError:
        firmware = []
    return DriverFiles(version=version, libraries=tuple(libraries), binaries=tuple(binaries), firmware=tuple(firmware))


def mounts(files: DriverFiles, host_root: Path) -> list[dict[str, Any]]:
    """CDI mounts: host path under the host's driver root, the same path from / in the container."""
    return [{"hostPath": str(host_root / rel), "containerPath": str(PurePosixPath("/", rel)), "options": list(MOUNT_OPTIONS)} for rel in files.all]


def ldcache_hook(tool: str, files: DriverFiles) -> dict[str, Any] | None:
    """The createContainer hook that runs ldconfig over the mounted libraries' directories,
    or None when `tool` is not one that can, or there are no libraries."""
    name = PurePosixPath(tool).name
    verb = HOOK_TOOLS.get(name)
    if verb is None or not files.libraries:
        return None
    args = [name, *verb]
    for folder in files.library_dirs:
        args += ["--folder", folder]
    return {"hookName": "createContainer", "path": tool, "args": args}


def describe(files: DriverFiles, root: Path, log: logging.Logger) -> None:
    """One line for what was found, a warning when the driver's libraries are not there."""
    if not any(rel.rsplit("/", 1)[-1].startswith("libcuda.so.") for rel in files.libraries):
        log.warning(
            "driver root %s: no libcuda.so.%s in %s; the CDI spec names device nodes and %d other file(s) only",
            root,
            files.version,
            ", ".join(LIBRARY_DIRS[:4]),
            len(files.all),
        )
    else:
        log.info(
            "driver %s under %s: %d libraries, %d binaries, %d firmware file(s) for the CDI spec",
            files.version,
            root,
            len(files.libraries),
            len(files.binaries),
            len(files.firmware),
        )
