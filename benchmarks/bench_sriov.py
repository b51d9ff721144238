"""SR-IOV figures for the README (not a test): run `python benchmarks/bench_sriov.py` as root.

Builds a fixture tree of 16 PFs x 256 VFs (4,096 VFs, all on iavf with their
interfaces) with `nodedev.drivers.sysfs_tree`, runs the real `nodedev serve`
(driver `sriov`, two resources: `drivers: [iavf]` and `drivers: [vfio-pci]`)
against the kubelet double in tests/kubelet.py, and measures:

- start: process spawned -> the kubelet double holds the full list of 4,096. Target 1 s.
- RSS of the daemon once the full list is out. Target 80 MB.
- a burst: 256 VFs rebound to vfio-pci back to back, without waiting, until the
  kubelet double lists them all under the new resource.
- one VF's driver change (iavf -> vfio-pci, then back), from the start of the
  rebind in the tree (the `driver` links replaced, the interface removed or
  added) until the lists showing the VF under its new resource and gone from
  the old one came off the kubelet double's ListAndWatch streams. Target 50 ms.
  The same is shown once the double has also turned both lists into Python
  dicts, which for 4,096 devices takes it longer than the kubelet's Go does.

The fixture tree reaches the daemon as inotify events, which name what changed
as a uevent would (the function in `drivers/<name>/`, the interface in
`class/net`), so each change reads one VF and its PF, not 4,096 functions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from nodedev.drivers.sysfs_tree import SysfsTree  # noqa: E402
from tests.kubelet import KubeletDouble  # noqa: E402

NET = "intel.com/bench_net"
DPDK = "intel.com/bench_dpdk"


def build(root: Path, pfs: int, vfs: int) -> tuple[SysfsTree, list[str]]:
    tree = SysfsTree(root)
    made: list[str] = []
    for p in range(pfs):
        pf = f"0000:{0x10 + 2 * p:02x}:00.0"
        tree.add_pci(pf, driver="ice", total_vfs=vfs, netdev=f"ens{p}f0", numa_node=p % 2)
        made += tree.set_numvfs(pf, vfs)
    return tree, made


def config(tree: SysfsTree, plugin_dir: Path, work: Path) -> Path:
    section = {
        "enabled": True,
        "sysfsRoot": str(tree.sys),
        "devRoot": str(tree.dev),
        "procRoot": str(tree.proc),
        "deviceInfoDir": str(work / "devinfo"),
        "resourceList": [
            {"resourceName": "bench_net", "selectors": {"drivers": ["iavf"]}},
            {"resourceName": "bench_dpdk", "selectors": {"drivers": ["vfio-pci"]}},
        ],
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump({"pluginDir": str(plugin_dir), "hotplug": {"resyncSeconds": 0}, "drivers": {"sriov": section}}))
    return path


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pfs", type=int, default=16)
    parser.add_argument("--vfs", type=int, default=256)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--burst", type=int, default=256, help="VFs rebound back to back, without waiting")
    args = parser.parse_args()
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="bench-sriov-", dir=shm if shm.is_dir() else None))
    plugin_dir = Path(tempfile.mkdtemp(prefix="nd-", dir="/tmp"))
    kubelet = KubeletDouble(plugin_dir)
    proc: subprocess.Popen[bytes] | None = None
    try:
        tree, vfs = build(work / "node", args.pfs, args.vfs)
        total = len(vfs)
        cfg = config(tree, plugin_dir, work)
        kubelet.start()
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "nodedev", "serve", "--config", str(cfg)], stderr=subprocess.DEVNULL, env={**os.environ})
        kubelet.wait(lambda: len(kubelet.devices(NET) or {}) == total, timeout=60, what=f"{total} devices")
        start_s = time.perf_counter() - started
        rss = rss_mib(proc.pid)
        took: list[float] = []
        seen: list[float] = []
        for i in range(args.changes):
            vf = vfs[(i * 97) % total]
            for driver, there, gone in (("vfio-pci", DPDK, NET), ("iavf", NET, DPDK)):
                t0 = time.perf_counter()
                tree.bind(vf, driver)
                kubelet.wait(
                    lambda vf=vf, there=there, gone=gone: vf in (kubelet.devices(there) or {}) and vf not in (kubelet.devices(gone) or {}),
                    timeout=10,
                    what=f"{vf} under {there}",
                )
                seen.append((time.perf_counter() - t0) * 1000)
                came = next(at for at, view in kubelet.timed_updates(there) if at >= t0 and vf in view)
                left = next(at for at, view in kubelet.timed_updates(gone) if at >= t0 and vf not in view)
                took.append((max(came, left) - t0) * 1000)
        burst = vfs[1 :: total // args.burst][: args.burst]
        t0 = time.perf_counter()
        for vf in burst:
            tree.bind(vf, "vfio-pci")
        kubelet.wait(lambda: set(burst) <= set(kubelet.devices(DPDK) or {}), timeout=30, what=f"{len(burst)} VFs under {DPDK}")
        burst_ms = (time.perf_counter() - t0) * 1000
        print(f"| start -> full list of {total} VFs at the kubelet | {start_s * 1000:.0f} ms | <= 1 s |")
        p50, p99 = statistics.median(took), pct(took, 0.99)
        print(f"| one VF's driver change -> both lists at the kubelet's socket, p50 / p99 (n={len(took)}) | {p50:.1f} ms / {p99:.1f} ms | <= 50 ms |")
        p50, p99 = statistics.median(seen), pct(seen, 0.99)
        print(f"| the same, once the Python kubelet double has decoded both | {p50:.1f} ms / {p99:.1f} ms | |")
        print(f"| {len(burst)} VFs rebound back to back -> all of them under {DPDK} at the kubelet | {burst_ms:.0f} ms | |")
        print(f"| RSS with {total} devices | {rss:.1f} MiB | <= 80 MB |")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        kubelet.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(plugin_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
