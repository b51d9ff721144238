"""The config follows its file without a signal: an edit in place, a file renamed over it,
and a ConfigMap update (the kubelet swapping the `..data` symlink) are reloaded as SIGHUP
reloads; an invalid file is refused and the running config kept; start-only keys are
logged as needing a restart; a change that leaves the bytes as they were reloads nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import NodedevProcess, nodedev_command
from tests.devtree import dev_tree
from tests.kubelet import KubeletDouble

TUN = "devices.kubevirt.io/tun"
VHOST = "devices.kubevirt.io/vhost-net"


class ConfigMapVolume:
    """A directory laid out as the kubelet lays out a ConfigMap volume, updated the way it updates one."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.updates = 0
        directory.mkdir()

    @property
    def path(self) -> Path:
        return self.directory / "config.yaml"

    def write(self, text: str) -> None:
        self.updates += 1
        payload = self.directory / f"..2026_11_23_13_00_{self.updates:02d}.000000000"
        payload.mkdir()
        (payload / "config.yaml").write_text(text)
        new = self.directory / "..data_tmp"
        new.symlink_to(payload.name)
        old = (self.directory / "..data").resolve() if (self.directory / "..data").exists() else None
        os.rename(new, self.directory / "..data")  # the atomic swap
        if not self.path.is_symlink():
            self.path.symlink_to("..data/config.yaml")
        if old is not None:
            (old / "config.yaml").unlink()
            old.rmdir()


def serve(path: Path) -> NodedevProcess:
    return NodedevProcess(nodedev_command("serve", "--config", str(path), "--log-level", "debug"), env={**os.environ, "PYTHONUNBUFFERED": "1"})


def config(plugin_dir: Path, dev: Path, **drivers: Any) -> str:
    return yaml.safe_dump({"pluginDir": str(plugin_dir), "devRoot": str(dev), "drivers": drivers})


def test_a_configmap_update_is_applied_and_an_invalid_one_refused(kubelet: KubeletDouble, plugin_dir: Path, tmp_path: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun", "vhost-net")
    volume = ConfigMapVolume(tmp_path / "nodedev")
    volume.write(config(plugin_dir, dev, tun={"enabled": True, "shares": 1}))
    process = serve(volume.path)
    try:
        process.wait_log(f"{TUN}: registered")

        mark = process.line_count()
        volume.write(config(plugin_dir, dev, tun={"enabled": True, "shares": 1}, **{"vhost-net": {"enabled": True, "shares": 3}}))
        process.wait_log("changed on disk; reloading it", after=mark)
        process.wait_log("config reloaded", after=mark)
        kubelet.wait(lambda: kubelet.streaming() == {TUN, VHOST}, what="vhost-net served after the update")
        assert kubelet.registration_count(TUN) == 1  # the unchanged driver was left alone

        mark = process.line_count()
        volume.write("drivers: {tun: {enabled: true, shares: '5'}}\n")
        refused = process.wait_log("config reload refused", after=mark)
        assert "drivers.tun.shares" in refused and str(volume.path) in refused
        assert kubelet.streaming() == {TUN, VHOST}

        mark = process.line_count()
        volume.write(config(Path("/tmp/nd-elsewhere"), dev, tun={"enabled": True, "shares": 1}))
        process.wait_log("pluginDir changed; that takes effect at the next start (restart nodedev)", after=mark)
        process.wait_log("config reloaded", after=mark)
        kubelet.wait(lambda: kubelet.streaming() == {TUN}, what="vhost-net dropped")
        assert process.stop() == 0
    finally:
        process.kill()


def test_edits_in_place_and_renames_are_followed_and_a_touch_reloads_nothing(kubelet: KubeletDouble, plugin_dir: Path, tmp_path: Path) -> None:
    dev = dev_tree(tmp_path / "dev", "net/tun", "vhost-net")
    path = tmp_path / "config.yaml"
    path.write_text(config(plugin_dir, dev, tun={"enabled": True}))
    process = serve(path)
    try:
        process.wait_log(f"{TUN}: registered")

        mark = process.line_count()
        path.touch()
        (tmp_path / "unrelated").write_text("x")
        process.wait_log("the file did not; nothing to reload", after=mark)
        with path.open("a") as f:  # a write that changes the bytes, in place
            f.write("# a comment\n")
        process.wait_log("config reloaded", after=mark)
        reloads = process.logs().count("changed on disk")
        assert reloads == 1, process.logs()

        mark = process.line_count()
        replacement = tmp_path / ".config.yaml.swp"
        replacement.write_text(config(plugin_dir, dev, tun={"enabled": True}, **{"vhost-net": {"enabled": True}}))
        os.rename(replacement, path)  # how editors save
        process.wait_log("config reloaded", after=mark)
        kubelet.wait(lambda: kubelet.streaming() == {TUN, VHOST}, what="vhost-net served")
        assert process.logs().count("changed on disk") == 2
    finally:
        process.kill()
