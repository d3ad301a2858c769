"""The prefetch gate: prefetch and predicted priorities act only while they beat plain on-demand LRU.

Predictions pay only where routing holds a pattern and the reads they add fit beside the demand reads. On a
random model's routing with the disk the bottleneck (benchmarks/results/trace_prefetch_random_routing.json, before
this gate) every source decoded slower than plain LRU on demand: the look-ahead at 0.87 x, trace priorities and
prefetch at 0.62 x, its priorities evicting worse than recency. `PrefetchGate` notices, online, and falls back.

It keeps *shadow* caches — policy objects only, no tensors, no reads — of the real cache's capacity, fed the very
same demand accesses as the real one (`access`):

- ``lru``: global LRU on demand, what ``expert_prefetch: none`` would have done;
- ``prioritized`` (once `track_priorities` is called, by a planner that sets priorities): global LRU on demand
  under the planner's priorities (`set_priorities`), what priorities without prefetch would have done.

Both shadows serve demand only, so their misses compare exactly (same accesses, same cost per miss). Every
``window_steps`` steps (`end_step`) the gate decides for the next window:

- **priorities** stay on while the prioritized shadow missed fewer times than the LRU shadow in the window (judged
  only in windows where a planner ran: with nothing acting it does not predict, see `acting`);
- **prefetch** is costed in demand reads: the real cache's demand misses plus ``busy`` x its prefetch reads, where
  ``busy`` is the share of the window's step time the reader was busy (a prefetch read delays the demand reads
  queued behind it about as often as the device is busy: free on an idle device, a full demand read's cost on a
  saturated one), against the misses of the demand-only arm the priorities chose. Prefetch stays on while it
  costs less than ``(1 - margin)`` of that arm (the margin stands for what the count leaves out: the CPU a read
  takes, the planner's Python). Once off it cannot measure itself, so after ``probe_every`` windows off it is
  tried again for one window; each retry that fails doubles the wait (up to MAX_BACKOFF x), one that succeeds
  resets it.

Pure: no tensors, no I/O, no clock of its own (step and reader-busy seconds are given). The owner
(engine.offload.offloaded.OffloadedExperts) asks `prefetch_on` before starting a prefetch read and
`priorities_on` before applying priorities to the real cache.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from engine.offload.cache import ExpertCache, Key, LRUPolicy

logger = logging.getLogger(__name__)

WINDOW_STEPS = 16
"""Engine steps per decision: 16 decode steps of a 32-layer top-2 model are 1,024 expert accesses."""
PROBE_EVERY = 8
"""Windows prefetch stays off before its first retry (doubling after each failed one, up to MAX_BACKOFF x: a
source that keeps losing costs at most 1 window in 9, then 1 in 17, ... 1 in 65)."""
MAX_BACKOFF = 8
MARGIN = 0.05


@dataclass
class GateWindow:
    """What one window saw: steps, step seconds, reader-busy seconds, the real cache's demand misses and prefetch
    reads, and each shadow's misses (``prioritized_misses`` None without a prioritized shadow)."""

    steps: int = 0
    seconds: float = 0.0
    busy_seconds: float = 0.0
    demand_misses: int = 0
    prefetch_reads: int = 0
    lru_misses: int = 0
    prioritized_misses: int | None = None

    @property
    def busy(self) -> float:
        """The share of the step time the reader was busy, 0 to 1."""
        return min(1.0, self.busy_seconds / self.seconds) if self.seconds > 0 else 0.0

    @property
    def prefetch_cost(self) -> float:
        """Demand-read equivalents of the real cache: demand misses + busy x prefetch reads."""
        return self.demand_misses + self.busy * self.prefetch_reads


class PrefetchGate:
    """Shadow demand-paging caches of ``capacity`` keys (global) and the on/off decisions (module docstring)."""

    def __init__(self, capacity: int, window_steps: int = WINDOW_STEPS, probe_every: int = PROBE_EVERY,
                 margin: float = MARGIN) -> None:
        if capacity < 1 or window_steps < 1 or probe_every < 1 or not 0.0 <= margin < 1.0:
            raise ValueError(f"capacity {capacity}, window_steps {window_steps} and probe_every {probe_every} must be "
                             f"positive and margin {margin} in [0, 1)")
        self.capacity = capacity
        self.window_steps = window_steps
        self.probe_every = probe_every
        self.margin = margin
        self.lru = ExpertCache(LRUPolicy(), capacity, "global")
        self.prioritized: ExpertCache | None = None
        self.prefetch_on = True
        self.priorities_on = False
        self.window = GateWindow()
        self.last: GateWindow | None = None  # the last closed window
        self.windows_on = 0  # windows closed with prefetch on / off
        self.windows_off = 0
        self.switches = 0  # times prefetch went off or back on
        self.retry_after = probe_every  # windows off before the next retry
        self._off_streak = 0
        self._probing = False  # this window is a retry

    @property
    def acting(self) -> bool:
        """Whether prefetch or priorities act (when neither does, a planner need not predict at all; the
        prioritized shadow then runs as plain LRU until prefetch is retried)."""
        return self.prefetch_on or self.priorities_on

    def track_priorities(self) -> None:
        """A planner sets priorities: shadow them (from now on) and let them act on the real cache until a window
        shows they miss more than LRU."""
        if self.prioritized is None:
            self.prioritized = ExpertCache(LRUPolicy(), self.capacity, "global")
            self.window.prioritized_misses = 0
            self.priorities_on = True

    def set_priorities(self, priorities: Mapping[Key, float]) -> None:
        """The planner's priorities for the prioritized shadow (set whether or not they act on the real cache)."""
        if self.prioritized is not None:
            self.prioritized.policy.set_priorities(priorities)

    def access(self, key: Key, step: int, hit: bool) -> None:
        """A demand access of the real cache (``hit``: it found ``key`` resident, loaded or in flight)."""
        if not hit:
            self.window.demand_misses += 1
        if not self.lru.access(key, step).hit:
            self.window.lru_misses += 1
        if self.prioritized is not None and not self.prioritized.access(key, step).hit:
            self.window.prioritized_misses += 1

    def prefetch_read(self) -> None:
        """The real cache started a prefetch read."""
        self.window.prefetch_reads += 1

    def end_step(self, seconds: float, busy_seconds: float) -> bool:
        """A step ended: it took ``seconds`` and the reader was busy ``busy_seconds`` of them. Closes the window
        after ``window_steps`` steps; returns whether a decision changed."""
        window = self.window
        window.steps += 1
        window.seconds += seconds
        window.busy_seconds += busy_seconds
        if window.steps < self.window_steps:
            return False
        return self._decide(window)

    def _decide(self, window: GateWindow) -> bool:
        priorities_on, prefetch_on = self.priorities_on, self.prefetch_on
        if window.prioritized_misses is not None and (priorities_on or prefetch_on):  # a planner ran: judge them
            self.priorities_on = window.prioritized_misses < window.lru_misses
        demand_only = window.prioritized_misses if self.priorities_on else window.lru_misses
        if prefetch_on:
            self.windows_on += 1
            self.prefetch_on = window.prefetch_cost < (1.0 - self.margin) * demand_only
            if self._probing:
                self.retry_after = (self.probe_every if self.prefetch_on
                                    else min(2 * self.retry_after, MAX_BACKOFF * self.probe_every))
            self._off_streak = 0
            self._probing = False
        else:
            self.windows_off += 1
            self._off_streak += 1
            self.prefetch_on = self._probing = self._off_streak >= self.retry_after
        changed = (priorities_on, prefetch_on) != (self.priorities_on, self.prefetch_on)
        if not self.acting and self.prioritized is not None:
            self.prioritized.policy.set_priorities({})  # no plan will update them until the retry
        if self.prefetch_on != prefetch_on:
            self.switches += 1
        if changed:
            logger.info("prefetch gate: prefetch %s, priorities %s (window of %d steps: %d demand misses + %.2f busy x "
                        "%d prefetch reads against %d on demand under LRU%s)",
                        "on" if self.prefetch_on else "off", "on" if self.priorities_on else "off", window.steps,
                        window.demand_misses, window.busy, window.prefetch_reads, window.lru_misses,
                        "" if window.prioritized_misses is None
                        else f", {window.prioritized_misses} under the priorities")
        self.last = window
        self.window = GateWindow(prioritized_misses=None if self.prioritized is None else 0)
        return changed

    def snapshot(self) -> dict:
        """State for ``LLM.stats()``: the decisions, windows on/off, switches, the last closed window's counts."""
        return {"prefetch": self.prefetch_on, "priorities": self.priorities_on, "windows_on": self.windows_on,
                "windows_off": self.windows_off, "switches": self.switches, "retry_after": self.retry_after,
                "last_window": None if self.last is None else {**asdict(self.last), "busy": round(self.last.busy, 4)}}
