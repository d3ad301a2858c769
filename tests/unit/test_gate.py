"""The prefetch gate (engine.offload.gate): shadow demand-paging caches and the on/off decisions."""

from __future__ import annotations

import pytest

from engine.offload.gate import MAX_BACKOFF, GateWindow, PrefetchGate

P = "native"


def run_window(gate: PrefetchGate, accesses, real_hits, prefetch_reads=0, busy=0.0, priorities=None) -> bool:
    """One window of ``gate.window_steps`` steps: ``accesses`` (keys) in the first step with the real cache's hit
    flags, ``prefetch_reads`` reads, the reader busy ``busy`` of each 1-second step. Returns `end_step`'s last."""
    if priorities is not None:
        gate.set_priorities(priorities)
    for key, hit in zip(accesses, real_hits):
        gate.access(key, 0, hit)
    for _ in range(prefetch_reads):
        gate.prefetch_read()
    changed = False
    for _ in range(gate.window_steps):
        changed = gate.end_step(1.0, busy)
    return changed


def cycle(layers: int, experts: int, repeats: int):
    """Keys of a cyclic scan over ``layers`` x ``experts``, ``repeats`` times (LRU's worst case beyond capacity)."""
    return [(layer, expert, P) for _ in range(repeats) for layer in range(layers) for expert in range(experts)]


def test_window_cost_weights_prefetch_reads_by_reader_busy_share():
    window = GateWindow(steps=4, seconds=2.0, busy_seconds=1.0, demand_misses=3, prefetch_reads=10, lru_misses=9)
    assert window.busy == 0.5
    assert window.prefetch_cost == 3 + 0.5 * 10
    assert GateWindow(seconds=1.0, busy_seconds=3.0).busy == 1.0  # clamped
    assert GateWindow().busy == 0.0


def test_lru_shadow_counts_demand_misses_of_plain_lru():
    gate = PrefetchGate(capacity=2, window_steps=1)
    keys = [(0, 0, P), (0, 1, P), (0, 0, P), (0, 2, P), (0, 1, P), (0, 0, P)]
    for key in keys:
        gate.access(key, 0, hit=True)
    # LRU of 2: miss, miss, hit, miss (evicts 1), miss (evicts 0), miss (evicts 2)
    assert gate.window.lru_misses == 5
    assert gate.window.demand_misses == 0
    assert gate.window.prioritized_misses is None


def test_prefetch_stays_on_while_it_beats_lru_and_goes_off_when_it_does_not():
    gate = PrefetchGate(capacity=4, window_steps=2)
    keys = cycle(1, 5, 4)  # 20 accesses, all misses for an LRU of 4
    assert not run_window(gate, keys, [True] * 18 + [False] * 2, prefetch_reads=18, busy=0.5)
    assert gate.prefetch_on  # 2 + 0.5 * 18 = 11 < 0.95 * 20
    assert run_window(gate, keys, [True] * 10 + [False] * 10, prefetch_reads=20, busy=1.0)
    assert not gate.prefetch_on  # 10 + 20 = 30 >= 19
    assert gate.last.lru_misses == 20 and gate.last.demand_misses == 10 and gate.last.prefetch_reads == 20
    assert gate.snapshot()["prefetch"] is False and gate.snapshot()["switches"] == 1


def test_prefetch_on_an_idle_reader_costs_nothing_but_must_save_a_miss():
    gate = PrefetchGate(capacity=4, window_steps=1, margin=0.0)
    keys = cycle(1, 5, 2)  # 10 LRU misses
    run_window(gate, keys, [False] * 9 + [True], prefetch_reads=100, busy=0.0)
    assert gate.prefetch_on  # 9 < 10: the reads were free
    run_window(gate, keys, [False] * 10, prefetch_reads=1, busy=0.0)
    assert not gate.prefetch_on  # 10 is not < 10


def test_off_prefetch_is_retried_after_probe_every_windows_with_backoff():
    gate = PrefetchGate(capacity=2, window_steps=1, probe_every=2)
    losing = dict(accesses=cycle(1, 3, 2), real_hits=[False] * 6, prefetch_reads=6, busy=1.0)
    run_window(gate, **losing)
    assert not gate.prefetch_on
    history = []
    for _ in range(2 + 1 + 4 + 1 + 8 + 1):
        run_window(gate, **losing)
        history.append(gate.prefetch_on)
    # (the decision after each window) 2 windows off, then a retry; it fails: 4 off, a retry; it fails: 8 off, a
    # retry, which fails
    off, retry = [False], [True]
    assert history == off + retry + off + off * 3 + retry + off + off * 7 + retry + off
    assert gate.retry_after == 8 * 2 and gate.windows_on == 4
    for _ in range(20):
        run_window(gate, **losing)
    assert gate.retry_after == MAX_BACKOFF * 2  # capped


def test_a_successful_retry_keeps_prefetch_on_and_resets_the_wait():
    gate = PrefetchGate(capacity=2, window_steps=1, probe_every=1)
    keys = cycle(1, 3, 2)
    run_window(gate, keys, [False] * 6, prefetch_reads=6, busy=1.0)
    run_window(gate, keys, [False] * 6)  # off window: retry next
    assert gate.prefetch_on
    run_window(gate, keys, [False] * 6, prefetch_reads=6, busy=1.0)  # the retry fails: wait doubles
    assert not gate.prefetch_on and gate.retry_after == 2
    run_window(gate, keys, [False] * 6)
    run_window(gate, keys, [False] * 6)
    assert gate.prefetch_on
    run_window(gate, keys, [True] * 6, prefetch_reads=1, busy=0.1)  # the retry wins
    assert gate.prefetch_on and gate.retry_after == 1


def test_priorities_stay_on_only_while_the_prioritized_shadow_misses_less_than_lru():
    gate = PrefetchGate(capacity=2, window_steps=1)
    gate.track_priorities()
    assert gate.priorities_on and gate.window.prioritized_misses == 0
    # A scan of 3 keys: LRU misses every access; keeping key 0 makes it hit in every round after the first.
    keys = cycle(1, 3, 4)
    run_window(gate, keys, [True] * len(keys), priorities={(0, 0, P): 1.0})
    assert gate.last.lru_misses == 12 and gate.last.prioritized_misses == 3 + 3 * 2
    assert gate.priorities_on
    # Priorities that keep the wrong keys: evict the one needed next.
    bad = {(0, 2, P): 1.0}
    gate.set_priorities(bad)
    worse = [(0, 0, P), (0, 1, P)] * 6
    run_window(gate, worse, [True] * len(worse))
    assert gate.last.prioritized_misses > gate.last.lru_misses
    assert not gate.priorities_on


def test_nothing_acting_means_no_judgement_of_priorities_and_a_plain_lru_shadow():
    gate = PrefetchGate(capacity=2, window_steps=1, probe_every=4)
    gate.track_priorities()
    gate.set_priorities({(0, 5, P): 1.0})
    keys = [(0, 0, P), (0, 1, P)] * 4 + [(0, 5, P)]
    run_window(gate, keys, [False] * len(keys), prefetch_reads=9, busy=1.0)  # priorities lose: 9 vs ... both off
    assert not gate.acting
    assert gate.prioritized.policy.priority((0, 5, P)) == 0.0  # cleared: no plan updates them while idle
    for _ in range(3):
        run_window(gate, cycle(1, 3, 2), [False] * 6)
        assert not gate.priorities_on


@pytest.mark.parametrize("arguments", [dict(capacity=0), dict(capacity=1, window_steps=0),
                                       dict(capacity=1, probe_every=0), dict(capacity=1, margin=1.0)])
def test_bad_arguments(arguments):
    with pytest.raises(ValueError):
        PrefetchGate(**arguments)
