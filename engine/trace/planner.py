"""The prefetch plan: after each layer, the batch's predictions become the cache's priorities and prefetches.

`PrefetchPlanner.plan` is the one place where predictions act. Given the `Predictor.predict` answers of the
running requests at a frontier (the layers of this step run so far), it

1. combines them into one probability per key of use at the key's next visit (`any_request`) and sets
   `batch_priorities` on the cache's policy — eviction then keeps what is predicted soonest;
2. queues a prefetch (`PrefetchQueue.push_prefetch`) for every key of the next ``horizon`` layers whose
   probability reaches ``min_probability`` and that is not resident, at its priority and target position.

Whoever moves bytes then drains the queue (`PrefetchQueue.next_load`): the offline replay's modelled device
(engine.trace.replay) and the engine's expert reader (engine.offload.offloaded) alike, so a plan measured in
replay is the plan that serves. Pure: no tensors, no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from engine.offload.cache import ExpertCache, Key
from engine.offload.prefetch import PrefetchQueue
from engine.trace.predictor import DEFAULT_MAX_OFFSET, DEFAULT_MISS_STEPS, SOURCES, any_request, batch_priorities


@dataclass(frozen=True)
class PrefetchSettings:
    """The tuning of the plan (chosen on mixtral-h39s-prompt1 only; see benchmarks/replay_policies.py).

    ``sources``: the predictor's (engine.trace.predictor.SOURCES); ``max_offset``: layers back the transition
    statistics look; ``miss_steps``: `batch_priorities`' assumed wait after a missed visit;
    ``min_probability``: the least predicted probability of use worth a prefetch; ``horizon``: how many layers
    ahead of the frontier prefetches may target.
    """

    sources: tuple[str, ...] = SOURCES
    max_offset: int = DEFAULT_MAX_OFFSET
    miss_steps: float = DEFAULT_MISS_STEPS
    min_probability: float = 0.6
    horizon: int = 8


class PrefetchPlanner:
    """Priorities and prefetches for one `ExpertCache` and its `PrefetchQueue` (module docstring).

    ``layers``: the layers that have experts (default: all ``num_layers``); keys of other layers are never
    queued. Positions count layers over the engine's steps: ``step * num_layers + layer``.
    """

    def __init__(
        self,
        cache: ExpertCache,
        queue: PrefetchQueue,
        num_layers: int,
        settings: PrefetchSettings | None = None,
        precision: str = "native",
        layers: Collection[int] | None = None,
    ) -> None:
        self.cache = cache
        self.queue = queue
        self.num_layers = num_layers
        self.settings = settings or PrefetchSettings()
        self.precision = precision
        self.layers = frozenset(range(num_layers) if layers is None else layers)

    def plan(self, predictions: Sequence[Sequence[Sequence[float]]], layers_seen: int, position: int) -> int:
        """Act on the running requests' ``predictions`` ([L][E] each) at frontier ``layers_seen``; ``position``
        is that of the layer just run (``layers_seen - 1``). Returns how many prefetches were queued.

        No predictions (no request to predict for): nothing changes.
        """
        if not predictions:
            return 0
        next_visit = any_request(predictions)
        priorities = batch_priorities(next_visit, layers_seen, self.settings.miss_steps, self.precision)
        self.cache.policy.set_priorities(priorities)
        queued = 0
        for ahead in range(1, self.settings.horizon + 1):
            target = (layers_seen - 1 + ahead) % self.num_layers
            if target not in self.layers:
                continue
            for expert, probability in enumerate(next_visit[target]):
                key: Key = (target, expert, self.precision)
                if probability >= self.settings.min_probability and key not in self.cache:
                    self.queue.push_prefetch(key, priorities[key], position + ahead)
                    queued += 1
        return queued
