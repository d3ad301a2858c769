"""The prefetch gate (engine.offload.gate): shadow demand-paging caches and the on/off decisions."""

from __future__ import annotations

import logging

import pytest

from engine.offload.cache import ExpertCache, LRUPolicy
from engine.offload.gate import MAX_BACKOFF, MAX_WINDOW_GROWTH, MIN_READS, GateWindow, PrefetchGate

P = "native"


def run_window(gate: PrefetchGate, accesses, real_hits, prefetch_reads=0, stall=0.0, busy=0.0,
               priorities=None) -> bool:
    """One window, to its decision: ``accesses`` (keys) in the first step with the real cache's hit flags,
    ``prefetch_reads`` reads and ``stall`` seconds of waiting in it, the reader busy ``busy`` of each 1-second
    step. Returns `end_step`'s last answer."""
    if priorities is not None:
        gate.set_priorities(priorities)
    for key, hit in zip(accesses, real_hits):
        gate.access(key, 0, hit)
    for _ in range(prefetch_reads):
        gate.prefetch_read()
    window, changed, step_stall = gate.window, False, stall
    while gate.window is window:  # as many steps as the window takes to decide
        changed = gate.end_step(1.0, step_stall, busy)
        step_stall = 0.0
    return changed


def past_cold_start(**arguments) -> PrefetchGate:
    """A gate whose first window (the predictor's cold start, which decides nothing) is over."""
    gate = PrefetchGate(**arguments)
    run_window(gate, [], [])
    assert gate.prefetch_on and gate.windows_on == 1
    return gate


def cycle(layers: int, experts: int, repeats: int):
    """Keys of a cyclic scan over ``layers`` x ``experts``, ``repeats`` times (LRU's worst case beyond capacity)."""
    return [(layer, expert, P) for _ in range(repeats) for layer in range(layers) for expert in range(experts)]


SCAN = cycle(1, 5, 8)  # 40 accesses, every one a miss for an LRU of 4


def test_window_rates():
    window = GateWindow(steps=4, seconds=2.0, busy_seconds=1.0, demand_misses=3, prefetch_reads=7, lru_misses=9)
    assert window.busy == 0.5 and window.read_seconds == 0.1
    assert GateWindow(seconds=1.0, busy_seconds=3.0).busy == 1.0  # clamped
    assert GateWindow().busy == 0.0 and GateWindow().read_seconds is None


def test_lru_shadow_counts_demand_misses_of_plain_lru():
    gate = PrefetchGate(capacity=2, window_steps=1)
    keys = [(0, 0, P), (0, 1, P), (0, 0, P), (0, 2, P), (0, 1, P), (0, 0, P)]
    for key in keys:
        gate.access(key, 0, hit=True)
    # LRU of 2: miss, miss, hit, miss (evicts 1), miss (evicts 0), miss (evicts 2)
    assert gate.window.lru_misses == 5
    assert gate.window.demand_misses == 0
    assert gate.window.prioritized_misses is None


def test_before_any_window_without_prefetch_a_miss_costs_a_read_of_the_reader():
    gate = past_cold_start(capacity=4, window_steps=2)
    # 40 reads in 2 steps with the reader busy 2 s: 0.05 s a read; LRU's 40 misses would stall 2 s.
    assert not run_window(gate, SCAN, [True] * 20 + [False] * 20, prefetch_reads=20, stall=1.0, busy=1.0)
    assert gate.prefetch_on  # 1.0 < 0.95 * 2.0
    assert gate.demand_stall(gate.last, 40) == pytest.approx(2.0)
    assert run_window(gate, SCAN, [True] * 20 + [False] * 20, prefetch_reads=20, stall=1.95, busy=1.0)
    assert not gate.prefetch_on  # 1.95 >= 0.95 * 2.0
    assert gate.last.lru_misses == 40 and gate.last.demand_misses == 20 and gate.last.prefetch_reads == 20
    assert gate.snapshot()["prefetch"] is False and gate.snapshot()["switches"] == 1


def test_windows_without_prefetch_measure_the_stall_of_a_demand_miss():
    gate = past_cold_start(capacity=4, window_steps=1, probe_every=1)
    run_window(gate, SCAN, [False] * 40, prefetch_reads=1, stall=4.0, busy=1.0)  # loses: off
    assert not gate.prefetch_on and gate.miss_seconds is None
    run_window(gate, SCAN, [False] * 40, stall=0.8)  # off: 40 misses stalled 0.8 s, 0.02 s each; retry next
    assert gate.miss_seconds == pytest.approx(0.02) and gate.prefetch_on
    run_window(gate, SCAN, [True] * 30 + [False] * 10, prefetch_reads=30, stall=0.7, busy=1.0)
    assert gate.prefetch_on  # 0.7 < 0.95 * 40 * 0.02 = 0.76
    run_window(gate, SCAN, [True] * 30 + [False] * 10, prefetch_reads=30, stall=0.77, busy=1.0)
    assert not gate.prefetch_on


def test_off_prefetch_is_retried_after_probe_every_windows_with_backoff():
    gate = past_cold_start(capacity=2, window_steps=1, probe_every=2)
    losing = dict(accesses=cycle(1, 3, 12), real_hits=[False] * 36, prefetch_reads=6, stall=10.0, busy=1.0)
    off_window = dict(accesses=cycle(1, 3, 12), real_hits=[False] * 36, stall=1.0)
    run_window(gate, **losing)
    assert not gate.prefetch_on
    history = []
    for _ in range(2 + 1 + 4 + 1 + 8 + 1):
        run_window(gate, **(losing if gate.prefetch_on else off_window))
        history.append(gate.prefetch_on)
    # (the decision after each window) 2 windows off, then a retry; it fails: 4 off, a retry; it fails: 8 off, a
    # retry, which fails
    off, retry = [False], [True]
    assert history == off + retry + off + off * 3 + retry + off + off * 7 + retry + off
    assert gate.retry_after == 8 * 2 and gate.windows_on == 1 + 4
    for _ in range(200):
        run_window(gate, **(losing if gate.prefetch_on else off_window))
    assert gate.retry_after == MAX_BACKOFF * 2  # capped


def test_a_successful_retry_keeps_prefetch_on_and_resets_the_wait():
    gate = past_cold_start(capacity=2, window_steps=1, probe_every=1)
    keys = cycle(1, 3, 12)
    run_window(gate, keys, [False] * 36, prefetch_reads=6, stall=10.0, busy=1.0)
    run_window(gate, keys, [False] * 36, stall=3.6)  # off window (0.1 s a miss): retry next
    assert gate.prefetch_on
    run_window(gate, keys, [False] * 36, prefetch_reads=6, stall=5.0, busy=1.0)  # the retry fails: wait doubles
    assert not gate.prefetch_on and gate.retry_after == 2
    run_window(gate, keys, [False] * 36, stall=3.6)
    run_window(gate, keys, [False] * 36, stall=3.6)
    assert gate.prefetch_on
    run_window(gate, keys, [True] * 36, prefetch_reads=36, stall=0.5, busy=0.1)  # the retry wins
    assert gate.prefetch_on and gate.retry_after == 1


def test_a_window_without_reads_either_way_changes_nothing():
    gate = past_cold_start(capacity=4, window_steps=1)
    keys = [(0, 0, P), (0, 1, P)]
    run_window(gate, keys, [False, False], stall=1.0)  # the first window: as many misses as LRU's cold ones
    assert not gate.prefetch_on
    gate.prefetch_on = True  # as after a retry
    assert not run_window(gate, keys, [True, True])  # resident in both: no miss, no prefetch
    assert gate.prefetch_on and gate.last.lru_misses == 0


def test_a_window_lasts_until_it_saw_enough_reads_or_grew_to_its_limit():
    gate = PrefetchGate(capacity=64, window_steps=2)
    few = [(0, expert, P) for expert in range(MIN_READS // 2 - 1)]  # LRU misses and real misses: MIN_READS - 2
    run_window(gate, few, [False] * len(few))
    assert gate.last.steps == MAX_WINDOW_GROWTH * 2
    enough = [(1, expert, P) for expert in range(MIN_READS // 2)]
    run_window(gate, enough, [False] * len(enough))
    assert gate.last.steps == 2


def test_priorities_stay_on_only_while_the_prioritized_shadow_misses_less_than_lru():
    gate = past_cold_start(capacity=2, window_steps=1)
    gate.track_priorities()
    assert gate.priorities_on and gate.window.prioritized_misses == 0
    # A scan of 3 keys: LRU misses every access; keeping key 0 makes it hit in every round after the first.
    keys = cycle(1, 3, 12)
    run_window(gate, keys, [True] * len(keys), priorities={(0, 0, P): 1.0})
    assert gate.last.lru_misses == 36 and gate.last.prioritized_misses == 3 + 11 * 2
    assert gate.priorities_on
    # Priorities that keep the wrong keys: evict the one needed next.
    gate.set_priorities({(0, 2, P): 1.0})
    worse = [(0, 0, P), (0, 1, P)] * 18
    run_window(gate, worse, [True] * len(worse))
    assert gate.last.prioritized_misses > gate.last.lru_misses
    assert not gate.priorities_on


def test_priorities_turned_off_are_cleared_from_the_served_cache():
    served = ExpertCache(LRUPolicy(), 2, "global")
    gate = past_cold_start(capacity=2, window_steps=1, served=served)
    gate.track_priorities()
    served.policy.set_priorities({(0, 2, P): 1.0})  # as the planner sets them while priorities are on
    gate.set_priorities({(0, 2, P): 1.0})
    worse = [(0, 0, P), (0, 1, P)] * 18
    run_window(gate, worse, [True] * len(worse))
    assert not gate.priorities_on and served.policy.priority((0, 2, P)) == 0.0


def test_nothing_acting_means_no_judgement_of_priorities_and_a_plain_lru_shadow():
    gate = past_cold_start(capacity=2, window_steps=1, probe_every=4)
    gate.track_priorities()
    gate.set_priorities({(0, 5, P): 1.0})
    keys = [(0, 0, P), (0, 1, P)] * 16 + [(0, 5, P)]
    run_window(gate, keys, [False] * len(keys), prefetch_reads=9, stall=10.0, busy=1.0)  # both lose
    assert not gate.acting
    assert gate.prioritized.policy.priority((0, 5, P)) == 0.0  # cleared: no plan updates them while idle
    for _ in range(3):
        run_window(gate, cycle(1, 3, 12), [False] * 36, stall=1.0)
        assert not gate.priorities_on


@pytest.mark.parametrize("arguments", [dict(capacity=0), dict(capacity=1, window_steps=0),
                                       dict(capacity=1, probe_every=0), dict(capacity=1, margin=1.0)])
def test_bad_arguments(arguments):
    with pytest.raises(ValueError):
        PrefetchGate(**arguments)


def test_the_cpu_time_of_prefetch_reads_counts_against_prefetch():
    window = GateWindow(stall_seconds=1.0, read_cpu_seconds=0.4, demand_misses=10, prefetch_reads=30)
    assert window.prefetch_cpu_seconds == pytest.approx(0.3)  # 0.01 s a read, 30 of them prefetches
    assert window.prefetch_cost == pytest.approx(1.3)
    gate = past_cold_start(capacity=4, window_steps=1, margin=0.0)
    # 40 LRU misses at the reader's 0.05 s a read (2 s busy / 40 reads) would stall 2 s; prefetch stalled 1.5 s
    # but its 20 reads took 0.6 s of CPU (1.2 s over 40 reads): 2.1 s, a loss.
    for key, hit in zip(SCAN, [True] * 20 + [False] * 20):
        gate.access(key, 0, hit)
    for _ in range(20):
        gate.prefetch_read()
    gate.end_step(1.0, 1.5, 2.0, 1.2)
    assert gate.last.prefetch_cost == pytest.approx(2.1) and not gate.prefetch_on


def test_the_cold_start_window_decides_nothing():
    gate = PrefetchGate(capacity=2, window_steps=1)
    gate.track_priorities()
    gate.set_priorities({(0, 2, P): 1.0})
    worse = [(0, 0, P), (0, 1, P)] * 18
    assert not run_window(gate, worse, [False] * len(worse), prefetch_reads=36, stall=100.0, busy=1.0)
    assert gate.prefetch_on and gate.priorities_on  # both lost, and both stay on for a second window
    run_window(gate, worse, [False] * len(worse), prefetch_reads=36, stall=100.0, busy=1.0)
    assert not gate.prefetch_on and not gate.priorities_on


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG], ids=["engine", "replay"])
def test_switches_are_logged_at_the_level_asked(caplog, level: int) -> None:
    """The engine logs each switch at info; the modelled replay (thousands of windows a second) at debug."""
    gate = past_cold_start(capacity=4, window_steps=2, flip_log_level=level)
    with caplog.at_level(logging.DEBUG, logger="engine.offload.gate"):
        run_window(gate, SCAN, [True] * 20 + [False] * 20, prefetch_reads=20, stall=1.95, busy=1.0)  # switches off
        run_window(gate, SCAN, [False] * 40, stall=1.0)  # stays off: nothing logged
    assert [(r.levelno, r.getMessage().split(" (")[0]) for r in caplog.records] == [
        (level, "prefetch gate: prefetch off, priorities off")]
