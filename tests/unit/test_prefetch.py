"""The prefetch queue: demand before prefetch, priority order, dedupe, stale drops, slots and bytes in flight."""

from __future__ import annotations

import pytest

from engine.offload.cache import ExpertCache, Key, LRUPolicy
from engine.offload.prefetch import Load, PrefetchQueue

BLOB = 100


def k(layer: int, expert: int) -> Key:
    return (layer, expert, "bf16")


def make(capacity: int = 8, in_flight: int = 4) -> PrefetchQueue:
    return PrefetchQueue(ExpertCache(LRUPolicy(), capacity, scope="global"), BLOB, in_flight * BLOB)


def drain(queue: PrefetchQueue) -> list[Load]:
    loads = []
    while (load := queue.next_load()) is not None:
        loads.append(load)
    return loads


def test_demand_comes_first_then_prefetches_by_priority() -> None:
    queue = make()
    queue.push_prefetch(k(1, 0), 0.3, position=1)
    queue.push_prefetch(k(1, 1), 0.9, position=1)
    queue.push_demand(k(0, 5))
    queue.push_prefetch(k(2, 0), 0.6, position=2)
    assert [(load.key, load.demand) for load in drain(queue)] == [
        (k(0, 5), True), (k(1, 1), False), (k(2, 0), False), (k(1, 0), False)]
    assert queue.bytes_in_flight == 4 * BLOB and len(queue) == 0


def test_duplicates_keep_one_entry_with_the_better_claim() -> None:
    queue = make()
    queue.push_prefetch(k(1, 0), 0.2, position=1)
    queue.push_prefetch(k(1, 0), 0.8, position=1)
    queue.push_prefetch(k(1, 0), 0.5, position=1)
    queue.push_prefetch(k(1, 1), 0.7, position=1)
    assert len(queue) == 2
    assert [load.key for load in drain(queue)] == [k(1, 0), k(1, 1)]
    # In flight: pushing it again, even on demand, queues nothing.
    queue.push_demand(k(1, 0))
    assert len(queue) == 0 and queue.in_flight(k(1, 0))
    queue.complete(k(1, 0))
    queue.push_demand(k(1, 0))  # now resident: nothing to load
    assert len(queue) == 0 and not queue.in_flight(k(1, 0))


def test_a_demand_overrides_a_queued_prefetch_of_the_same_key() -> None:
    queue = make()
    queue.push_prefetch(k(3, 0), 0.9, position=3)
    queue.push_prefetch(k(1, 0), 0.5, position=1)
    queue.push_demand(k(1, 0))
    assert [(load.key, load.demand) for load in drain(queue)] == [(k(1, 0), True), (k(3, 0), False)]


def test_stale_prefetches_are_dropped() -> None:
    queue = make()
    queue.push_prefetch(k(0, 1), 0.9, position=4)
    queue.push_prefetch(k(1, 1), 0.8, position=5)
    queue.push_prefetch(k(2, 1), 0.1, position=6)
    queue.push_demand(k(0, 2))
    assert queue.drop_stale(5) == 2
    assert [load.key for load in drain(queue)] == [k(0, 2), k(2, 1)]


def test_bytes_in_flight_are_bounded_and_complete_frees_them() -> None:
    queue = make(in_flight=2)
    for expert in range(4):
        queue.push_prefetch(k(1, expert), 0.9 - expert / 10, position=1)
    assert [load.key for load in drain(queue)] == [k(1, 0), k(1, 1)]
    assert queue.bytes_in_flight == 2 * BLOB
    queue.push_demand(k(0, 0))
    assert queue.next_load() is None  # even a demand waits for bytes
    queue.complete(k(1, 1))
    assert [load.key for load in drain(queue)] == [k(0, 0)]
    with pytest.raises(ValueError, match="does not hold one blob"):
        PrefetchQueue(ExpertCache(LRUPolicy(), 2), BLOB, BLOB - 1)


def test_in_flight_and_pinned_slots_are_never_victims() -> None:
    queue = make(capacity=3, in_flight=4)
    cache = queue.cache
    cache.access(k(0, 0), 0)
    cache.policy.pin(k(0, 0))  # in use by a running layer
    queue.push_prefetch(k(1, 0), 0.9, position=1)
    queue.push_prefetch(k(1, 1), 0.8, position=1)
    assert [load.evicted for load in drain(queue)] == [None, None]
    # Full: one pinned key, two in flight. A demand must wait; nothing is evicted.
    queue.push_demand(k(2, 0))
    assert queue.next_load() is None and len(cache) == 3
    queue.complete(k(1, 1))
    load = queue.next_load()
    assert (load.key, load.evicted) == (k(2, 0), k(1, 1))
    assert k(0, 0) in cache and queue.in_flight(k(1, 0))


def test_a_prefetch_never_evicts_a_key_the_predictor_values_more() -> None:
    queue = make(capacity=2)
    cache = queue.cache
    cache.access(k(0, 0), 0)
    cache.access(k(0, 1), 0)
    cache.policy.set_priorities({k(0, 0): 0.5, k(0, 1): 0.7})
    queue.push_prefetch(k(1, 0), 0.4, position=1)
    assert queue.next_load() is None and len(queue) == 1  # it waits in the queue
    queue.push_prefetch(k(1, 1), 0.6, position=1)
    load = queue.next_load()
    assert (load.key, load.evicted, load.demand) == (k(1, 1), k(0, 0), False)
    queue.complete(k(1, 1))
    cache.policy.set_priorities({k(0, 1): 0.7, k(1, 1): 0.9})
    queue.push_demand(k(2, 0))  # a demand takes the least valued slot, whatever its own claim
    assert queue.next_load().evicted == k(0, 1)
