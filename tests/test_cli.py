"""The `nodedev` command line: defaults, exit codes, one-line errors, and what it imports."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nodedev import __version__, cli, config
from nodedev.driver import DriverError
from nodedev.drivers.devnodes import VhostNetDriver
from nodedev.inventory import Inventory
from tests.conftest import NodedevProcess, nodedev_command
from tests.devtree import dev_tree
from tests.kubelet import KubeletDouble


@pytest.fixture(autouse=True)
def _root_logger() -> Iterator[None]:
    """main() installs its own log handler on the root logger; give pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def write(tmp_path: Path, settings: dict[str, object]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_version_answers_without_loading_any_commands_libraries() -> None:
    """`--version` and `--help` stay fast: pydantic, YAML, asyncio and gRPC load only when a command runs."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "nodedev", "--version"], capture_output=True, text=True, timeout=30)

    assert (result.returncode, result.stdout) == (0, f"nodedev {__version__}\n")
    loaded = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    heavy = {"pydantic", "yaml", "grpc", "asyncio", "nodedev.config", "nodedev.inventory", "nodedev.hotplug"}
    assert "nodedev.cli" in loaded
    assert loaded & heavy == set()


def test_the_default_config_path_is_the_config_modules() -> None:
    assert cli.DEFAULT_CONFIG == config.DEFAULT_PATH


def test_each_command_has_its_own_default_log_level() -> None:
    """serve says what it does (info); discover and watch print their own output and keep logs to problems."""
    levels = {command: cli._parser().parse_args([command]).log_level for command in ("serve", "discover", "watch")}

    assert levels == {"serve": "info", "discover": "warning", "watch": "warning"}


def test_serve_logs_info_lines_by_default(kubelet: KubeletDouble, plugin_dir: Path, tmp_path: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun")
    path = write(tmp_path, {"pluginDir": str(plugin_dir), "devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 1}}})
    serve = NodedevProcess(nodedev_command("serve", "--config", str(path)), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        serve.wait_log(" INFO ")  # any: at warning (the old default leaking from discover) there are none
        assert serve.stop() == 0
    finally:
        serve.kill()


def test_discover_exits_1_when_a_driver_cannot_start_and_still_prints_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(self: VhostNetDriver) -> None:
        raise DriverError("/dev/vhost-net: cannot open")

    dev = dev_tree(tmp_path / "dev", "net/tun", "vhost-net")
    path = write(tmp_path, {"devRoot": str(dev), "drivers": {"tun": {"enabled": True, "shares": 2}, "vhost-net": {"enabled": True}}})
    assert cli.main(["discover", "--config", str(path)]) == 0

    monkeypatch.setattr(VhostNetDriver, "start", refuse)
    capsys.readouterr()
    assert cli.main(["discover", "--config", str(path)]) == 1

    rows = [line.split(None, 5) for line in capsys.readouterr().out.splitlines()]
    assert [row[:4] for row in rows] == [
        ["DRIVER", "RESOURCE", "DEVICES", "HEALTH"],
        ["tun", "devices.kubevirt.io/tun", "tun0", "Healthy"],
        ["tun", "devices.kubevirt.io/tun", "tun1", "Healthy"],
        ["vhost-net", "-", "-", "FAILED"],
    ]
    assert rows[-1][-1] == "/dev/vhost-net: cannot open"


def test_a_commands_exit_code_is_passed_through_and_an_unexpected_error_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nodedev.daemon import Daemon

    async def environment_problem(self: Daemon) -> int:
        return 1

    monkeypatch.setattr(Daemon, "run", environment_problem)
    assert cli.main(["serve", "--config", str(write(tmp_path, {}))]) == 1
    assert capsys.readouterr().err == ""

    async def broken(self: Inventory, *, hotplug: bool = True) -> None:
        raise RuntimeError("something nobody\nforesaw")

    monkeypatch.setattr(Inventory, "start", broken)
    path = write(tmp_path, {})

    assert cli.main(["discover", "--config", str(path)]) == 1
    assert capsys.readouterr().err == "nodedev: error: RuntimeError: something nobody foresaw\n"

    assert cli.main(["discover", "--config", str(path), "--log-level", "debug"]) == 1
    err = capsys.readouterr().err
    assert "DEBUG   nodedev: unexpected error | Traceback" in err  # the traceback, for whoever asks, on one line
    assert err.endswith("nodedev: error: RuntimeError: something nobody foresaw\n")


def test_an_unknown_simulation_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["discover", "--simulate", "no-such-node"]) == 2

    err = capsys.readouterr().err
    assert err.startswith("nodedev: --simulate: no simulated node 'no-such-node'")
    assert err.count("\n") == 1


def test_simulate_says_what_it_simulates_without_naming_hardware(tmp_path: Path) -> None:
    result = subprocess.run(
        nodedev_command("discover", "--simulate", "gpu-1", "--log-level", "info"), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert [line.split(" nodedev: ")[1] for line in result.stderr.splitlines() if " nodedev: " in line] == ["simulating gpu-1"]


def test_a_config_error_is_exit_2_before_any_driver_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("drivers:\n  tun: {enabled: true}\n  tun: {enabled: false}\n")

    assert cli.main(["discover", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"nodedev: config error: {path}: drivers.tun: duplicate key on line 3 (first on line 2)\n"
