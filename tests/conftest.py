"""Shared fixtures: a kubelet double and the real `nodedev serve` as a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kubelet import KubeletDouble


class NodedevProcess:
    """A running nodedev command, its stderr and stdout collected line by line as they come."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def line_count(self) -> int:
        with self._cond:
            return len(self._lines)

    def logs(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def wait_log(self, text: str, timeout: float = 5.0, after: int = 0) -> str:
        """Waits for an output line containing `text` (from line `after` on); returns it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._lines[after:]:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no log line with {text!r} within {timeout} s; logs:\n" + "\n".join(self._lines))
                self._cond.wait(left)

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def nodedev_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "nodedev", *args]


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake libnvidia-ml.so.1 (built by pip install or `python build.py`), and an
    environment where the NVIDIA simulation's variables are undone after the test."""
    from nodedev.drivers.nvidia import simulate

    library = simulate.fake_library_path()
    if not library.is_file():
        pytest.fail(f"{library} is missing: install nodedev with pip, or run `python build.py` in the checkout")
    monkeypatch.delenv(simulate.ENV_FIXTURE, raising=False)
    monkeypatch.delenv(simulate.ENV_EVENTS, raising=False)
    return library


@pytest.fixture
def plugin_dir() -> Iterator[Path]:
    """Short on purpose: a unix socket path must fit in 107 bytes, and pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="nd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kubelet(plugin_dir: Path) -> Iterator[KubeletDouble]:
    double = KubeletDouble(plugin_dir)
    double.start()
    yield double
    double.stop()


@pytest.fixture
def write_config(tmp_path: Path, plugin_dir: Path) -> Callable[[dict[str, Any]], Path]:
    def write(config: dict[str, Any]) -> Path:
        config = {"pluginDir": str(plugin_dir), **config}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@pytest.fixture
def nodedev(write_config: Callable[[dict[str, Any]], Path]) -> Iterator[Callable[..., NodedevProcess]]:
    started: list[NodedevProcess] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None, args: list[str] | None = None, command: str = "serve") -> NodedevProcess:
        path = write_config(config)
        process = NodedevProcess(
            nodedev_command(command, "--config", str(path), "--log-level", "debug", *(args or [])),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        print(f"--- nodedev log (exit {process.proc.returncode}) ---\n{process.logs()}")  # shown when a test fails
