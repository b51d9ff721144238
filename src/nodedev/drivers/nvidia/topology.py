"""GetPreferredAllocation: which GPUs to hand out together.

Pair scores follow NVIDIA's go-gpuallocator table (PCIe common ancestor points
plus 100 per NVLink). NVIDIA enumerates every partition of the free GPUs, which
took seconds to tens of seconds on 8 GPUs (their issue #774). Here the set is
chosen directly: the highest-scoring set that contains the must-include IDs,
ties broken by the weakest ties to the GPUs left behind (so a 1-GPU request
takes the GPU whose NVLink partner is already gone rather than splitting a pair),
then by ID. The kubelet lists the available IDs in no particular order (it walks
a Go map), so every input is put in ID order first: the same free GPUs always
give the same answer.
For up to a few thousand candidate sets this is exact; beyond that, greedy
growth plus pairwise swaps. NVML is read once per GPU set, never per call.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodedev.drivers.nvidia.discovery import GPU, normalize_bus_id
from nodedev.drivers.nvidia.resources import REPLICA_SEPARATOR

NVLINK_POINTS = 100
LEVEL_POINTS: dict[int, int] = {
    0: 60,  # NVML_TOPOLOGY_INTERNAL: same board
    10: 50,  # SINGLE: one PCIe switch
    20: 40,  # MULTIPLE: several switches
    30: 30,  # HOSTBRIDGE
    40: 20,  # NODE: same CPU
    50: 10,  # SYSTEM: across CPUs
}
EXACT_LIMIT = 5000
"""Candidate sets searched exhaustively; beyond this, greedy + local swaps."""


@dataclass(frozen=True, slots=True)
class Link:
    nvlinks: int
    level: int | None

    @property
    def score(self) -> int:
        return NVLINK_POINTS * self.nvlinks + (LEVEL_POINTS.get(self.level, 0) if self.level is not None else 0)


@dataclass(frozen=True, slots=True)
class Topology:
    """Pair scores between GPUs by UUID; a pair never measured scores 0."""

    links: Mapping[frozenset[str], Link]

    def score(self, a: str, b: str) -> int:
        link = self.links.get(frozenset((a, b)))
        return link.score if link else 0


EMPTY = Topology(links={})

@functools.lru_cache(maxsize=1 << 14)
def id_order(device_id: str) -> tuple[str, int, str]:
    """Sort key for device IDs: by GPU or MIG UUID, then replicas of one device by number
    (`<uuid>::2` before `<uuid>::10`); the ID itself settles anything left equal.
    Cached: a node has a few thousand IDs at most, and every preferred allocation sorts them."""
    physical, separator, replica = device_id.partition(REPLICA_SEPARATOR)
    number = int(replica) if separator and replica.isdigit() else -1
    return physical, number, device_id


def in_id_order(ids: Sequence[str]) -> list[str]:
    """Distinct IDs, sorted by `id_order`."""
    return sorted(set(ids), key=id_order)


def _nvlink_peers(nvml: Any, handle: Any, max_links: int) -> Counter[str]:
    """Bus IDs at the far end of each active NVLink of one GPU, counted."""
    peers: Counter[str] = Counter()
    for link in range(max_links):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) != nvml.NVML_FEATURE_ENABLED:
                continue
            remote = nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link)
        except nvml.NVMLError:
            continue
        peers[normalize_bus_id(remote.busId)] += 1
    return peers


def read_topology(nvml: Any, gpus: Sequence[GPU], handles: Mapping[str, Any]) -> Topology:
    """NVLink counts and PCIe levels for every pair; NVML errors just leave a part out."""
    readable = [g for g in gpus if g.uuid in handles]
    max_links = int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 36))
    peers = {g.uuid: _nvlink_peers(nvml, handles[g.uuid], max_links) for g in readable}
    links: dict[frozenset[str], Link] = {}
    for a, b in itertools.combinations(readable, 2):
        nvlinks = max(peers[a.uuid][b.bus_id], peers[b.uuid][a.bus_id])
        try:
            level: int | None = int(nvml.nvmlDeviceGetTopologyCommonAncestor(handles[a.uuid], handles[b.uuid]))
        except nvml.NVMLError:
            level = None
        links[frozenset((a.uuid, b.uuid))] = Link(nvlinks=nvlinks, level=level)
    return Topology(links=links)


def best_set(
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    score: Callable[[str, str], int],
) -> list[str]:
    """The `size` IDs out of `available` (plus `must_include`) with the highest pair-score sum.

    Ties go to the set with the least score towards the available IDs left out,
    then to the lowest IDs; the order of the inputs makes no difference.
    """
    required = in_id_order(must_include)
    if len(required) >= size:
        return required[:size]
    taken = set(required)
    pool = required + [i for i in in_id_order(available) if i not in taken]
    if len(pool) <= size:
        return pool
    n = len(pool)
    matrix = [[0 if i == j else score(pool[i], pool[j]) for j in range(n)] for i in range(n)]
    row_sums = [sum(row) for row in matrix]
    fixed = list(range(len(required)))
    free = list(range(len(required), n))
    need = size - len(fixed)
    if math.comb(len(free), need) <= EXACT_LIMIT:
        chosen = _exact(matrix, row_sums, fixed, free, need)
    else:
        chosen = _greedy(matrix, row_sums, fixed, free, need)
    return [pool[i] for i in sorted(chosen)]


def _key(matrix: list[list[int]], row_sums: list[int], members: Sequence[int]) -> tuple[int, int]:
    inside = sum(matrix[a][b] for a, b in itertools.combinations(members, 2))
    cut = sum(row_sums[m] for m in members) - 2 * inside
    return inside, -cut


def _exact(matrix: list[list[int]], row_sums: list[int], fixed: list[int], free: list[int], need: int) -> list[int]:
    """All combinations of the free IDs; the fixed part's contribution is computed once."""
    base_inside = sum(matrix[a][b] for a, b in itertools.combinations(fixed, 2))
    base_rows = sum(row_sums[m] for m in fixed)
    to_fixed = {f: sum(matrix[f][m] for m in fixed) for f in free}
    best: tuple[int, int] | None = None
    best_combo: tuple[int, ...] = ()
    for combo in itertools.combinations(free, need):
        inside = base_inside + sum(to_fixed[c] for c in combo)
        for i, a in enumerate(combo):
            row = matrix[a]
            for b in combo[i + 1 :]:
                inside += row[b]
        cut = base_rows + sum(row_sums[c] for c in combo) - 2 * inside
        key = (inside, -cut)
        if best is None or key > best:
            best, best_combo = key, combo
    return fixed + list(best_combo)


def _greedy(matrix: list[list[int]], row_sums: list[int], fixed: list[int], free: list[int], need: int) -> list[int]:
    """Grow by the best gain, then swap members for outsiders while that improves the set."""
    chosen = list(fixed)
    rest = list(free)
    for _ in range(need):
        pick = max(rest, key=lambda c: (sum(matrix[c][m] for m in chosen), -row_sums[c], -c))
        chosen.append(pick)
        rest.remove(pick)
    current = _key(matrix, row_sums, chosen)
    improved = True
    while improved:
        improved = False
        for i in range(len(fixed), len(chosen)):
            for j, outsider in enumerate(rest):
                trial = chosen[:i] + [outsider] + chosen[i + 1 :]
                key = _key(matrix, row_sums, trial)
                if key > current:
                    rest[j], chosen[i], current, improved = chosen[i], outsider, key, True
    return chosen


def spread_pick(
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    group_of: Callable[[str], str],
    capacity: Mapping[str, int],
    policy: str,
    group_order: Mapping[str, int],
) -> list[str]:
    """Replicas (and MIG devices): choose by how busy each physical GPU already is.

    `distributed` takes from the GPU with the fewest units in use, `packed` from the
    one with the most that still has some free; ties go to the GPU picked least in
    this request, then to GPU order. Within a GPU the lowest free ID goes first, so
    the order of `available` makes no difference.
    """
    chosen = in_id_order(must_include)[:size]
    taken = set(chosen)
    free: dict[str, list[str]] = {}
    for device_id in in_id_order(available):
        if device_id not in taken:
            free.setdefault(group_of(device_id), []).append(device_id)
    in_use = {group: capacity.get(group, len(ids)) - len(ids) for group, ids in free.items()}
    picked: Counter[str] = Counter(group_of(i) for i in chosen)
    sign = 1 if policy == "distributed" else -1
    while len(chosen) < size and free:
        group = min(free, key=lambda g: (sign * in_use[g], picked[g], group_order.get(g, 1 << 30), g))
        chosen.append(free[group].pop(0))
        picked[group] += 1
        in_use[group] += 1
        if not free[group]:
            del free[group]
    return chosen
