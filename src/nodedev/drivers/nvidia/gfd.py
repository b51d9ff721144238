"""Node labels for NVIDIA GPUs, named and valued as GPU Feature Discovery (GFD) makes them.

Made from what a scan found (no NVML call of its own), so `NvidiaDriver.labels()`
only returns them:

- `nvidia.com/gpu.present=true` (the label the GPU operator's NFD rule sets and
  node affinities select on);
- for whole GPUs, GFD's resource labels on `nvidia.com/gpu`: `.product` (NVML's
  name, sanitised as GFD does: `NVIDIA-A100-SXM4-40GB`; `-SHARED` added when
  replicated and not renamed), `.count`, `.memory` (MiB), `.replicas` (1 when not
  shared; 0 on MIG-enabled GPUs, which GFD labels without sharing) and
  `.sharing-strategy` (`none`, `time-slicing` or `mps`). A node with several
  models gets the first whole GPU's model and how many of that model there are
  (GFD picks one of them at random);
- with `migStrategy` single or mixed, `nvidia.com/mig.strategy`; under single the
  `nvidia.com/gpu.*` labels then describe the MIG devices (`.product`
  `<model>-MIG-<profile>`, `.count` MIG devices, `.memory` of one), under mixed
  each `nvidia.com/mig-<profile>` resource served gets the same five labels.

GFD's labels that need what nodedev does not read (CUDA and driver versions,
compute capability, machine type) are not made.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from nodedev.drivers.nvidia.discovery import GPU, Discovery, MigDevice
from nodedev.drivers.nvidia.options import GPU_RESOURCE, NvidiaOptions
from nodedev.drivers.nvidia.resources import mig_resource

PRESENT = "nvidia.com/gpu.present"
MIG_STRATEGY = "nvidia.com/mig.strategy"


def sanitise(text: str) -> str:
    """GFD's: drop all but [A-Za-z0-9-_. ], then join the words with `-`."""
    return "-".join(re.sub(r"[^A-Za-z0-9\-_. ]", "", text).split())


def _resource_labels(resource: str, options: NvidiaOptions | None, count: int, memory_mib: int, *parts: str) -> dict[str, str]:
    """GFD's base labels of one resource; `options` None is GFD's "without sharing" (replicas 0)."""
    replicas = 0 if options is None else options.replicas.get(resource, 1)
    product = [sanitise(p) for p in parts if p]
    strategy = "none"
    if options is not None and replicas > 1:
        strategy = "mps" if options.sharing.mps is not None else "time-slicing"
        if options.shared_name(resource) == resource:  # renamed resources keep the plain product
            product.append("SHARED")
    labels = {
        f"{resource}.product": "-".join(product),
        f"{resource}.count": str(count),
        f"{resource}.replicas": str(replicas),
        f"{resource}.sharing-strategy": strategy,
    }
    if memory_mib:
        labels[f"{resource}.memory"] = str(memory_mib)
    return labels


def _whole_gpu_labels(gpus: Sequence[GPU], options: NvidiaOptions) -> dict[str, str]:
    full = [g for g in gpus if not g.mig_enabled]
    first = (full or list(gpus))[0]
    count = sum(g.name == first.name for g in gpus)
    return _resource_labels(GPU_RESOURCE, options if full else None, count, first.memory_mib, first.name)


def _mig_labels(resource: str, gpu: GPU, mig: MigDevice, count: int, options: NvidiaOptions) -> dict[str, str]:
    return _resource_labels(resource, options, count, mig.memory_mib, gpu.name, "MIG", mig.profile)


def _single(gpus: Sequence[GPU], options: NvidiaOptions) -> dict[str, str]:
    """Only for a layout single accepts (the driver refuses the others before labels are made)."""
    migs = [(gpu, mig) for gpu in gpus if gpu.mig_enabled for mig in gpu.migs]
    if not migs or len({mig.profile for _, mig in migs}) != 1:
        return {}
    gpu, mig = migs[0]
    return _mig_labels(GPU_RESOURCE, gpu, mig, len(migs), options)


def _mixed(gpus: Sequence[GPU], options: NvidiaOptions) -> dict[str, str]:
    by_profile: dict[str, list[tuple[GPU, MigDevice]]] = {}
    for gpu in gpus:
        for mig in gpu.migs if gpu.mig_enabled else ():
            if mig.whole_instance:  # the only profiles mixed serves
                by_profile.setdefault(mig.profile, []).append((gpu, mig))
    labels: dict[str, str] = {}
    for profile, found in by_profile.items():
        gpu, mig = found[0]
        labels.update(_mig_labels(mig_resource(profile), gpu, mig, len(found), options))
    return labels


def node_labels(discovery: Discovery | None, gone: Collection[str], options: NvidiaOptions) -> dict[str, str]:
    """The labels for the GPUs a scan found (`gone`: bus IDs left out); none without GPUs, as GFD."""
    gpus = [g for g in discovery.gpus if g.bus_id not in gone] if discovery is not None else []
    if not gpus:
        return {}
    labels = {PRESENT: "true", **_whole_gpu_labels(gpus, options)}
    strategy = options.flags.mig_strategy
    if strategy != "none":
        labels[MIG_STRATEGY] = strategy
        labels.update(_single(gpus, options) if strategy == "single" else _mixed(gpus, options))
    return labels
