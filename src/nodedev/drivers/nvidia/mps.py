"""MPS sharing: the driver runs NVIDIA's own MPS control daemon, as NVIDIA's plugin and
its mps-control-daemon do together.

For the shared resource the driver sets the GPUs' compute mode to
EXCLUSIVE_PROCESS (`nvidia-smi -c`), starts `nvidia-cuda-mps-control -d` (the
driver's tool, found under the driver root) with its pipe and log directories
under `mpsRoot/<resource>/`, then tells it each GPU's default pinned-memory
limit (total / replicas, in MiB) and the default active thread percentage
(100 / replicas). Allocate points containers at the same directories (see
`allocate.mps_edits`). Every scan asks the daemon a question through its pipe;
a daemon that does not answer is started again, and until it answers the
shared devices are Unhealthy with the reason.

Every command has a timeout: a hung control daemon cannot stall a scan for long.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodedev.drivers.nvidia import driverroot
from nodedev.drivers.nvidia.allocate import mps_dirs
from nodedev.drivers.nvidia.discovery import GPU

CONTROL = "nvidia-cuda-mps-control"
SMI = "nvidia-smi"
COMMAND_TIMEOUT_S = 10.0


class MpsError(Exception):
    """The control daemon cannot be started or told its limits; the message says which step."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What the control daemon is told, from the GPUs and the replica count."""

    pinned_mib: Mapping[int, int]
    """GPU index -> default pinned device memory limit in MiB."""
    thread_percentage: int

    @classmethod
    def of(cls, memory_mib: Mapping[int, int], replicas: int) -> Limits:
        return cls({index: total // replicas for index, total in memory_mib.items() if total}, 100 // replicas)

    def commands(self) -> list[str]:
        lines = [f"set_default_device_pinned_mem_limit {index} {mib}M" for index, mib in sorted(self.pinned_mib.items())]
        return [*lines, f"set_default_active_thread_percentage {self.thread_percentage}"]


class ControlDaemon:
    """One resource's MPS control daemon. Not thread-safe: the driver calls it from scan() only."""

    def __init__(self, driver_root: Path, mps_root: str, resource: str, log: logging.Logger) -> None:
        self.driver_root = driver_root
        self.pipe_dir, self.log_dir = (Path(p) for p in mps_dirs(mps_root, resource))
        self.resource = resource
        self.log = log
        self.limits: Limits | None = None
        self.uuids: tuple[str, ...] = ()

    def _tool(self, name: str) -> str:
        found = driverroot.find_binary(self.driver_root, name)
        if found is None:
            raise MpsError(f"{name} not found under the driver root {self.driver_root} ({', '.join(driverroot.BINARY_DIRS)})")
        return str(found)

    @property
    def environment(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def _run(self, args: Sequence[str], stdin: str | None = None) -> str:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.environment}
        try:
            done = subprocess.run(args, input=stdin, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise MpsError(f"{' '.join(args)}: {err}") from None
        if done.returncode != 0:
            raise MpsError(f"{' '.join(args)} exited {done.returncode}: {(done.stderr or done.stdout).strip()[:200]}")
        return done.stdout

    def tell(self, command: str) -> str:
        """One command through the control pipe, as `echo <command> | nvidia-cuda-mps-control`."""
        return self._run([self._tool(CONTROL)], stdin=command + "\n")

    def healthy(self) -> bool:
        try:
            self.tell("get_default_active_thread_percentage")
        except MpsError:
            return False
        return True

    def start(self, uuids: Sequence[str], limits: Limits) -> None:
        """Compute mode, directories, the daemon, then its limits (NVIDIA's order)."""
        smi = self._tool(SMI)
        for uuid in uuids:
            self._run([smi, "-i", uuid, "-c", "EXCLUSIVE_PROCESS"])
        for directory in (self.pipe_dir, self.log_dir):
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise MpsError(f"cannot create {directory}: {err.strerror or err}") from None
        self._run([self._tool(CONTROL), "-d"])
        for command in limits.commands():
            self.tell(command)
        self.limits, self.uuids = limits, tuple(uuids)
        self.log.info("MPS control daemon for %s started: pipe %s, %s", self.resource, self.pipe_dir, "; ".join(limits.commands()))

    def ensure(self, uuids: Sequence[str], limits: Limits) -> None:
        """Started, answering, and told the limits of these GPUs; raises MpsError saying why not."""
        if self.limits is not None and self.healthy():
            if (limits, tuple(uuids)) == (self.limits, self.uuids):
                return
            self.stop()
        elif self.limits is not None:
            self.log.warning("MPS control daemon for %s does not answer; starting it again", self.resource)
        self.limits = None
        self.start(uuids, limits)

    def supervise(self, gpus: Sequence[GPU], replicas: int) -> str | None:
        """`ensure` for the GPUs the shared resource's replicas are on; None, or why the
        daemon is not running (the shared devices' reason). No GPU: nothing to share yet."""
        by_uuid = {gpu.uuid: gpu for gpu in gpus}
        if not by_uuid:
            return None
        try:
            self.ensure(list(by_uuid), Limits.of({gpu.index: gpu.memory_mib for gpu in by_uuid.values()}, replicas))
        except MpsError as err:
            return f"MPS control daemon not running: {err}"
        return None

    def stop(self) -> None:
        if self.limits is None:
            return
        self.limits = None
        try:
            self.tell("quit")
            smi = self._tool(SMI)
            for uuid in self.uuids:
                self._run([smi, "-i", uuid, "-c", "DEFAULT"])
        except MpsError as err:
            self.log.warning("stopping the MPS control daemon for %s: %s", self.resource, err)
