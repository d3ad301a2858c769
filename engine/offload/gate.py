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

Both shadows serve demand only, so their misses compare exactly (same accesses, same cost per miss). A window
lasts ``window_steps`` steps, and longer until it saw MIN_READS reads (up to MAX_WINDOW_GROWTH x as many steps); at its
end (`end_step`) the gate decides for the next one:

- **priorities** stay on while the prioritized shadow missed fewer times than the LRU shadow in the window (judged
  only in windows where a planner ran: with nothing acting it does not predict, see `acting`; and not in the
  first, below);
- **prefetch** is judged in stall: the time the forward waited on reads in the window (measured; prefetch reads
  that delay demand reads behind them show there, and so do the misses they saved), plus the CPU time its
  prefetch reads took (the reader's CPU per read of the window x prefetch reads: on a machine whose cores all
  compute, time taken from the forward — 1.7-2 ms per 22 MB O_DIRECT read on this project's 2-vCPU VM,
  invisible in stall), against what the demand-only
  arm the priorities chose would have waited: its misses x the stall of one demand miss. That last figure is
  measured in windows without prefetch (stall over demand misses), and until one ran it is the reader's busy time
  per read of the window. Prefetch stays on while it stalls less than ``(1 - margin)`` of that arm (the margin
  stands for what stall leaves out: the CPU a read takes, the planner's Python). A window in which neither arm
  read anything changes nothing. Once off, prefetch cannot measure itself, so after ``probe_every`` windows off
  it is tried again for one window; each retry that fails doubles the wait (up to MAX_BACKOFF x), one that
  succeeds resets it. The first window decides nothing: it is the predictor's cold start (it knows nothing yet),
  and judging it kept a paying prefetch off for 8 windows (replay of h39s, the tuning trace, at 7 GB/s: stall
  845 s against 779 ungated).

Pure: no tensors, no I/O, no clock of its own (step, stall and reader-busy seconds are given). The owner
(engine.offload.offloaded.OffloadedExperts, and the replay) asks `prefetch_on` before starting a prefetch read;
the planner applies priorities to the real cache only while `priorities_on`, and the gate clears them from it
(``served``, the real cache) when it turns them off.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from engine.offload.cache import ExpertCache, Key, LRUPolicy

logger = logging.getLogger(__name__)

WINDOW_STEPS = 16
"""Engine steps per decision at least: 16 decode steps of a 32-layer top-2 model are 1,024 expert accesses."""
MIN_READS = 32
"""Reads a window needs before it decides (demand misses of either arm plus prefetch reads): a warm cache may see a
miss or two in 16 steps, too few to tell the arms apart. Until then the window grows, up to MAX_WINDOW_GROWTH x
``window_steps`` steps."""
MAX_WINDOW_GROWTH = 8
PROBE_EVERY = 8
"""Windows prefetch stays off before its first retry, doubling after each failed one up to MAX_BACKOFF x (64
windows): a source that keeps losing costs 1 window in 9, then 1 in 17, ... at last 1 in 65."""
MAX_BACKOFF = 8
MARGIN = 0.05


@dataclass
class GateWindow:
    """What one window saw: steps, step seconds, stall and reader-busy seconds, the real cache's demand misses and
    prefetch reads, and each shadow's misses (``prioritized_misses`` None without a prioritized shadow)."""

    steps: int = 0
    seconds: float = 0.0
    stall_seconds: float = 0.0
    busy_seconds: float = 0.0
    read_cpu_seconds: float = 0.0
    demand_misses: int = 0
    prefetch_reads: int = 0
    lru_misses: int = 0
    prioritized_misses: int | None = None

    @property
    def busy(self) -> float:
        """The share of the step time the reader was busy, 0 to 1."""
        return min(1.0, self.busy_seconds / self.seconds) if self.seconds > 0 else 0.0

    @property
    def prefetch_cpu_seconds(self) -> float:
        """The CPU time of the window's prefetch reads: its reads' CPU time per read x prefetch reads."""
        reads = self.demand_misses + self.prefetch_reads
        return self.read_cpu_seconds * self.prefetch_reads / reads if reads else 0.0

    @property
    def prefetch_cost(self) -> float:
        """Seconds the real cache's reads cost the forward: its stall plus the CPU time of its prefetch reads."""
        return self.stall_seconds + self.prefetch_cpu_seconds

    @property
    def read_seconds(self) -> float | None:
        """The reader's busy time per read of the real cache (None without a read)."""
        reads = self.demand_misses + self.prefetch_reads
        return self.busy_seconds / reads if reads else None


class PrefetchGate:
    """Shadow demand-paging caches of ``capacity`` keys (global) and the on/off decisions (module docstring).

    ``served``: the real cache, whose priorities the gate clears when it turns them off. ``flip_log_level``: the
    level its on/off switches are logged at (info in the engine; the modelled replay, which runs thousands of steps
    in a second, logs them at debug)."""

    def __init__(self, capacity: int, window_steps: int = WINDOW_STEPS, probe_every: int = PROBE_EVERY,
                 margin: float = MARGIN, served: ExpertCache | None = None,
                 flip_log_level: int = logging.INFO) -> None:
        if capacity < 1 or window_steps < 1 or probe_every < 1 or not 0.0 <= margin < 1.0:
            raise ValueError(f"capacity {capacity}, window_steps {window_steps} and probe_every {probe_every} must be "
                             f"positive and margin {margin} in [0, 1)")
        self.capacity = capacity
        self.window_steps = window_steps
        self.probe_every = probe_every
        self.margin = margin
        self.served = served
        self.flip_log_level = flip_log_level
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
        self.miss_seconds: float | None = None  # stall per demand miss, measured in the last window without prefetch

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

    def end_step(self, seconds: float, stall_seconds: float, busy_seconds: float,
                 read_cpu_seconds: float = 0.0) -> bool:
        """A step ended: it took ``seconds``, the forward waited ``stall_seconds`` of them on reads, the reader was
        busy ``busy_seconds`` and its reads took ``read_cpu_seconds`` of CPU. Closes the window when it is long
        enough (module docstring); returns whether a decision changed."""
        window = self.window
        window.steps += 1
        window.seconds += seconds
        window.stall_seconds += stall_seconds
        window.busy_seconds += busy_seconds
        window.read_cpu_seconds += read_cpu_seconds
        reads = window.demand_misses + window.prefetch_reads + window.lru_misses
        short = reads < MIN_READS and window.steps < MAX_WINDOW_GROWTH * self.window_steps
        if window.steps < self.window_steps or short:
            return False
        return self._decide(window)

    def _decide(self, window: GateWindow) -> bool:
        priorities_on, prefetch_on = self.priorities_on, self.prefetch_on
        cold = not (self.windows_on or self.windows_off)  # the first window: the predictor's cold start
        if window.prioritized_misses is not None and (priorities_on or prefetch_on) and not cold:
            self.priorities_on = window.prioritized_misses < window.lru_misses
        demand_only = window.prioritized_misses if self.priorities_on else window.lru_misses
        if prefetch_on:
            self.windows_on += 1
            if not cold and (demand_only or window.demand_misses or window.prefetch_reads):  # no read: says nothing
                self.prefetch_on = window.prefetch_cost < (1.0 - self.margin) * self.demand_stall(window, demand_only)
            if self._probing:
                self.retry_after = (self.probe_every if self.prefetch_on
                                    else min(2 * self.retry_after, MAX_BACKOFF * self.probe_every))
            self._off_streak = 0
            self._probing = False
        else:
            self.windows_off += 1
            if window.demand_misses:
                self.miss_seconds = window.stall_seconds / window.demand_misses
            self._off_streak += 1
            self.prefetch_on = self._probing = self._off_streak >= self.retry_after
        changed = (priorities_on, prefetch_on) != (self.priorities_on, self.prefetch_on)
        if priorities_on and not self.priorities_on and self.served is not None:
            self.served.policy.set_priorities({})  # the real cache back to plain LRU at once
        if not self.acting and self.prioritized is not None:
            self.prioritized.policy.set_priorities({})  # no plan will update them until the retry
        if self.prefetch_on != prefetch_on:
            self.switches += 1
        if changed:
            logger.log(self.flip_log_level,
                       "prefetch gate: prefetch %s, priorities %s (window of %d steps: stalled %.3f s with %d demand "
                       "misses and %d prefetch reads of %.3f CPU s; on demand %d misses under LRU%s, %.4f s each)",
                       "on" if self.prefetch_on else "off", "on" if self.priorities_on else "off", window.steps,
                       window.stall_seconds, window.demand_misses, window.prefetch_reads,
                       window.prefetch_cpu_seconds, window.lru_misses,
                       "" if window.prioritized_misses is None
                       else f", {window.prioritized_misses} under the priorities", self.miss_seconds or 0.0)
        self.last = window
        self.window = GateWindow(prioritized_misses=None if self.prioritized is None else 0)
        return changed

    def demand_stall(self, window: GateWindow, misses: int) -> float:
        """The stall ``misses`` demand misses would have cost: each as long as one measured without prefetch, else
        (none measured yet) the reader's busy time per read of ``window``."""
        per_miss = self.miss_seconds if self.miss_seconds is not None else window.read_seconds
        return misses * (per_miss or 0.0)

    def snapshot(self) -> dict:
        """State for ``LLM.stats()``: the decisions, windows on/off, switches, the last closed window's counts."""
        return {"prefetch": self.prefetch_on, "priorities": self.priorities_on, "windows_on": self.windows_on,
                "windows_off": self.windows_off, "switches": self.switches, "retry_after": self.retry_after,
                "miss_seconds": self.miss_seconds,
                "last_window": None if self.last is None else {**asdict(self.last), "busy": round(self.last.busy, 4)}}
