"""The prefetch plan: predictions become the policy's priorities and prefetches of likely, non-resident keys."""

from __future__ import annotations

from engine.offload.cache import ExpertCache, LRUPolicy
from engine.offload.prefetch import PrefetchQueue
from engine.trace.planner import PrefetchPlanner, PrefetchSettings

LAYERS, EXPERTS, BLOB = 4, 4, 10
SETTINGS = PrefetchSettings(min_probability=0.5, horizon=2)


def planner(layers=None, capacity: int = 8) -> PrefetchPlanner:
    cache = ExpertCache(LRUPolicy(), capacity, scope="global")
    queue = PrefetchQueue(cache, BLOB, 100 * BLOB)
    return PrefetchPlanner(cache, queue, LAYERS, SETTINGS, "native", layers)


def prediction(likely: dict[int, int]) -> list[list[float]]:
    """[L][E]: expert ``likely[layer]`` at 0.9, every other at 0.1."""
    return [[0.9 if likely.get(layer) == expert else 0.1 for expert in range(EXPERTS)] for layer in range(LAYERS)]


def started(plan: PrefetchPlanner) -> list[tuple]:
    keys = []
    while (load := plan.queue.next_load()) is not None:
        keys.append(load.key)
    return keys


def test_likely_keys_of_the_next_layers_are_prefetched_and_priorities_set() -> None:
    plan = planner()
    queued = plan.plan([prediction({1: 2, 2: 3, 3: 1})], layers_seen=1, position=8)
    assert queued == 2, "horizon 2 from frontier 1: layers 1 and 2 only"
    assert started(plan) == [(1, 2, "native"), (2, 3, "native")], "the sooner layer first (higher priority)"
    policy = plan.cache.policy
    assert policy.priority((1, 2, "native")) > policy.priority((2, 3, "native")) > policy.priority((1, 0, "native"))
    assert policy.priority((0, 0, "native")) < policy.priority((3, 0, "native")), "layer 0 is visited last"


def test_resident_keys_and_layers_without_experts_are_not_queued() -> None:
    plan = planner(layers={2})
    plan.cache.access((2, 3, "native"), step=0)
    assert plan.plan([prediction({1: 2, 2: 3})], layers_seen=1, position=8) == 0
    assert started(plan) == []


def test_the_batch_counts_a_key_any_request_is_likely_to_use() -> None:
    plan = planner()
    queued = plan.plan([prediction({1: 0}), prediction({1: 1})], layers_seen=1, position=8)
    assert queued == 2 and sorted(started(plan)) == [(1, 0, "native"), (1, 1, "native")]


def test_no_prediction_changes_nothing() -> None:
    plan = planner()
    plan.cache.policy.set_priorities({(0, 0, "native"): 0.5})
    assert plan.plan([], layers_seen=1, position=8) == 0
    assert plan.cache.policy.priority((0, 0, "native")) == 0.5 and len(plan.queue) == 0
