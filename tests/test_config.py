"""Config parsing: defaults, the kubelet's resource-name rules, and errors that name the key."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodedev import config


def test_an_empty_file_means_defaults_and_no_driver() -> None:
    cfg = config.parse("", Path("c.yaml"))

    assert cfg.plugin_dir == Path("/var/lib/kubelet/device-plugins")
    assert (cfg.sysfs_root, cfg.dev_root, cfg.proc_root) == (Path("/sys"), Path("/dev"), Path("/proc"))
    assert (cfg.hotplug.source, cfg.hotplug.resync_seconds) == ("auto", 300.0)
    assert cfg.metrics_address == ""
    assert cfg.drivers == ()


def test_proc_root_and_each_drivers_own_roots_are_read_and_must_be_absolute() -> None:
    """A driver's sysfsRoot/devRoot/procRoot replace the top-level ones for it alone."""
    text = "procRoot: /host/proc\ndrivers:\n  kvm: {enabled: true, devRoot: /sim/dev, sysfsRoot: /sim/sys, procRoot: /sim/proc}\n"

    cfg = config.parse(text, Path("c.yaml"))

    assert cfg.proc_root == Path("/host/proc")
    options = cfg.drivers[0].options
    assert (options.sysfs_root, options.dev_root, options.proc_root) == ("/sim/sys", "/sim/dev", "/sim/proc")

    for key in ("procRoot: proc\n", "drivers:\n  kvm: {procRoot: proc}\n"):
        with pytest.raises(config.ConfigError, match=r"procRoot: must be an absolute path \(starting with /\), got 'proc'$"):
            config.parse(key, Path("c.yaml"))


def test_a_50_mb_file_is_refused_before_it_is_read_as_is_a_directory_or_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    with path.open("wb") as file:
        file.write(b"drivers: {}\n")
        file.truncate(50 * 1024 * 1024)  # sparse: no 50 MB written to the disk

    started = time.perf_counter()
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    took = time.perf_counter() - started

    assert str(caught.value) == f"{path}: file is larger than 1048576 bytes (1 MiB); is this the config file?"
    assert took < 0.1, f"took {took * 1000:.0f} ms"

    with pytest.raises(config.ConfigError) as caught:
        config.load(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read: Is a directory"

    with pytest.raises(config.ConfigError) as caught:
        config.load(tmp_path / "absent.yaml")
    assert str(caught.value) == f"{tmp_path}/absent.yaml: cannot read: No such file or directory"


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A named pipe that a thread fills with 3 MiB of YAML comment, then closes."""
    path = tmp_path / "config.fifo"
    os.mkfifo(path)

    def fill() -> None:
        try:
            with path.open("wb") as pipe:  # blocks until the reader opens
                pipe.write(b"#" * (3 << 20) + b"\n")
        except BrokenPipeError:  # the reader stopped at the limit, as it should
            pass

    writer = threading.Thread(target=fill, daemon=True)
    writer.start()
    yield path
    if writer.is_alive():  # unblock a writer whose reader never came, or stopped early
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
    writer.join(timeout=5)


def test_a_pipe_whose_size_says_nothing_is_read_no_further_than_the_limit(fifo: Path) -> None:
    """A FIFO (or /dev/zero) reports size 0; the read itself is capped too."""
    with pytest.raises(config.ConfigError) as caught:
        config.load(fifo)

    assert str(caught.value) == f"{fifo}: file is larger than 1048576 bytes (1 MiB); is this the config file?"


