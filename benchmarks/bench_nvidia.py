"""NVIDIA driver figures for the README (not a test): run `python benchmarks/bench_nvidia.py`.

On the fake NVML's dgx-8 fixture (8 GPUs, NVLink mesh, two NUMA nodes), measures
the driver calls the host makes on its event loop, without gRPC:
- preferred_allocation() over 2000 calls of mixed sizes (1..8), random available
  subsets and must-include IDs, full GPUs (the topology search);
- preferred_allocation() on 8 GPUs x 10 time-sliced replicas (the spread policy);
- one container's answer on 8 GPUs x 10 replicas, requests of 1..4 replica IDs:
  allocate() plus joining the devices' scan-time edits, which is what the host does
  (ContainerEdits.merge), with and without passDeviceSpecs;
- start() (NVML init, discovery, topology read, event thread) and one scan();
- scan() after a GPU left the bus (dropped) or arrived (NVML stopped and initialised
  again, the event thread restarted), told the GPU's PCI address as a uevent does;
- scan() with a cdi-* strategy (the spec with the driver root's files, unchanged).

On a busy 2-core machine the tails (p99, max) move with whatever else runs;
run it a few times.
"""

from __future__ import annotations

import logging
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nodedev.driver import ContainerEdits, Device, HostContext
from nodedev.drivers.nvidia import NvidiaDriver, NvidiaOptions, simulate

CALLS = 2000
GPU = "nvidia.com/gpu"


def driver_on(node: simulate.SimulatedNode, **section: object) -> NvidiaDriver:
    host = HostContext(node.sysfs_root, node.dev_root, node.proc_root, threading.Event().set, logging.getLogger("bench"))
    options = NvidiaOptions.model_validate({"enabled": True, **section})
    return NvidiaDriver(options, host)


def answer(driver: NvidiaDriver, resource: str, devices: list[Device]) -> ContainerEdits:
    """One container's Allocate answer, assembled as the host assembles it."""
    return ContainerEdits.merge((d.edits for d in devices), driver.allocate(resource, devices))


def timed(calls: list[Callable[[], object]]) -> list[float]:
    samples = []
    for call in calls:
        started = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - started) / 1e6)
    return samples


def row(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"| {name} | {len(samples)} | {statistics.median(ordered):.3f} | {p99:.3f} | {ordered[-1]:.3f} |"


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-nvidia-"))
    node = simulate.prepare(simulate.resolve_fixture("dgx-8"), workdir / "node")
    driver = driver_on(node)
    start = timed([driver.start])
    scan = timed([driver.scan])
    driver.stop()
    rows = [row("start() on dgx-8", start), row("scan() on dgx-8", scan)]
    rows += hotplug_rows(node)
    rows += calls_rows(node)
    print("| call | n | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


def calls_rows(node: simulate.SimulatedNode) -> list[str]:
    rng = random.Random(7)
    rows = []
    driver = driver_on(node)
    driver.start()
    driver.scan()
    ids = [g.uuid for g in node.gpus]
    calls: list[Callable[[], object]] = []
    for _ in range(CALLS):
        free = rng.sample(ids, rng.randint(1, 8))
        size = rng.randint(1, len(free))
        must = rng.sample(free, rng.randint(0, min(2, size)))
        calls.append(lambda f=free, m=must, s=size: driver.preferred_allocation(GPU, f, m, s))
    timed(calls[:100])  # warm-up
    rows.append(row("preferred_allocation, 8 GPUs, sizes 1-8", timed(calls)))
    full = [lambda s=s: driver.preferred_allocation(GPU, ids, [], s) for s in (2, 3, 4, 5) for _ in range(CALLS // 4)]
    rows.append(row("preferred_allocation, all 8 free, sizes 2-5", timed(full)))
    driver.stop()

    sliced = {"timeSlicing": {"resources": [{"name": GPU, "replicas": 10}]}}
    shared = driver_on(node, sharing=sliced)
    shared.start()
    devices = list(shared.scan()[GPU])
    replicas = [d.id for d in devices]
    spread = []
    for _ in range(CALLS):
        free = rng.sample(replicas, rng.randint(8, 80))
        size = min(len(free), rng.randint(1, 8))  # drawn here, not inside the timed call
        spread.append(lambda f=free, s=size: shared.preferred_allocation(GPU, f, [], s))
    rows.append(row("preferred_allocation, 8 x 10 replicas", timed(spread)))
    rows.append(row("allocate + merge, 8 x 10 replicas, 1-4 IDs", timed(allocations(shared, devices, rng))))
    shared.stop()

    specs = driver_on(node, sharing=sliced, flags={"plugin": {"passDeviceSpecs": True}})
    specs.start()
    devices = list(specs.scan()[GPU])
    rows.append(row("allocate + merge, passDeviceSpecs, 1-4 IDs", timed(allocations(specs, devices, rng))))
    specs.stop()
    return rows


def hotplug_rows(node: simulate.SimulatedNode, cycles: int = 20) -> list[str]:
    flags = {"nvidiaDriverRoot": str(node.driver_root), "plugin": {"deviceListStrategy": "cdi-cri"}}
    driver = driver_on(node, cdiRoot=str(node.cdi_root), flags=flags)
    driver.start()
    driver.scan()
    cdi = timed([driver.scan for _ in range(cycles)])
    bus = node.gpus[7].sysfs_bus_id
    left, arrived = [], []
    for _ in range(cycles):
        node.unplug(7)
        left += timed([lambda: driver.scan({bus})])
        node.plug(7)
        arrived += timed([lambda: driver.scan({bus})])
    driver.stop()
    return [
        row("scan() with cdi-cri, spec unchanged", cdi),
        row("scan() after a GPU left (dropped; no re-initialisation)", left),
        row("scan() after a GPU arrived (NVML re-initialised; waits out the event thread's 1 s wait)", arrived),
    ]


def allocations(driver: NvidiaDriver, devices: list[Device], rng: random.Random) -> list[Callable[[], object]]:
    """CALLS requests drawn up front (no RNG in the timed call), after a warm-up of 100."""
    requests = [rng.sample(devices, rng.randint(1, 4)) for _ in range(CALLS)]
    calls: list[Callable[[], object]] = [lambda r=r: answer(driver, GPU, r) for r in requests]
    timed(calls[:100])
    return calls


if __name__ == "__main__":
    main()
