"""Eviction policies and the capacity-bounded ExpertCache on small hand-made access sequences."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest

from engine.offload import cache as cache_module
from engine.offload.cache import (
    BeladyPolicy,
    ExpertCache,
    Key,
    LFUPolicy,
    LRUPolicy,
    NoVictimError,
    PriorityTable,
    build_cache,
)


def k(expert: int, layer: int = 0) -> Key:
    return (layer, expert, "bf16")


def run(cache: ExpertCache, experts: Sequence[int], layer: int = 0) -> list[Key | None]:
    """Access ``experts`` at ``layer`` in order (one step each); the evicted key of each access."""
    return [cache.access(k(expert, layer), step).evicted for step, expert in enumerate(experts)]


def misses(cache: ExpertCache, experts: Sequence[int]) -> int:
    return sum(not cache.access(k(expert), step).hit for step, expert in enumerate(experts))


# The textbook reference string (Silberschatz, Operating System Concepts) with 3 frames:
# 12 faults under LRU, 9 under the optimal policy.
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def test_lru_evicts_the_least_recently_used() -> None:
    cache = ExpertCache(LRUPolicy(), capacity=2)
    assert run(cache, [1, 2, 1, 3, 2]) == [None, None, None, k(2), k(1)]
    assert k(3) in cache and k(2) in cache and k(1) not in cache and len(cache) == 2


def test_lru_and_belady_on_the_textbook_string() -> None:
    assert misses(ExpertCache(LRUPolicy(), 3), TEXTBOOK) == 12
    assert misses(ExpertCache(BeladyPolicy([k(e) for e in TEXTBOOK]), 3), TEXTBOOK) == 9


def test_lfu_evicts_the_least_frequent_and_breaks_ties_by_recency() -> None:
    cache = ExpertCache(LFUPolicy(), capacity=2)
    # 1 used twice, 2 once: 3 evicts 2 although 1 is older.
    assert run(cache, [1, 1, 2, 3]) == [None, None, None, k(2)]
    # 1 (twice) and 3 (once) resident; 4 evicts 3; then 3 and 4 both once, 1 twice: 5 evicts the older of them.
    cache = ExpertCache(LFUPolicy(), capacity=3)
    assert run(cache, [1, 1, 2, 3, 4, 5]) == [None, None, None, None, k(2), k(3)]


def test_lfu_frequencies_survive_eviction() -> None:
    cache = ExpertCache(LFUPolicy(), capacity=2)
    # 1 (3 uses) loses to 2 (4 uses) when 3 arrives; 1 comes back with 4 uses, evicting 3 (1 use); then 5 finds
    # 1 and 2 tied at 4 and evicts 2, the less recent. Had 1's count restarted at eviction, 5 would evict 1.
    evicted = run(cache, [1, 1, 1, 2, 2, 2, 2, 3, 1, 5])
    assert evicted[7:] == [k(1), k(3), k(2)]


def test_belady_matches_an_exhaustive_optimum_on_random_sequences() -> None:
    rng = random.Random(7)
    for _ in range(40):
        experts = [rng.randrange(5) for _ in range(14)]
        capacity = rng.choice([1, 2, 3])
        cache = ExpertCache(BeladyPolicy([k(e) for e in experts]), capacity)
        assert misses(cache, experts) == _optimal_misses(experts, capacity)


def _optimal_misses(experts: Sequence[int], capacity: int) -> int:
    """Fewest demand misses over every possible eviction choice (exhaustive over cache contents)."""
    best: dict[frozenset[int], int] = {frozenset(): 0}
    for expert in experts:
        after: dict[frozenset[int], int] = {}
        for content, count in best.items():
            if expert in content:
                options = [(content, count)]
            elif len(content) < capacity:
                options = [(content | {expert}, count + 1)]
            else:
                options = [((content - {out}) | {expert}, count + 1) for out in content]
            for state, total in options:
                after[state] = min(total, after.get(state, total))
        best = after
    return min(best.values())


def test_belady_refuses_an_access_off_its_future() -> None:
    cache = ExpertCache(BeladyPolicy([k(1), k(2)]), capacity=1)
    cache.access(k(1), 0)
    with pytest.raises(ValueError, match=r"access 1 is \(0, 3, 'bf16'\), but the known future has \(0, 2"):
        cache.access(k(3), 1)


@pytest.mark.parametrize("make", [LRUPolicy, LFUPolicy, lambda: BeladyPolicy([k(e) for e in [1, 2, 3, 1, 4, 2]])])
def test_a_pinned_key_is_never_the_victim(make) -> None:
    cache = ExpertCache(make(), capacity=2)
    cache.policy.pin(k(1))
    # LRU/LFU would evict 1 at the access of 3 (oldest / tied and older), Belady at 4 (used again never).
    assert k(1) not in run(cache, [1, 2, 3, 1, 4, 2])
    assert k(1) in cache


def test_a_full_partition_of_pinned_keys_refuses_a_miss_and_stays_unchanged() -> None:
    cache = ExpertCache(LRUPolicy(), capacity=2)
    run(cache, [1, 2])
    for expert in (1, 2, 1):
        cache.policy.pin(k(expert))
    with pytest.raises(NoVictimError):
        cache.access(k(3), 2)
    assert k(3) not in cache and len(cache) == 2
    cache.policy.unpin(k(2))
    assert cache.access(k(3), 3).evicted == k(2)
    cache.policy.unpin(k(1))
    # 1 was pinned twice: still pinned after one unpin.
    assert cache.access(k(4), 4).evicted == k(3)
    cache.policy.unpin(k(1))
    with pytest.raises(ValueError, match="not pinned"):
        cache.policy.unpin(k(1))


def test_priorities_come_before_the_policy_rule_and_can_be_cleared() -> None:
    cache = ExpertCache(LRUPolicy(), capacity=2)
    run(cache, [1, 2])
    cache.policy.set_priorities({k(1): 1.0})
    assert cache.access(k(3), 2).evicted == k(2)
    cache.policy.set_priorities({})
    assert cache.access(k(4), 3).evicted == k(1)


@pytest.mark.parametrize("make", [LRUPolicy, LFUPolicy])
def test_victim_of_all_under_a_priority_table_is_the_scans_victim(make, monkeypatch: pytest.MonkeyPatch) -> None:
    """A global cache's victim under a `PriorityTable` (numpy over the policy's slots, here at every size) is the
    one the plain scan over the resident keys picks: through admissions, evictions, nested pins, tied priorities,
    keys of another precision (absent from the table: 0.0) and cleared priorities."""
    monkeypatch.setattr(cache_module, "VECTOR_VICTIM_KEYS", 0)
    rng = random.Random(7)
    compared = 0
    for _ in range(60):
        layers, experts = rng.randint(1, 5), rng.randint(1, 8)
        policy = make()
        cache = ExpertCache(policy, capacity=rng.randint(1, layers * experts), scope="global")
        for step in range(200):
            key = (rng.randrange(layers), rng.randrange(experts), rng.choice(["bf16", "bf16", "int8"]))
            if rng.random() < 0.1:
                values = [[rng.choice([0.1, 0.2, rng.random()]) for _ in range(experts)] for _ in range(layers)]
                policy.set_priorities(PriorityTable(np.array(values), "bf16") if rng.random() < 0.8 else {})
            if rng.random() < 0.1:
                policy.pin(key)
            elif key in policy._pins and rng.random() < 0.3:
                policy.unpin(key)
            if len(cache) >= cache.capacity and key not in cache:
                try:
                    fast = policy.victim_of_all()
                except NoVictimError:
                    fast = None
                try:
                    scanned = policy.victim(set(policy._resident))
                except NoVictimError:
                    scanned = None
                assert fast == scanned
                compared += 1
                if fast is None:
                    continue
            cache.access(key, step)
    assert compared > 1000


def test_per_layer_scope_evicts_within_the_layer_global_scope_across_layers() -> None:
    per_layer = ExpertCache(LRUPolicy(), capacity=1, scope="layer")
    assert [per_layer.access(key, 0).evicted for key in (k(1, 0), k(1, 1), k(2, 1))] == [None, None, k(1, 1)]
    assert k(1, 0) in per_layer

    shared = ExpertCache(LRUPolicy(), capacity=2, scope="global")
    assert [shared.access(key, 0).evicted for key in (k(1, 0), k(1, 1), k(2, 1))] == [None, None, k(1, 0)]


def test_one_belady_object_serves_all_layers_of_a_per_layer_cache() -> None:
    future = [k(1, 0), k(2, 0), k(7, 1), k(3, 0), k(1, 0), k(7, 1)]
    cache = ExpertCache(BeladyPolicy(future), capacity=2, scope="layer")
    assert [cache.access(key, step).hit for step, key in enumerate(future)] == [False] * 4 + [True, True]
    assert k(2, 0) not in cache


def test_build_cache_names_and_errors() -> None:
    assert isinstance(build_cache("global-lfu", 8).policy, LFUPolicy)
    assert build_cache("global-lfu", 8).scope == "global" and build_cache("lru", 2).scope == "layer"
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'"):
        build_cache("fifo", 2)
    with pytest.raises(ValueError, match="needs the future access sequence"):
        build_cache("belady", 2)
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        build_cache("lru", 0)
