"""NVIDIA parity (issue 11): every key of NVIDIA's config is taken, NVIDIA's environment
variables win over the file, and the CDI spec is one a container can run with."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodedev import config
from nodedev.driver import HostContext
from nodedev.drivers.nvidia import NvidiaDriver, NvidiaOptions, simulate
from nodedev.drivers.nvidia.allocate import CDI_KIND, CDI_SPEC_FILE
from nodedev.drivers.nvidia.environment import IGNORED, VARIABLES
from tests.conftest import nodedev_command
from tests.test_nvidia_sim import Sim

GPU = "nvidia.com/gpu"
FAST_HEALTH = {"quietPeriodSeconds": 1, "probeIntervalSeconds": 0.2}
ENV_NAMES = (*(name for variable in VARIABLES for name in variable.names), *IGNORED, "DP_DISABLE_HEALTHCHECKS", "DP_ENABLE_HEALTHCHECKS")

pytestmark = pytest.mark.usefixtures("fake_nvml")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test process's own environment must not decide what these tests see."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    """A started driver on a simulated node, configured as `--simulate` does (driver root included)."""
    started: list[NvidiaDriver] = []

    def start(fixture: str, **section: Any) -> Sim:
        node = simulate.prepare(simulate.resolve_fixture(fixture), tmp_path / "node")
        rescans = threading.Event()
        host = HostContext(node.sysfs_root, node.dev_root, node.proc_root, rescans.set, logging.getLogger("test.nvidia"))
        options = NvidiaOptions.model_validate(merged({**node.config_section(), "health": FAST_HEALTH}, section))
        driver = NvidiaDriver(options, host)
        driver.start()
        started.append(driver)
        return Sim(node, driver, rescans)

    yield start
    for driver in started:
        driver.stop()


def parse(section: dict[str, Any]) -> NvidiaOptions:
    cfg = config.parse(yaml.safe_dump({"drivers": {"nvidia": {"enabled": True, **section}}}), Path("/etc/nodedev.yaml"))
    (driver,) = cfg.drivers
    assert isinstance(driver.options, NvidiaOptions)
    return driver.options


# ---------------------------------------------------------------- item 1: every key pastes in

EVERY_KEY = {
    "version": "v1",
    "flags": {
        "migStrategy": "none",
        "failOnInitError": True,
        "nvidiaDriverRoot": "/run/nvidia/driver",
        "nvidiaDevRoot": "/",
        "mpsRoot": "/run/nvidia/mps",
        "gdrcopyEnabled": False,
        "gdsEnabled": False,
        "mofedEnabled": False,
        "useNodeFeatureAPI": False,
        "deviceDiscoveryStrategy": "auto",
        "plugin": {
            "passDeviceSpecs": True,
            "deviceListStrategy": ["envvar"],
            "deviceIDStrategy": "uuid",
            "cdiAnnotationPrefix": "cdi.k8s.io/",
            "nvidiaCTKPath": "/usr/bin/nvidia-ctk",
            "containerDriverRoot": "/driver-root",
            "sharedDevicesAllocationPolicy": "packed",
        },
        "gfd": {
            "oneshot": False,
            "noTimestamp": False,
            "sleepInterval": "60s",
            "outputFile": "/etc/kubernetes/node-feature-discovery/features.d/gfd",
            "machineTypeFile": "/sys/class/dmi/id/product_name",
        },
    },
    "resources": {"gpus": [{"pattern": "*A100*", "name": "a100"}], "mig": [{"pattern": "1g.10gb", "name": "mig-small"}]},
    "sharing": {
        "timeSlicing": {
            "renameByDefault": False,
            "failRequestsGreaterThanOne": False,
            "resources": [{"name": "gpu", "replicas": 4, "rename": "gpu-shared", "devices": [0, 1]}],
        }
    },
    "imex": {"channelIDs": [], "required": False},
}


def test_a_config_with_every_nvidia_key_pastes_in() -> None:
    options = parse(EVERY_KEY)
    assert options.flags.plugin.nvidia_ctk_path == "/usr/bin/nvidia-ctk"
    assert options.flags.plugin.container_driver_root == "/driver-root"
    assert options.flags.mps_root == "/run/nvidia/mps"
    assert options.replicas == {GPU: 4}, "a short name means nvidia.com/, as in NVIDIA's plugin"


def test_short_names_take_nvidia_com_and_clash_with_their_long_form() -> None:
    mixed = parse({"flags": {"migStrategy": "mixed"}, "sharing": {"timeSlicing": {"resources": [{"name": "mig-1g.10gb", "replicas": 2}]}}})
    assert mixed.replicas == {"nvidia.com/mig-1g.10gb": 2}
    with pytest.raises(config.ConfigError, match="nvidia.com/gpu is listed more than once"):
        parse({"sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 2}, {"name": GPU, "replicas": 3}]}}})
    with pytest.raises(config.ConfigError, match="must be gpu or mig-<profile>"):
        parse({"sharing": {"timeSlicing": {"resources": [{"name": "example.com/gpu", "replicas": 2}]}}})


def test_ignored_keys_each_get_one_line_at_start_in_nvidias_words(sim, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "test.nvidia")
    section = {k: v for k, v in EVERY_KEY.items() if k != "flags"}
    sim("gpu-1", flags={"gfd": {"oneshot": True}, "useNodeFeatureAPI": True}, **section)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("GPU Feature Discovery" in line for line in lines) == 1
    assert "Customizing the 'resources' field is not yet supported in the config. Ignoring..." in lines
    assert "Setting the 'rename' field in sharing.timeSlicing.resources is not yet supported in the config. Ignoring..." in lines
    assert "Customizing the 'devices' field in sharing.timeSlicing.resources is not yet supported in the config. Ignoring..." in lines


def test_no_line_for_rename_and_devices_that_change_nothing() -> None:
    options = parse(
        {
            "sharing": {
                "timeSlicing": {"renameByDefault": True, "resources": [{"name": GPU, "replicas": 2, "rename": "nvidia.com/gpu.shared", "devices": "all"}]}
            }
        }
    )
    assert options.ignored() == []


def test_rename_and_devices_have_nvidias_effect_every_gpu_replicated_under_its_own_name(sim) -> None:
    s = sim("dgx-8", sharing={"timeSlicing": {"resources": [{"name": "gpu", "replicas": 2, "rename": "gpu-small", "devices": [0]}]}})
    snapshot = s.scan()
    assert list(snapshot) == [GPU]
    assert len(snapshot[GPU]) == 16


def test_a_resource_without_devices_is_not_reported(sim) -> None:
    """gpu-1 has no MIG: the time-sliced MIG profile of a mixed config has no device, and NVIDIA skips it."""
    s = sim("gpu-1", flags={"migStrategy": "mixed"}, sharing={"timeSlicing": {"resources": [{"name": "mig-1g.10gb", "replicas": 2}]}})
    assert list(s.scan()) == [GPU]


def test_imex_channels_are_still_refused_with_the_reason() -> None:
    with pytest.raises(config.ConfigError, match=r"drivers\.nvidia\.imex\.channelIDs: .*IMEX channels are not supported"):
        parse({"imex": {"channelIDs": [0]}})


# ---------------------------------------------------------------- item 2: environment over file


def test_environment_wins_over_the_file_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIG_STRATEGY", "mixed")
    monkeypatch.setenv("FAIL_ON_INIT_ERROR", "false")
    monkeypatch.setenv("DEVICE_LIST_STRATEGY", "envvar,cdi-cri")
    monkeypatch.setenv("PASS_DEVICE_SPECS", "1")
    monkeypatch.setenv("NVIDIA_CTK_PATH", "/usr/local/bin/nvidia-ctk")
    monkeypatch.setenv("SHARED_DEVICES_ALLOCATION_POLICY", "packed")
    monkeypatch.setenv("DEVICE_ID_STRATEGY", "")  # empty counts as unset, as in NVIDIA's CLI
    options = parse({"flags": {"migStrategy": "single", "plugin": {"deviceIDStrategy": "index"}}})
    assert options.flags.mig_strategy == "mixed"
    assert options.flags.fail_on_init_error is False
    assert options.flags.plugin.device_list_strategies == ("envvar", "cdi-cri")
    assert options.flags.plugin.pass_device_specs is True
    assert options.flags.plugin.nvidia_ctk_path == "/usr/local/bin/nvidia-ctk"
    assert options.flags.plugin.shared_devices_allocation_policy == "packed"
    assert options.flags.plugin.device_id_strategy == "index"
    told = {o.variable: (o.key, o.file_value) for o in options.environment}
    assert told == {
        "MIG_STRATEGY": ("flags.migStrategy", "single"),
        "FAIL_ON_INIT_ERROR": ("flags.failOnInitError", None),
        "DEVICE_LIST_STRATEGY": ("flags.plugin.deviceListStrategy", None),
        "PASS_DEVICE_SPECS": ("flags.plugin.passDeviceSpecs", None),
        "NVIDIA_CTK_PATH": ("flags.plugin.nvidiaCTKPath", None),
        "SHARED_DEVICES_ALLOCATION_POLICY": ("flags.plugin.sharedDevicesAllocationPolicy", None),
    }


def test_the_first_of_two_alias_variables_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NVIDIA_CDI_HOOK_PATH", "/opt/bin/nvidia-cdi-hook")
    monkeypatch.setenv("NVIDIA_CTK_PATH", "/usr/bin/nvidia-ctk")
    monkeypatch.setenv("CONTAINER_DRIVER_ROOT", "/driver-root")
    options = parse({})
    assert options.flags.plugin.nvidia_ctk_path == "/opt/bin/nvidia-cdi-hook"
    assert options.flags.plugin.container_driver_root == "/driver-root"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FAIL_ON_INIT_ERROR", "yes", "environment FAIL_ON_INIT_ERROR='yes': not a boolean"),
        ("MIG_STRATEGY", "auto", "drivers.nvidia.flags.migStrategy"),
        ("NVIDIA_DRIVER_ROOT", "run/nvidia/driver", "drivers.nvidia.flags.nvidiaDriverRoot"),
    ],
)
def test_a_bad_environment_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        parse({})


def test_every_device_reason_names_the_settings_the_environment_decided(sim, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "test.nvidia")
    monkeypatch.setenv("DEVICE_ID_STRATEGY", "index")
    monkeypatch.setenv("PASS_DEVICE_SPECS", "true")
    s = sim("gpu-1", flags={"plugin": {"deviceIDStrategy": "uuid"}})
    (device,) = s.scan()[GPU].values()
    assert "; from the environment: " in device.reason
    assert "DEVICE_ID_STRATEGY=index (flags.plugin.deviceIDStrategy over the file's 'uuid')" in device.reason
    assert "PASS_DEVICE_SPECS=true (flags.plugin.passDeviceSpecs)" in device.reason
    assert s.allocate(GPU, [device.id]).envs["NVIDIA_VISIBLE_DEVICES"] == "0"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("DEVICE_ID_STRATEGY=index" in line and "wins over the config file" in line for line in warned)


@pytest.mark.parametrize(
    ("disable", "enable", "file", "expected"),
    [
        ("all", "", {}, {"enabled": False}),
        ("xids", "", {}, {"enabled": False}),
        ("94,95", "", {}, {"ignored_xids": [13, 31, 43, 45, 68, 109, 94, 95]}),
        ("94", "", {"ignoredXids": [13]}, {"ignored_xids": [13, 94]}),
        ("", "all", {}, {"ignored_xids": []}),
        ("", "68,13", {"criticalXids": [48]}, {"critical_xids": [48, 68, 13], "ignored_xids": [13, 31, 43, 45, 68, 109]}),
    ],
)
def test_nvidias_health_check_variables(monkeypatch: pytest.MonkeyPatch, disable: str, enable: str, file: dict[str, Any], expected: dict[str, Any]) -> None:
    monkeypatch.setenv("DP_DISABLE_HEALTHCHECKS", disable)
    monkeypatch.setenv("DP_ENABLE_HEALTHCHECKS", enable)
    health = parse({"health": file} if file else {}).health
    assert {key: getattr(health, key) for key in expected} == expected


def test_a_bad_xid_list_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DP_DISABLE_HEALTHCHECKS", "94,x")
    with pytest.raises(config.ConfigError, match="DP_DISABLE_HEALTHCHECKS='94,x': want 'all' or a comma list"):
        parse({})


def test_nvidia_variables_without_effect_here_are_each_named_at_start(sim, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "test.nvidia")
    monkeypatch.setenv("IMEX_CHANNEL_IDS", "0,1")
    monkeypatch.setenv("KUBELET_SOCKET", "/var/lib/kubelet/device-plugins/kubelet.sock")
    sim("gpu-1")
    lines = [r.getMessage() for r in caplog.records]
    assert "environment IMEX_CHANNEL_IDS=0,1 ignored: IMEX channels are not supported by nodedev" in lines
    assert any(line.startswith("environment KUBELET_SOCKET=") and "<pluginDir>/kubelet.sock" in line for line in lines)


def test_nodedev_discover_shows_where_a_value_came_from(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "DEVICE_ID_STRATEGY": "index", "HOME": str(tmp_path)}
    result = subprocess.run(nodedev_command("discover", "--simulate", "gpu-1", "--config", "/dev/null"), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("nvidia ")]
    assert "from the environment: DEVICE_ID_STRATEGY=index (flags.plugin.deviceIDStrategy)" in row


# ---------------------------------------------------------------- item 4: a CDI spec a container can run with

CONTAINER_EDIT_KEYS = {"env", "deviceNodes", "hooks", "mounts", "intelRdt", "additionalGids"}
HOOK_NAMES = {"prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"}
DEVICE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.:-]*$")
KIND = re.compile(r"^[a-z0-9][a-z0-9.-]*[a-z0-9]/[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


def check_container_edits(edits: dict[str, Any], where: str) -> list[str]:
    """The CDI schema's containerEdits shape; returns every path the edits name on the host."""
    assert set(edits) <= CONTAINER_EDIT_KEYS, f"{where}: unknown keys {set(edits) - CONTAINER_EDIT_KEYS}"
    paths = []
    for node in edits.get("deviceNodes", []):
        assert set(node) <= {"path", "hostPath", "type", "major", "minor", "fileMode", "permissions", "uid", "gid"}, where
        assert node["path"].startswith("/") and node.get("hostPath", node["path"]).startswith("/"), where
        assert set(node.get("permissions", "")) <= set("rwm"), where
        paths.append(node.get("hostPath", node["path"]))
    for mount in edits.get("mounts", []):
        assert set(mount) <= {"hostPath", "containerPath", "options", "type"}, where
        assert mount["hostPath"].startswith("/") and mount["containerPath"].startswith("/"), where
        assert all(isinstance(o, str) for o in mount.get("options", [])), where
        paths.append(mount["hostPath"])
    for hook in edits.get("hooks", []):
        assert set(hook) <= {"hookName", "path", "args", "env", "timeout"}, where
        assert hook["hookName"] in HOOK_NAMES and hook["path"].startswith("/"), where
        assert all(isinstance(a, str) for a in hook.get("args", [])), where
        paths.append(hook["path"])
    return paths


def check_cdi_spec(spec: dict[str, Any]) -> list[str]:
    """The CDI spec schema (version, kind, device names, containerEdits); returns the host paths named."""
    assert set(spec) <= {"cdiVersion", "kind", "devices", "containerEdits", "annotations"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["cdiVersion"])
    assert KIND.fullmatch(spec["kind"])
    assert spec["devices"], "a spec defines at least one device"
    names = [d["name"] for d in spec["devices"]]
    assert len(names) == len(set(names))
    paths = check_container_edits(spec.get("containerEdits", {}), "spec")
    for device in spec["devices"]:
        assert set(device) <= {"name", "annotations", "containerEdits"} and DEVICE_NAME.fullmatch(device["name"])
        paths += check_container_edits(device["containerEdits"], device["name"])
    return paths


def written_spec(s: Sim) -> dict[str, Any]:
    s.scan()
    return json.loads((Path(s.driver.options.cdi_root) / CDI_SPEC_FILE).read_text())


def test_cdi_spec_is_complete_and_every_path_it_names_exists(sim, tmp_path: Path) -> None:
    ctk = tmp_path / "node" / "usr" / "bin" / "nvidia-ctk"
    s = sim("mig", flags={"migStrategy": "mixed", "plugin": {"deviceListStrategy": "cdi-cri", "nvidiaCTKPath": str(ctk)}})
    assert s.node.ctk == ctk
    spec = written_spec(s)
    assert spec["kind"] == CDI_KIND
    paths = check_cdi_spec(spec)
    missing = [p for p in paths if not Path(p).exists()]
    assert not missing, f"the spec names paths that do not exist: {missing}"
    root, version = s.node.driver_root, s.node.driver_version
    mounts = {m["containerPath"]: m for m in spec["containerEdits"]["mounts"]}
    for wanted in (
        f"/usr/lib/x86_64-linux-gnu/libcuda.so.{version}",
        f"/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.{version}",
        f"/usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.{version}",
        "/usr/bin/nvidia-smi",
        f"/lib/firmware/nvidia/{version}/gsp_ga10x.bin",
    ):
        assert mounts[wanted]["hostPath"] == str(root) + wanted
        assert mounts[wanted]["options"] == ["ro", "nosuid", "nodev", "bind"]
    assert not any(path.endswith(".so.1") for path in mounts), "SONAME links come from the ld cache hook, not mounts"
    (hook,) = spec["containerEdits"]["hooks"]
    assert hook == {
        "hookName": "createContainer",
        "path": str(ctk),
        "args": ["nvidia-ctk", "hook", "update-ldcache", "--folder", "/usr/lib/x86_64-linux-gnu"],
    }
    subprocess.run([hook["path"], *hook["args"][1:]], check=True, timeout=10)  # what the runtime does
    assert ["nvidia-ctk", "hook", "update-ldcache", "--folder", "/usr/lib/x86_64-linux-gnu"] in s.node.calls()
    nodes = {n["path"] for n in spec["containerEdits"]["deviceNodes"]}
    assert {"/dev/nvidiactl", "/dev/nvidia-uvm"} <= nodes


def test_no_ld_cache_hook_without_nvidia_ctk(sim, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "test.nvidia")
    spec = written_spec(sim("gpu-1", flags={"plugin": {"deviceListStrategy": "cdi-annotations"}}))
    assert "hooks" not in spec["containerEdits"] and spec["containerEdits"]["mounts"]
    not_ctk = tmp_path / "node" / "usr" / "bin" / "nvidia-smi"
    spec = written_spec(sim("gpu-1", flags={"plugin": {"deviceListStrategy": "cdi-cri", "nvidiaCTKPath": str(not_ctk)}}))
    assert "hooks" not in spec["containerEdits"]
    assert "not nvidia-ctk or nvidia-cdi-hook" in caplog.text


def test_container_driver_root_is_searched_and_host_paths_name_the_driver_root(sim, tmp_path: Path) -> None:
    node_dir = tmp_path / "node"
    s = sim(
        "gpu-1",
        flags={
            "nvidiaDriverRoot": "/run/nvidia/driver",
            "nvidiaDevRoot": str(node_dir),
            "plugin": {"deviceListStrategy": "cdi-cri", "containerDriverRoot": str(node_dir)},
        },
    )
    mounts = written_spec(s)["containerEdits"]["mounts"]
    libcuda = f"/usr/lib/x86_64-linux-gnu/libcuda.so.{s.node.driver_version}"
    assert {"hostPath": "/run/nvidia/driver" + libcuda, "containerPath": libcuda, "options": ["ro", "nosuid", "nodev", "bind"]} in mounts


def test_a_driver_root_without_libraries_gives_a_warning_and_device_nodes(sim, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "test.nvidia")
    empty = tmp_path / "empty-root"
    empty.mkdir()
    s = sim("gpu-1", flags={"plugin": {"deviceListStrategy": "cdi-cri", "containerDriverRoot": str(empty)}})
    spec = written_spec(s)
    assert "mounts" not in spec["containerEdits"]
    assert "no libcuda.so.550.54.15" in caplog.text
