"""The prefetch plan: after each layer, the batch's predictions become the cache's priorities and prefetches.

`PrefetchPlanner.plan` is the one place where predictions act. Given the `Predictor.predict` answers of the
running requests at a frontier (the layers of this step run so far), it

1. combines them into one probability per key of use at the key's next visit (`any_request`) and sets
   `batch_priorities` on the cache's policy — eviction then keeps what is predicted soonest;
2. queues a prefetch (`PrefetchQueue.push_prefetch`) for every key of the next ``horizon`` layers whose
   probability reaches ``min_probability`` and that is not resident, at its priority and target position.

How far ahead to look and how likely a key must be depend on how long a read takes against a layer's compute
(`PrefetchSettings.for_read_time`): a prefetch issued earlier than its read needs is taken on a less informed
prediction (on h39s with free reads, horizon 8 instead of 1 loaded 840-970 more blobs for -0.002 to +0.002 of
hit rate, at two earlier settings), and
when reads are the bottleneck every wasted read delays the useful ones behind it.

Whoever moves bytes then drains the queue (`PrefetchQueue.next_load`): the offline replay's modelled device
(engine.trace.replay) and the engine's expert reader (engine.offload.offloaded) alike, so a plan measured in
replay is the plan that serves. Pure: no tensors, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from engine.offload.cache import ExpertCache, Key
from engine.offload.gate import PrefetchGate
from engine.offload.prefetch import PrefetchQueue
from engine.trace.predictor import DEFAULT_MAX_OFFSET, DEFAULT_MISS_STEPS, any_request, batch_priorities


POLICY_SOURCES: tuple[str, ...] = ("store", "transitions", "history")
"""The predictor's sources the plan uses: all but ``"recent"``, which raises recall and lowers the hit rate at
the same blobs (engine.trace.predictor.HistorySettings)."""
MAX_HORIZON = 8
IO_BOUND_READ_LAYERS = 4.0
"""Reads longer than this many layers of compute make the device the bottleneck (`PrefetchSettings.for_read_time`;
measured only at 1.4 (NVMe) and 6.7 (disk) layers per read on h39s, so the boundary is loose)."""
COMPUTE_BOUND_MIN_PROBABILITY = 0.7
"""Shorter reads, chosen on h39s with free reads, 4 slots per layer, against per-layer LRU's 22,702 blobs: 0.66 is
the lowest within them (22,663 blobs, hit rate 0.745; 0.65: 22,734), 0.7 keeps a margin of 1.4 % (22,384 blobs,
0.740; with the token match's successor votes, added since, 0.741 at 21,711). The former 0.57, chosen so before
the predictor gained its own request's statistics and the token match, would now load more than LRU."""
IO_BOUND_MIN_PROBABILITY = 0.9
"""Longer reads: on h39s at 1.5 GB/s, the lowest of 0.7, 0.8 and 0.9 whose blobs stay within per-layer LRU's
22,702: 24,451, 23,346 and 22,522 blobs, stall 5,199 s, 5,017 s and 4,894 s, hit rate 0.715, 0.706 and 0.695 (0.95:
4,849 s, 0.690). (Without the token match, 0.8 stalled 4,776 s at 21,389 blobs, hit rate 0.656: when reads are
the bottleneck, the prefetches it adds delay demand reads more than they save. With the successor votes, added
since, 0.9 gives 21,845 blobs, stall 4,739 s, hit rate 0.697.)"""


@dataclass(frozen=True)
class PrefetchSettings:
    """The tuning of the plan (chosen on mixtral-h39s-prompt1 only; see benchmarks/replay_policies.py).

    ``sources``: the predictor's (of engine.trace.predictor.SOURCES); ``max_offset``: layers back the transition
    statistics look; ``miss_steps``: `batch_priorities`' assumed wait after a missed visit;
    ``min_probability``: the least predicted probability of use worth a prefetch; ``horizon``: how many layers
    ahead of the frontier prefetches may target. The defaults are `for_read_time` of a disk read, ~7 layers
    (DESIGN.md: a miss costs 10-25x the compute it feeds).
    """

    sources: tuple[str, ...] = POLICY_SOURCES
    max_offset: int = DEFAULT_MAX_OFFSET
    miss_steps: float = DEFAULT_MISS_STEPS
    min_probability: float = IO_BOUND_MIN_PROBABILITY
    horizon: int = MAX_HORIZON

    @classmethod
    def for_read_time(cls, read_layers: float) -> PrefetchSettings:
        """The settings for reads that each take ``read_layers`` layers of compute (read seconds over a layer's
        compute seconds): look ahead as many layers as a read takes (1 to MAX_HORIZON), and beyond
        IO_BOUND_READ_LAYERS prefetch only keys likely enough for an IO-bound device."""
        horizon = min(MAX_HORIZON, max(1, math.ceil(read_layers)))
        io_bound = read_layers > IO_BOUND_READ_LAYERS
        return cls(min_probability=IO_BOUND_MIN_PROBABILITY if io_bound else COMPUTE_BOUND_MIN_PROBABILITY,
                   horizon=horizon)


class PrefetchPlanner:
    """Priorities and prefetches for one `ExpertCache` and its `PrefetchQueue` (module docstring).

    ``layers``: the layers that have experts (default: all ``num_layers``); keys of other layers are never
    queued. Positions count layers over the engine's steps: ``step * num_layers + layer``. ``gate`` (the engine's
    `PrefetchGate`; the replay has none): its prioritized shadow follows every plan's priorities, the cache's
    policy only while the gate has priorities on, and nothing is queued while it has prefetch off.
    """

    def __init__(
        self,
        cache: ExpertCache,
        queue: PrefetchQueue,
        num_layers: int,
        settings: PrefetchSettings | None = None,
        precision: str = "native",
        layers: Collection[int] | None = None,
        gate: PrefetchGate | None = None,
    ) -> None:
        self.cache = cache
        self.queue = queue
        self.num_layers = num_layers
        self.settings = settings or PrefetchSettings()
        self.precision = precision
        self.layers = frozenset(range(num_layers) if layers is None else layers)
        self.gate = gate
        if gate is not None:
            gate.track_priorities()

    def plan(self, predictions: Sequence[np.ndarray], layers_seen: int, position: int,
             waits: Sequence[np.ndarray] | None = None) -> int:
        """Act on the running requests' ``predictions`` ([L, E] each) at frontier ``layers_seen``; ``position``
        is that of the layer just run (``layers_seen - 1``). Returns how many prefetches were queued.

        ``waits`` (the replay's oracles only, engine.trace.replay.NextVisitOracle): per request, [L, E] steps from a
        key's next visit to its use after it, where the next visit leaves it unused; the batch waits for the
        soonest. None: every such key waits ``settings.miss_steps``.

        No predictions (no request to predict for): nothing changes.
        """
        if not predictions:
            return 0
        next_visit = any_request(predictions)
        miss_steps = self.settings.miss_steps if waits is None else np.minimum.reduce([*waits])
        priorities = batch_priorities(next_visit, layers_seen, miss_steps, self.precision)
        gate = self.gate
        if gate is not None:
            gate.set_priorities(priorities)
        if gate is None or gate.priorities_on:
            self.cache.policy.set_priorities(priorities)
        if gate is not None and not gate.prefetch_on:
            return 0
        queued = 0
        for ahead in range(1, self.settings.horizon + 1):
            target = (layers_seen - 1 + ahead) % self.num_layers
            if target not in self.layers:
                continue
            for expert in np.flatnonzero(next_visit[target] >= self.settings.min_probability).tolist():
                key: Key = (target, expert, self.precision)
                if key not in self.cache:
                    self.queue.push_prefetch(key, priorities[key], position + ahead)
                    queued += 1
        return queued
