"""Preferred allocation, the NVIDIA driver's pure logic: topology scoring of whole GPUs
and spreading of replicas and MIG devices. No NVML involved."""

from __future__ import annotations

import itertools
import random

import pytest

from nodedev.drivers.nvidia.topology import best_set, spread_pick

# The dgx-8 fixture's layout (src/nodedev/drivers/nvidia/fixtures/dgx-8.conf), written out again
# here so the expected answers do not depend on reading it through NVML.
NVLINKS = {
    (0, 3): 4, (0, 4): 4, (1, 2): 4, (1, 5): 4, (2, 3): 4, (4, 7): 4, (5, 6): 4, (6, 7): 4,
    (0, 1): 2, (0, 2): 2, (1, 3): 2, (2, 6): 2, (3, 7): 2, (4, 5): 2, (4, 6): 2, (5, 7): 2,
}  # fmt: skip
SAME_SWITCH = {(0, 1), (2, 3), (4, 5), (6, 7)}


def dgx_score(a: str, b: str) -> int:
    i, j = sorted((int(a), int(b)))
    pcie = 50 if (i, j) in SAME_SWITCH else 20 if i // 4 == j // 4 else 10
    return pcie + 100 * NVLINKS.get((i, j), 0)


ALL = [str(i) for i in range(8)]


def brute_force(available: list[str], required: list[str], size: int) -> int:
    best = 0
    rest = [a for a in available if a not in required]
    for combo in itertools.combinations(rest, size - len(required)):
        members = required + list(combo)
        best = max(best, sum(dgx_score(a, b) for a, b in itertools.combinations(members, 2)))
    return best


@pytest.mark.parametrize(
    ("available", "required", "size", "expected"),
    [
        (ALL, [], 2, ["2", "3"]),  # 4 NVLinks + same switch; ties with 6-7, first wins
        (ALL, [], 4, ["0", "1", "2", "3"]),
        (ALL, ["4"], 2, ["4", "7"]),
        (ALL, ["0", "5"], 3, ["0", "1", "5"]),
        ([a for a in ALL if a != "3"], [], 1, ["2"]),  # 2's best partner is gone: keep 0-4, 1-5, 6-7 whole
        (["0", "5", "6"], [], 3, ["0", "5", "6"]),
    ],
)
def test_best_set_on_the_dgx8_layout(available: list[str], required: list[str], size: int, expected: list[str]) -> None:
    chosen = best_set(available, required, size, dgx_score)
    assert sorted(chosen) == expected
    assert sum(dgx_score(a, b) for a, b in itertools.combinations(chosen, 2)) == brute_force(available, required, size)


def test_best_set_is_optimal_for_every_size_and_must_include() -> None:
    for size in range(1, 9):
        for required in ([], ["5"], ["1", "6"]):
            if len(required) > size:
                continue
            chosen = best_set(ALL, required, size, dgx_score)
            assert len(chosen) == size and set(required) <= set(chosen)
            score = sum(dgx_score(a, b) for a, b in itertools.combinations(chosen, 2))
            assert score == brute_force(ALL, required, size)


def shuffled(rng: random.Random, ids: list[str]) -> list[str]:
    return rng.sample(ids, len(ids))


def test_best_set_gives_one_answer_whatever_order_the_ids_come_in() -> None:
    """The kubelet lists available IDs in Go map order: a different order every call."""
    rng = random.Random(14)
    for _ in range(300):
        available = rng.sample(ALL, rng.randint(2, 8))
        size = rng.randint(1, len(available))
        required = rng.sample(available, rng.randint(0, min(2, size)))
        answers = {tuple(best_set(shuffled(rng, available), shuffled(rng, required), size, dgx_score)) for _ in range(8)}
        assert len(answers) == 1, (available, required, size, answers)


def test_best_set_ties_go_by_id() -> None:
    rng = random.Random(14)
    for _ in range(50):  # 2-3 and 6-7 score the same; 2-3 has the lower IDs
        assert best_set(shuffled(rng, ALL), [], 2, dgx_score) == ["2", "3"]


def test_greedy_path_gives_one_answer_whatever_order_the_ids_come_in() -> None:
    ids = [f"g{i:02d}" for i in range(24)]

    def flat(a: str, b: str) -> int:  # every set ties: only the IDs decide
        return 10

    rng = random.Random(14)
    answers = {tuple(best_set(shuffled(rng, ids), [], 8, flat)) for _ in range(50)}
    assert answers == {tuple(ids[:8])}


def test_large_pools_use_the_greedy_path_and_keep_cliques_together() -> None:
    # 24 GPUs in three NVLink islands of eight: choose(24, 8) is far above the exact limit.
    ids = [f"g{i:02d}" for i in range(24)]

    def score(a: str, b: str) -> int:
        return 800 if int(a[1:]) // 8 == int(b[1:]) // 8 else 10

    chosen = best_set(ids, ["g09"], 8, score)
    assert sorted(chosen) == ids[8:16]


def group(device_id: str) -> str:
    return device_id.split("::")[0]


def test_distributed_policy_spreads_replicas_over_gpus() -> None:
    available = ["A::1", "A::2", "A::3", "B::0", "B::1", "B::2", "B::3"]  # A::0 is in use
    chosen = spread_pick(available, [], 3, group, {"A": 4, "B": 4}, "distributed", {"A": 0, "B": 1})
    assert chosen == ["B::0", "A::1", "B::1"]


def test_packed_policy_fills_the_busiest_gpu_first() -> None:
    available = ["A::1", "A::2", "A::3", "B::0", "B::1", "B::2", "B::3"]
    chosen = spread_pick(available, [], 3, group, {"A": 4, "B": 4}, "packed", {"A": 0, "B": 1})
    assert chosen == ["A::1", "A::2", "A::3"]


REPLICAS = [f"{g}::{n}" for g in "ABC" for n in range(12)]


@pytest.mark.parametrize("policy", ["distributed", "packed"])
def test_spread_gives_one_answer_whatever_order_the_ids_come_in(policy: str) -> None:
    rng = random.Random(14)
    capacity, order = {g: 12 for g in "ABC"}, {"A": 0, "B": 1, "C": 2}
    for _ in range(300):
        available = rng.sample(REPLICAS, rng.randint(2, len(REPLICAS)))
        size = rng.randint(1, len(available))
        required = rng.sample(available, rng.randint(0, min(2, size)))
        answers = {
            tuple(spread_pick(shuffled(rng, available), shuffled(rng, required), size, group, capacity, policy, order))
            for _ in range(8)
        }
        assert len(answers) == 1, (available, required, size, answers)


def test_spread_takes_the_lowest_replica_number_first() -> None:
    chosen = spread_pick(["A::10", "A::3", "A::2"], [], 2, group, {"A": 12}, "packed", {"A": 0})
    assert chosen == ["A::2", "A::3"]


def test_spread_honours_must_include() -> None:
    available = ["A::0", "A::1", "B::0", "B::1"]
    chosen = spread_pick(available, ["A::1"], 2, group, {"A": 2, "B": 2}, "distributed", {"A": 0, "B": 1})
    assert chosen == ["A::1", "B::0"]
