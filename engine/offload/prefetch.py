"""The prefetch queue: which expert blob to read next, and the slot it goes into. No threads, no tensors, no I/O.

`PrefetchQueue` orders load requests and hands them out one at a time with `next_load`; whoever moves the bytes
(the replay's modelled device in engine/trace/replay.py, the engine's I/O workers) calls `complete` when a read
finished. Rules:

- On-demand loads (a layer is waiting) come before every prefetch; among prefetches, the higher predicted
  priority first; equal priorities in push order.
- Dedupe: a key already queued keeps one entry (the better class and priority win); a key in flight or
  resident is not queued at all.
- Stale prefetches — those whose target position (`position`: ``step * num_layers + layer``) has already been
  reached — are dropped by `drop_stale`, and never handed out.
- A load reserves its slot when it is handed out: the key becomes resident in the cache (`ExpertCache.admit`,
  evicting the policy's victim) and stays pinned until `complete`, so an in-flight slot is never a victim, nor
  is any pinned one (the policy's rule). A prefetch is handed out only when it fits without an eviction, or when
  the victim's keep-priority (`EvictionPolicy.priority`) is lower than the prefetch's own: a prefetch never
  evicts what the predictor values more.
- At most ``max_bytes_in_flight`` bytes are in flight; a request that does not fit waits for a `complete`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from dataclasses import dataclass

from engine.offload.cache import ExpertCache, Key, NoVictimError

logger = logging.getLogger(__name__)

DEMAND = 0
PREFETCH = 1


@dataclass(frozen=True)
class Load:
    """A read handed out by `PrefetchQueue.next_load`: the key, the key evicted for its slot, whether on demand."""

    key: Key
    evicted: Key | None
    demand: bool


@dataclass(frozen=True)
class _Entry:
    """A queued request: its class (DEMAND before PREFETCH), priority and target position (None: on demand)."""

    kind: int
    priority: float
    position: int | None


class PrefetchQueue:
    """Priority queue of expert loads over one `ExpertCache` (module docstring for the rules).

    ``blob_bytes`` is the size of one expert blob (every key the same size); ``max_bytes_in_flight`` must hold
    at least one blob.
    """

    def __init__(self, cache: ExpertCache, blob_bytes: int, max_bytes_in_flight: int) -> None:
        if blob_bytes < 1:
            raise ValueError(f"blob_bytes must be positive, got {blob_bytes}")
        if max_bytes_in_flight < blob_bytes:
            raise ValueError(f"max_bytes_in_flight {max_bytes_in_flight} does not hold one blob of {blob_bytes}")
        self.cache = cache
        self.blob_bytes = blob_bytes
        self.max_bytes_in_flight = max_bytes_in_flight
        self._queued: dict[Key, _Entry] = {}
        self._heap: list[tuple[int, float, int, Key]] = []
        self._order = itertools.count()
        self._in_flight: set[Key] = set()

    def push_demand(self, key: Key) -> None:
        """Queue an on-demand load of ``key`` (ahead of every prefetch); no-op if in flight or resident."""
        self._push(key, _Entry(DEMAND, 0.0, None))

    def push_prefetch(self, key: Key, priority: float, position: int) -> None:
        """Queue a prefetch of ``key`` needed at ``position`` with ``priority`` (a predicted probability, > 0)."""
        self._push(key, _Entry(PREFETCH, priority, position))

    def drop_stale(self, position: int) -> int:
        """Drop the prefetches whose target position is at or before ``position``; how many were dropped."""
        stale = [key for key, entry in self._queued.items()
                 if entry.position is not None and entry.position <= position]
        for key in stale:
            del self._queued[key]
        return len(stale)

    def next_load(self) -> Load | None:
        """The next load to start, its slot reserved and pinned; None if nothing may start now (module rules).

        A prefetch whose slot would cost a more valuable resident key (or a pinned-full cache) stays queued, and
        so does everything after it: the queue is in priority order, and a better slot will not appear by itself.
        """
        while self._heap:
            kind, negative_priority, _, key = self._heap[0]
            entry = self._queued.get(key)
            if entry is None or (entry.kind, -entry.priority) != (kind, negative_priority):
                heapq.heappop(self._heap)  # superseded or dropped
                continue
            if key in self.cache:  # became resident some other way (an access) since it was queued
                heapq.heappop(self._heap)
                del self._queued[key]
                continue
            if self.bytes_in_flight + self.blob_bytes > self.max_bytes_in_flight:
                return None
            try:
                victim = self.cache.victim_for(key)
            except NoVictimError:
                return None
            if kind == PREFETCH and victim is not None and self.cache.policy.priority(victim) >= entry.priority:
                return None
            heapq.heappop(self._heap)
            del self._queued[key]
            return self._start(key, kind == DEMAND)
        return None

    def complete(self, key: Key) -> None:
        """The read of ``key`` finished (or failed and the caller removed it): release its pin and its bytes."""
        self._in_flight.remove(key)
        self.cache.policy.unpin(key)

    def in_flight(self, key: Key) -> bool:
        """Whether a read of ``key`` was handed out and not completed."""
        return key in self._in_flight

    @property
    def bytes_in_flight(self) -> int:
        """Bytes of the reads handed out and not completed."""
        return len(self._in_flight) * self.blob_bytes

    def __len__(self) -> int:
        """Queued (not yet handed out) requests."""
        return len(self._queued)

    def _push(self, key: Key, entry: _Entry) -> None:
        if key in self._in_flight or key in self.cache:
            return
        current = self._queued.get(key)
        if current is not None and (current.kind, -current.priority) <= (entry.kind, -entry.priority):
            return
        self._queued[key] = entry
        heapq.heappush(self._heap, (entry.kind, -entry.priority, next(self._order), key))
        if len(self._heap) > 4 * len(self._queued) + 64:
            self._compact()

    def _compact(self) -> None:
        """Rebuild the heap from the live entries (superseded and dropped ones accumulate lazily)."""
        live = {key: (entry.kind, -entry.priority) for key, entry in self._queued.items()}
        self._heap = [item for item in self._heap if live.get(item[3]) == item[:2]]
        heapq.heapify(self._heap)

    def _start(self, key: Key, demand: bool) -> Load:
        evicted = self.cache.admit(key)
        self.cache.policy.pin(key)
        self._in_flight.add(key)
        logger.debug("load %s (%s), evicting %s", key, "demand" if demand else "prefetch", evicted)
        return Load(key, evicted, demand)
