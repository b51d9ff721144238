"""deploy/: every overlay's config is one nodedev accepts, its probes point where the
config listens, the GPU pool finds libnvidia-ml.so.1 in a host driver root, and the
systemd unit verifies with an exposure of at most 4.0. (.ci/run also validates every
rendered overlay against the Kubernetes schemas.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodedev import config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
TARGETS = [DEPLOY / "base", *sorted(p for p in (DEPLOY / "overlays").iterdir() if p.is_dir())]
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def render(target: Path) -> list[dict[str, Any]]:
    result = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True, timeout=60, check=True)
    return list(yaml.safe_load_all(result.stdout))


def daemonset_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    return container


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS, ids=lambda p: p.name)
def test_each_rendering_carries_a_valid_config_and_probes_on_its_health_address(target: Path, tmp_path: Path) -> None:
    objects = render(target)
    assert {o["kind"] for o in objects} == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"}
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    loaded = config.load(path)  # raises ConfigError, naming the key, if nodedev would refuse it

    container = daemonset_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert loaded.health_address == f":{ports['health']}"
    assert loaded.metrics_address == f":{ports['metrics']}"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {str(loaded.plugin_dir), "/etc/nodedev", "/dev", "/sys"} <= mounts


def test_deploy_config_yaml_is_the_base_config() -> None:
    assert (DEPLOY / "config.yaml").resolve() == (DEPLOY / "base" / "config.yaml").resolve()
    assert config.load(DEPLOY / "config.yaml").health_address == ":9466"


@needs_kubectl
def test_the_gpu_pools_select_gpu_nodes_and_mount_what_the_nvidia_driver_needs() -> None:
    plain, with_runtime = render(DEPLOY / "overlays" / "gpu-pool"), render(DEPLOY / "overlays" / "gpu-pool-nvidia-runtime")
    for objects in (plain, with_runtime):
        (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
        terms = daemonset["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert {t["matchExpressions"][0]["key"] for t in terms} == {"nvidia.com/gpu.present", "feature.node.kubernetes.io/pci-10de.present"}
        mounts = {m["mountPath"]: m for m in daemonset_container(objects)["volumeMounts"]}
        assert mounts["/driver-root"]["readOnly"] is True and "/var/run/cdi" in mounts
    assert "runtimeClassName" not in [o for o in plain if o["kind"] == "DaemonSet"][0]["spec"]["template"]["spec"]
    assert [o for o in with_runtime if o["kind"] == "DaemonSet"][0]["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"


def find_nvml_command() -> list[str]:
    patch = yaml.safe_load((DEPLOY / "overlays" / "gpu-pool" / "nvidia-driver-root.yaml").read_text())
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    return list(container["command"])


@pytest.mark.parametrize("where", ["usr/lib/x86_64-linux-gnu", "run/nvidia/driver/usr/lib64", "home/kubernetes/bin/nvidia/lib64"])
def test_the_gpu_pool_finds_libnvidia_ml_in_the_host_driver_root_so_nvml_loads_by_its_name(tmp_path: Path, fake_nvml: Path, where: str) -> None:
    library = tmp_path / where / "libnvidia-ml.so.1"
    library.parent.mkdir(parents=True)
    shutil.copy(fake_nvml, library)
    # What pynvml does: CDLL("libnvidia-ml.so.1"), by name, with no library path set.
    load = f"import ctypes; ctypes.CDLL('libnvidia-ml.so.1'); print({str(library)!r} in open('/proc/self/maps').read())"
    shown = subprocess.run(
        [*find_nvml_command(), sys.executable, "-c", load], env={"DRIVER_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30,
    )
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, "True\n", "")


def test_without_a_library_the_gpu_pool_says_so_and_still_starts_nodedev(tmp_path: Path) -> None:
    shown = subprocess.run(
        [*find_nvml_command(), "sh", "-c", 'printf "ran %s" "${LD_PRELOAD:-none}"'], env={"DRIVER_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=10,
    )
    assert shown.returncode == 0 and shown.stdout == "ran none"
    assert f"no libnvidia-ml.so.1 under {tmp_path}" in shown.stderr


def test_the_systemd_unit_is_notify_with_reload_and_restart_on_failure() -> None:
    lines = {line.strip() for line in (DEPLOY / "nodedev.service").read_text().splitlines()}
    assert {"Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure", "ProtectSystem=strict", "UMask=0077"} <= lines
    assert "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6" in lines
    assert "SystemCallFilter=@system-service" in lines


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies_and_its_exposure_is_at_most_4(tmp_path: Path) -> None:
    unit = tmp_path / "nodedev.service"
    unit.write_text((DEPLOY / "nodedev.service").read_text().replace("/usr/local/bin/nodedev", "/bin/true"))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=40", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert security.returncode == 0, security.stdout[-2000:]
    assert "Overall exposure level for nodedev.service: " in security.stdout


def test_the_image_pins_its_base_and_its_runtime_has_no_compiler_or_pip() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.M)
    assert base is not None and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base.group(1)), "base image pinned to a release"
    runtime = text[text.rindex("\nFROM ") :]
    assert "gcc" not in runtime and "pip install" not in runtime
    assert "pip uninstall -y pip" in runtime
    assert "LD_LIBRARY_PATH" not in text and "ldconfig" not in text  # the fake NVML stays off the library path
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignored and ".venv" not in {line.lstrip("!") for line in ignored if line.startswith("!")}
