"""What an operator reads when the real `nodedev serve` starts: a start with thousands of
device IDs logs a summary line per resource, not a line per ID, and says which IDs are
Unhealthy and why (README, "One health model")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.conftest import NodedevProcess
from tests.devtree import dev_tree
from tests.kubelet import KubeletDouble

TUN = "devices.kubevirt.io/tun"
VHOST_NET = "devices.kubevirt.io/vhost-net"
SHARES = 1000
MAX_START_LINES = 15
"""Today about 9: two drivers started, a summary per resource, the Unhealthy tun IDs,
serving, two registrations. Anything near 1000 is a line per ID."""
START_TIMEOUT = 15.0
"""Generous for a loaded 2-core machine; a start takes about 250 ms."""


def registered_line(process: NodedevProcess, resource: str) -> int:
    """The index of the log line saying `resource` is registered with the kubelet."""
    line = process.wait_log(f"{resource}: registered with the kubelet", timeout=START_TIMEOUT)
    return process.logs().split("\n").index(line)


def test_a_start_with_1000_ids_per_resource_logs_a_few_lines_that_say_what_is_unhealthy(
    tmp_path: Path, kubelet: KubeletDouble, nodedev: Callable[..., NodedevProcess]
) -> None:
    dev = dev_tree(tmp_path / "dev", "vhost-net")  # a real char device; net/tun is missing
    section = {"enabled": True, "shares": SHARES}
    process = nodedev(
        {"devRoot": str(dev), "drivers": {"tun": section, "vhost-net": section}},
        args=["--log-level", "info"],  # after the fixture's `--log-level debug`: the later flag wins
    )
    kubelet.wait(lambda: kubelet.streaming() == {TUN, VHOST_NET}, timeout=START_TIMEOUT, what="both resources streaming")
    last = max(registered_line(process, TUN), registered_line(process, VHOST_NET))
    lines = process.logs().split("\n")[: last + 1]
    shown = "\n".join(lines)

    assert not [line for line in lines if " DEBUG " in line], f"--log-level info did not take effect:\n{shown}"
    assert len(lines) <= MAX_START_LINES, f"{len(lines)} lines from start to both registered:\n{shown}"
    summary = f"INFO    nodedev.inventory: {VHOST_NET}: {SHARES} device(s), {SHARES} Healthy"
    assert sum(line.endswith(summary) for line in lines) == 1, f"not one line ending {summary!r}:\n{shown}"
    reason = f"({dev / 'net' / 'tun'} is missing)"
    unhealthy = [line for line in lines if f"{TUN}: " in line and "tun0, tun1" in line and line.endswith(reason)]
    assert len(unhealthy) == 1, f"no one line names tun0.. and why they are Unhealthy ({reason}):\n{shown}"
    assert f"{SHARES} device(s) added Unhealthy" in unhealthy[0] and " WARNING " in unhealthy[0], unhealthy[0]

    tun, vhost = kubelet.devices(TUN), kubelet.devices(VHOST_NET)
    assert tun is not None and vhost is not None
    assert {health for health, _numa in tun.values()} == {"Unhealthy"} and len(tun) == SHARES
    assert {health for health, _numa in vhost.values()} == {"Healthy"} and len(vhost) == SHARES
