"""Offline replay: run recorded routing traces through an expert cache and measure it.

Two kinds of policy: the demand-paging ones of engine.offload.cache (POLICY_NAMES: an expert is read when a
layer needs it), and `PREDICTIVE_POLICY` (``"default"``, the engine's): a global cache whose priorities come
from engine.trace.predictor, with prefetches through engine.offload.prefetch and a modelled clock
(`ClockModel`, `_PredictiveReplay`), also behind the engine's prefetch gate (`GATED_POLICY`, ``"gated"``: the
policy as served) and, as an offline bound, fed the trace's own next visits instead of predictions
(`ORACLE_POLICY`, ``"oracle"``: the ceiling of prediction under that planner; ``"oracle-2"`` and
``"oracle-future"`` also know a key's visit after the next, or all of them: `ORACLE_VISITS`). Both kinds follow
the access sequence and counting conventions below — those that reproduce the reference hit rates of
tests/data/README.md exactly:

- Requests are replayed in the order given, through ONE cache (nothing is reset between them).
- Within a request, steps in order; within a step, layers 0..L-1; within a layer, the expert ids in the order
  the trace lists them (a prefill step's union is listed in ascending id order in the reference traces).
  Empty layers (dense or unrecorded) are skipped. Every listed id is one access (`ExpertCache.access`).
- The hit rate counts decode accesses only. Prefill accesses warm the cache — they load what misses, update
  LRU recency and LFU frequencies, and are part of Belady's future — but count neither as hits nor as misses.
- LFU frequencies count every access (prefill included) and survive eviction; ties go to the least recently
  used (`LFUPolicy`). Belady looks ahead over the whole sequence, across request boundaries (`BeladyPolicy`).
- Loads: every miss, prefill included, loads one expert blob; ``bytes_loaded`` counts them in blobs (with
  `PREDICTIVE_POLICY`, prefetches too). A prefetching replay predicts and prefetches during decode steps only.
- Warm-up (``warm_up``, ``--warm-up``): requests replayed before the scored ones through the same cache, store,
  statistics, prefetch queue and clock, counted nowhere — no hits, accesses, loads, prefetches or stall; the
  figures are those of a server that has already served them. Belady's future spans them too. A prefetch
  issued during the warm-up and used afterwards counts as a resident (or in-flight) expert, not a prefetch.
  Without warm-up requests every figure is exactly the cold replay's.
- Prompt stand-ins (`with_prompt_steps`, ``--prompt-steps``): the recorded traces keep a prompt only as one merged
  prefill line, so a request's first decode steps may stand in for the end of its prompt (phase ``"prompt"``, in
  memory only). A run of them replays as one prefill step — the union of their experts, as the engine's forward
  runs a prompt chunk — and then, as the engine does (engine.trace.batch), teaches the request's predictor each
  token's routing (`Predictor.observe_prompt`; not with ``learn_prompt=False``, the engine before). They are not
  decode steps: not scored.

Capacity is ``slots_per_layer`` K (per-layer policies hold K per layer, global ones K * num_layers in all) or
``capacity`` N in total (per-layer policies hold N // num_layers per layer; N must be a positive multiple of
num_layers). Each result also carries per-layer Belady at the same slots and global Belady at the same total.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from engine.offload.cache import POLICY_NAMES, ExpertCache, Key, LRUPolicy, NoVictimError, build_cache, policy_scope
from engine.offload.gate import PrefetchGate
from engine.offload.prefetch import Load, PrefetchQueue
from engine.trace.format import RequestTrace, TraceStep, read_traces
from engine.trace.planner import PrefetchPlanner, PrefetchSettings
from engine.trace.predictor import (
    DEFAULT_MAX_OFFSET,
    DEFAULT_MISS_STEPS,
    Predictor,
    RequestState,
    TransitionStatistics,
)

logger = logging.getLogger(__name__)

DEFAULT_POLICY = "lru"
PREDICTIVE_POLICY = "default"
"""The engine's default policy: global LRU under predicted priorities, with prefetch (`PrefetchSettings`)."""
GATED_POLICY = "gated"
"""The engine's policy as served: `PREDICTIVE_POLICY` behind the prefetch gate (engine.offload.gate), which lets
priorities and prefetch act only while they beat demand paging under LRU, the reader's busy share taken from the
modelled device."""
ORACLE_POLICY = "oracle"
"""`PREDICTIVE_POLICY` with the trace's own future for its predictor (`NextVisitOracle`): the same planner, cache,
prefetch queue and clock, fed 1 for every key the trace uses at its layer's next visit and 0 for the others. An
offline bound, like Belady: the most that a perfect prediction of the next visit gives under this planner."""
ORACLE_VISITS: dict[str, int | None] = {ORACLE_POLICY: 1, "oracle-2": 2, "oracle-future": None}
"""The oracle policies and how many of a key's visits each knows (None: every one). Beyond the next visit, an
oracle's priorities wait for a key's true next use instead of the planner's ``miss_steps`` (`NextVisitOracle.waits`):
how much knowing further ahead is worth to the same planner."""
REPLAY_POLICY_NAMES: tuple[str, ...] = (*POLICY_NAMES, PREDICTIVE_POLICY, GATED_POLICY, *ORACLE_VISITS)
DEFAULT_SLOTS_PER_LAYER = 4
TRACE_PRECISION = "native"
"""Routing traces record no precision; replay keys every expert with this one."""

MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2
"""One Mixtral-8x7B expert (w1, w2, w3 of 4096 x 14336) in bfloat16: 352,321,536 bytes."""


@dataclass(frozen=True)
class ClockModel:
    """Modelled time: one device reads blobs one after another at ``load_bandwidth``, in the order they were issued.

    Demand paging: a miss blocks its layer until the blob is read, so ``stall_seconds = loads *
    expert_load_seconds``, and the modelled run takes ``stall_seconds`` plus ``layer_compute_seconds`` per
    (step, layer) that uses experts (prefill layers cost the same as decode ones: the trace records no prompt
    length). With prefetch (`PREDICTIVE_POLICY`), at most ``max_bytes_in_flight`` bytes of reads are issued and
    unfinished at once; a layer starts when the last of its experts is read, and an expert counts as a hit only
    if its read finished before the layer arrived (a late prefetch is a miss that stalls less). Defaults: a
    Mixtral-8x7B bf16 expert read from disk at 1.5 GB/s (~0.235 s, DESIGN.md's 1-2 GB/s) and 35 ms per layer
    (a decode token's two experts streamed from RAM at ~20 GB/s), i.e. a miss costs ~13x the compute of the
    expert it feeds.
    """

    expert_bytes: int = MIXTRAL_EXPERT_BYTES
    load_bandwidth: float = 1.5e9
    layer_compute_seconds: float = 0.035
    max_bytes_in_flight: int = 2 * MIXTRAL_EXPERT_BYTES
    """Reads issued and not finished (the prefetching policy's bound; demand paging has one read at a time)."""

    @property
    def expert_load_seconds(self) -> float:
        """Seconds to read one expert blob."""
        return self.expert_bytes / self.load_bandwidth


class _Access(NamedTuple):
    """One use of one expert: its key, the running step index across requests, whether the step decodes, and
    whether it is counted (False: a warm-up request's)."""

    key: Key
    step: int
    decode: bool
    scored: bool = True


@dataclass(frozen=True)
class CacheTally:
    """What one simulated cache saw: decode hits and decode accesses per layer, blob loads over all phases."""

    hits: tuple[int, ...]
    accesses: tuple[int, ...]
    loads: int

    @property
    def hit_rate(self) -> float:
        """Decode hits over decode accesses, all layers together."""
        return sum(self.hits) / sum(self.accesses)


@dataclass(frozen=True)
class ReplayResult:
    """The measurements of one replay; `to_json` is the public contract (DESIGN.md, "Replay JSON keys")."""

    policy: str
    num_layers: int
    capacity: int
    requests: int
    decode_steps: int
    accesses: int
    hits: int
    bytes_loaded: int
    stall_seconds: float
    modelled_seconds: float
    belady_hit_rate: float | None
    global_belady_hit_rate: float
    per_layer_hit_rate: tuple[float | None, ...]
    prefetch_precision: float | None = None
    prefetch_recall: float | None = None
    prefetches: int = 0
    warm_up_requests: int = 0

    @property
    def hit_rate(self) -> float:
        """Decode hits over decode accesses."""
        return self.hits / self.accesses

    @property
    def slots_per_layer(self) -> int | None:
        """Total capacity per layer, when it divides evenly."""
        return self.capacity // self.num_layers if self.capacity % self.num_layers == 0 else None

    def to_json(self) -> dict[str, Any]:
        """The contract keys, then extras. ``belady_hit_rate`` is None when the capacity does not divide evenly
        over the layers; the prefetch keys are None for a policy that does not prefetch (never a made-up 0)."""
        return {
            "hit_rate": self.hit_rate,
            "belady_hit_rate": self.belady_hit_rate,
            "global_belady_hit_rate": self.global_belady_hit_rate,
            "prefetch_precision": self.prefetch_precision,
            "prefetch_recall": self.prefetch_recall,
            "bytes_loaded": self.bytes_loaded,
            "stall_seconds": self.stall_seconds,
            "policy": self.policy,
            "capacity": self.capacity,
            "slots_per_layer": self.slots_per_layer,
            "num_layers": self.num_layers,
            "requests": self.requests,
            "warm_up_requests": self.warm_up_requests,
            "decode_steps": self.decode_steps,
            "accesses": self.accesses,
            "hits": self.hits,
            "modelled_seconds": self.modelled_seconds,
            "prefetches": self.prefetches,
            "per_layer_hit_rate": list(self.per_layer_hit_rate),
        }


def replay(
    requests: Sequence[RequestTrace],
    policy: str = DEFAULT_POLICY,
    slots_per_layer: int | None = None,
    capacity: int | None = None,
    clock: ClockModel = ClockModel(),
    settings: PrefetchSettings | None = None,
    warm_up: Sequence[RequestTrace] = (),
    learn_prompt: bool = True,
) -> ReplayResult:
    """Replay ``requests`` in order through one cache of policy ``policy`` (one of REPLAY_POLICY_NAMES), after
    the uncounted ``warm_up`` requests (module docstring; ``learn_prompt``: whether prompt stand-ins teach the
    predictor their tokens).

    Give at most one of ``slots_per_layer`` and ``capacity`` (neither: DEFAULT_SLOTS_PER_LAYER). ``settings``
    tune `PREDICTIVE_POLICY` (default: `PrefetchSettings.for_read_time` of ``clock``'s read, in layers of
    compute). ValueError for an unknown policy, both or a non-positive capacity, a per-layer policy whose capacity
    is not a positive multiple of num_layers, requests (warm-up ones included) of different layer/expert counts,
    or no decode access to measure in ``requests``.
    """
    num_layers = _shared_num_layers([*warm_up, *requests])
    total = resolve_capacity(num_layers, slots_per_layer, capacity)
    accesses = _access_sequence(requests, warm_up)
    if policy in (PREDICTIVE_POLICY, GATED_POLICY, *ORACLE_VISITS):
        future = [*warm_up, *requests] if policy in ORACLE_VISITS else None
        tally = _PredictiveReplay(requests, total, clock, settings, gate=policy == GATED_POLICY, future=future,
                                  visits=ORACLE_VISITS.get(policy, 1), learn_prompt=learn_prompt).run(requests, warm_up)
        stall, modelled = tally.stall_seconds, tally.modelled_seconds
    else:
        tally = _simulate(policy, _partition_capacity(policy, total, num_layers), accesses, num_layers)
        stall = tally.loads * clock.expert_load_seconds
        modelled = stall + _computed_layers(requests) * clock.layer_compute_seconds
    belady = _baseline("belady", policy, tally, total, accesses, num_layers)
    global_belady = _baseline("global-belady", policy, tally, total, accesses, num_layers)
    logger.info("replayed %d accesses (%d warm-up requests first) with %s at capacity %d: hit rate %.3f",
                len(accesses), len(warm_up), policy, total, tally.hit_rate)
    prefetch = tally if isinstance(tally, PrefetchTally) else None
    return ReplayResult(
        policy=policy,
        num_layers=num_layers,
        capacity=total,
        requests=len(requests),
        decode_steps=sum(request.num_decode_steps for request in requests),
        accesses=sum(tally.accesses),
        hits=sum(tally.hits),
        bytes_loaded=tally.loads,
        stall_seconds=stall,
        modelled_seconds=modelled,
        belady_hit_rate=belady.hit_rate if belady is not None else None,
        global_belady_hit_rate=global_belady.hit_rate,
        per_layer_hit_rate=tuple(hit / n if n else None for hit, n in zip(tally.hits, tally.accesses)),
        prefetch_precision=prefetch.prefetch_precision if prefetch else None,
        prefetch_recall=prefetch.prefetch_recall if prefetch else None,
        prefetches=prefetch.prefetches if prefetch else 0,
        warm_up_requests=len(warm_up),
    )


def simulate(
    requests: Sequence[RequestTrace],
    policy: str = DEFAULT_POLICY,
    slots_per_layer: int | None = None,
    capacity: int | None = None,
) -> CacheTally:
    """The hit and load counts of ``policy`` alone over ``requests``: `replay` without baselines or clock.

    Same arguments, conventions and errors as `replay`.
    """
    num_layers = _shared_num_layers(requests)
    total = resolve_capacity(num_layers, slots_per_layer, capacity)
    return _simulate(policy, _partition_capacity(policy, total, num_layers), _access_sequence(requests), num_layers)


def resolve_capacity(num_layers: int, slots_per_layer: int | None, capacity: int | None) -> int:
    """The total number of slots: ``capacity``, else ``slots_per_layer`` (default 4) times ``num_layers``."""
    if slots_per_layer is not None and capacity is not None:
        raise ValueError("give either slots_per_layer or capacity, not both")
    if capacity is not None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        return capacity
    slots = DEFAULT_SLOTS_PER_LAYER if slots_per_layer is None else slots_per_layer
    if slots < 1:
        raise ValueError(f"slots_per_layer must be at least 1, got {slots}")
    return slots * num_layers


def _partition_capacity(policy: str, total: int, num_layers: int) -> int:
    """Slots per cache partition: ``total`` for a global policy, ``total // num_layers`` for a per-layer one."""
    if policy_scope(policy) == "global":
        return total
    if total % num_layers or total < num_layers:
        raise ValueError(
            f"per-layer policy {policy!r} splits the capacity evenly over the {num_layers} layers: "
            f"capacity {total} is not a positive multiple of {num_layers} (use --slots-per-layer, or a "
            f"global- policy)"
        )
    return total // num_layers


def _baseline(
    name: str, policy: str, tally: CacheTally, total: int, accesses: list[_Access], num_layers: int
) -> CacheTally | None:
    """The tally of Belady baseline ``name`` at the same total capacity (the replayed one if it is ``name``).

    None for per-layer Belady when ``total`` does not split evenly over the layers.
    """
    if name == policy:
        return tally
    if policy_scope(name) == "layer" and total % num_layers:
        return None
    return _simulate(name, _partition_capacity(name, total, num_layers), accesses, num_layers)


def _simulate(policy: str, partition_capacity: int, accesses: list[_Access], num_layers: int) -> CacheTally:
    """Drive one fresh cache through ``accesses``; count the scored ones' decode hits/accesses per layer and
    loads."""
    cache = build_cache(policy, partition_capacity, future=[access.key for access in accesses])
    hits = [0] * num_layers
    counted = [0] * num_layers
    loads = 0
    for access in accesses:
        hit = cache.access(access.key, access.step).hit
        if not access.scored:
            continue
        loads += not hit
        if access.decode:
            layer = access.key[0]
            counted[layer] += 1
            hits[layer] += hit
    return CacheTally(hits=tuple(hits), accesses=tuple(counted), loads=loads)


@dataclass(frozen=True)
class PrefetchTally(CacheTally):
    """`CacheTally` of a prefetching replay, with its prefetch counts and modelled times.

    ``prefetch_served``: decode accesses of a key a prefetch brought in (in time or late); ``demand_misses``:
    decode accesses that found the key neither resident nor in flight.
    """

    prefetches: int
    prefetches_used: int
    prefetch_served: int
    demand_misses: int
    stall_seconds: float
    modelled_seconds: float

    @property
    def prefetch_precision(self) -> float | None:
        """Prefetched experts accessed before their eviction over prefetches issued (None: none issued)."""
        return self.prefetches_used / self.prefetches if self.prefetches else None

    @property
    def prefetch_recall(self) -> float | None:
        """Decode accesses served by a prefetch over those that needed a load (None: none needed one)."""
        needed = self.prefetch_served + self.demand_misses
        return self.prefetch_served / needed if needed else None


class _ModelledDevice:
    """One read at a time, first issued first served, each ``load_seconds`` long."""

    def __init__(self, load_seconds: float) -> None:
        self.load_seconds = load_seconds
        self.done: dict[Key, float] = {}
        self._free_at = 0.0
        self._reads: list[tuple[float, float]] = []  # (start, end) of the reads not yet known to be in the past

    def start(self, key: Key, now: float) -> None:
        begin = max(now, self._free_at)
        self._free_at = begin + self.load_seconds
        self.done[key] = self._free_at
        self._reads.append((begin, self._free_at))

    def busy_seconds(self, begin: float, end: float) -> float:
        """How long the device was reading between ``begin`` and ``end``; forgets the reads over before ``begin``
        (the next call's ``begin`` must not be earlier)."""
        self._reads = [(start, stop) for start, stop in self._reads if stop > begin]
        return sum(max(0.0, min(stop, end) - max(start, begin)) for start, stop in self._reads)

    def finished(self, now: float) -> list[Key]:
        """The reads done by ``now``, earliest first; they leave the device."""
        keys = sorted((done, key) for key, done in self.done.items() if done <= now)
        for _, key in keys:
            del self.done[key]
        return [key for _, key in keys]


class _PredictiveReplay:
    """`PREDICTIVE_POLICY` over a trace: one global `ExpertCache` (LRU under the predictor's priorities), one
    `PrefetchQueue`, one `Predictor` (its store and statistics span the requests, warm-up ones included), one
    modelled device; with ``gate``, the engine's `PrefetchGate` over them (fed the modelled step and busy times)."""

    def __init__(self, requests: Sequence[RequestTrace], capacity: int, clock: ClockModel,
                 settings: PrefetchSettings | None = None, gate: bool = False,
                 future: Sequence[RequestTrace] | None = None, visits: int | None = 1,
                 learn_prompt: bool = True) -> None:
        """``settings`` None: `PrefetchSettings.for_read_time` of ``clock``'s read, in layers of compute.
        ``future``: every request the replay will run, in order (warm-up ones first): a `NextVisitOracle` over them
        that knows ``visits`` visits predicts instead of the `Predictor` and gives its waits to the plan
        (`ORACLE_VISITS`). ``learn_prompt``: prompt stand-ins teach the predictor their tokens
        (`with_prompt_steps`)."""
        self.learn_prompt = learn_prompt
        header = requests[0].header
        if settings is None:
            settings = PrefetchSettings.for_read_time(clock.expert_load_seconds / clock.layer_compute_seconds
                                                      if clock.layer_compute_seconds else float("inf"))
        self.num_layers = header.num_layers
        self.clock = clock
        self.settings = settings
        self.cache = ExpertCache(LRUPolicy(), capacity, scope="global")
        self.queue = PrefetchQueue(self.cache, clock.expert_bytes, clock.max_bytes_in_flight)
        self.gate = PrefetchGate(capacity, served=self.cache, flip_log_level=logging.DEBUG) if gate else None
        self.planner = PrefetchPlanner(self.cache, self.queue, header.num_layers, settings, TRACE_PRECISION,
                                       gate=self.gate)
        self.oracle = None if future is None else NextVisitOracle(future, visits, settings.miss_steps)
        if self.oracle is None:
            top_k = header.top_k or 2
            transitions = TransitionStatistics(header.num_layers, header.num_experts, max_offset=settings.max_offset,
                                               top_k=top_k)
            self.predictor = Predictor(header.num_layers, header.num_experts, top_k, settings.sources,
                                       transitions=transitions)
        else:
            self.predictor = self.oracle
        self.device = _ModelledDevice(clock.expert_load_seconds)
        self.now = 0.0
        self.step_index = 0
        self._start_counting()

    def run(self, requests: Sequence[RequestTrace], warm_up: Sequence[RequestTrace] = ()) -> PrefetchTally:
        """Replay ``warm_up`` then ``requests``; the tally counts ``requests`` alone (its times from their
        start)."""
        for request in warm_up:
            self._request(request)
        self._start_counting()
        started = self.now
        for request in requests:
            self._request(request)
        return PrefetchTally(hits=tuple(self.hits), accesses=tuple(self.accesses), loads=self.loads,
                             stall_seconds=self.stall, modelled_seconds=self.now - started, **self.counts)

    def _start_counting(self) -> None:
        """Zero every count (the cache, queue, predictor and device keep their state)."""
        self.stall = 0.0
        self.hits = [0] * self.num_layers
        self.accesses = [0] * self.num_layers
        self.loads = 0
        self.prefetched: set[Key] = set()  # resident by a counted prefetch, not accessed since
        self.counts = {"prefetches": 0, "prefetches_used": 0, "prefetch_served": 0, "demand_misses": 0}

    def _request(self, request: RequestTrace) -> None:
        """Replay one request's steps through the predictor, the cache and the clock."""
        state = self.predictor.new_request()
        for step, prompt in replay_steps(request):
            decode = step.phase == "decode"
            began, self._stall_at_step = self.now, self.stall
            self.predictor.begin_step(state, decode, predict=self.gate is None or self.gate.acting)
            for layer, experts in enumerate(step.experts):
                self._layer(state, self.step_index, layer, experts, decode)
            self.predictor.end_step(state)
            if prompt and self.learn_prompt:
                self.predictor.observe_prompt(state, [token.experts for token in prompt])
            self.step_index += 1
            if self.gate is not None:
                self._end_gated_step(began)
        self.predictor.finish(state)

    def _end_gated_step(self, began: float) -> None:
        """The gate sees the step's modelled time, stall and the device's busy time in it, as the engine's does."""
        self.gate.end_step(self.now - began, self.stall - self._stall_at_step,
                           self.device.busy_seconds(began, self.now))

    def _layer(self, state: RequestState, step: int, layer: int, experts: Sequence[int], decode: bool) -> None:
        """Run one layer: its accesses (stalling on reads), then the plan for what comes next, then its compute."""
        position = step * self.num_layers + layer
        self.queue.drop_stale(position)
        self._complete(self.now)
        keys = [(layer, expert, TRACE_PRECISION) for expert in experts]
        ready = self.now
        for key in keys:
            ready = max(ready, self._access(key, step, decode))
        self.stall += ready - self.now
        self.now = ready
        self._complete(self.now)
        self.predictor.observe_layer(state, layer, experts)
        for key in keys:
            self.cache.policy.pin(key)  # in use while it computes: no prefetch may take its slot
        if decode and state.predicting:
            self._plan(state, layer, position)
        for key in keys:
            self.cache.policy.unpin(key)
        if keys:
            self.now += self.clock.layer_compute_seconds

    def _access(self, key: Key, step: int, decode: bool) -> float:
        """Use ``key``: a hit, a late prefetch or a demand read; returns when its bytes are ready."""
        ready = self.now
        if self.gate is not None:
            self.gate.access(key, step, key in self.cache)
        if self.queue.in_flight(key):
            ready = self.device.done[key]
        elif key not in self.cache:
            ready = self._demand(key)
            self.counts["demand_misses"] += decode
        elif decode:
            self.hits[key[0]] += 1
        if key in self.prefetched:
            self.prefetched.remove(key)
            self.counts["prefetches_used"] += 1
            self.counts["prefetch_served"] += decode
        self.accesses[key[0]] += decode
        self.cache.access(key, step)
        return ready

    def _demand(self, key: Key) -> float:
        """Issue the on-demand read of ``key`` (waiting for reads in flight to free bytes or a slot)."""
        self.queue.push_demand(key)
        issue_time = self.now
        while not self.queue.in_flight(key):
            load = self.queue.next_load()
            if load is not None:
                self._start(load, issue_time)
                continue
            if not self.device.done:
                raise NoVictimError(f"no slot for {key}: every resident key is pinned (capacity too small)")
            issue_time = max(issue_time, min(self.device.done.values()))
            self._complete(issue_time)
        return self.device.done[key]

    def _plan(self, state: RequestState, layer: int, position: int) -> None:
        """Set the priorities from the prediction and queue the prefetches worth their slot; issue them."""
        wait = None if self.oracle is None else self.oracle.waits(state)
        self.planner.plan([self.predictor.predict(state)], layer + 1, position, None if wait is None else [wait])
        if self.gate is not None and not self.gate.prefetch_on:
            return  # what is queued waits and goes stale, as in the engine
        while (load := self.queue.next_load()) is not None:
            self._start(load, self.now)

    def _start(self, load: Load, now: float) -> None:
        self.device.start(load.key, now)
        self.loads += 1
        self.prefetched.discard(load.evicted)
        if not load.demand:
            self.prefetched.add(load.key)
            self.counts["prefetches"] += 1
            if self.gate is not None:
                self.gate.prefetch_read()

    def _complete(self, now: float) -> None:
        for key in self.device.finished(now):
            self.queue.complete(key)


class NextVisitOracle(Predictor):
    """A `Predictor` that knows the future: the requests the replay will run, in order. `predict` answers 1.0 for
    every key used at its layer's next visit — this step's for the layers the frontier has not passed, the next
    step's (the next request's first, after a request's last) for the others — and 0.0 for the rest.

    With ``visits`` > 1 (None: all of them) it also knows that many of each key's visits from the next one on:
    `waits` gives, for a key its next visit leaves unused, the steps from that visit to its true next use among
    the visits it knows (the `PrefetchPlanner.plan` waits); ``visits`` 1 knows none after the next, and every such
    key waits the planner's ``miss_steps``, as the `Predictor`'s predictions do.

    It learns nothing and uses no source; its steps must be begun in the order of ``requests`` (ValueError past
    their end). The `ORACLE_VISITS` policies replay the default planner with it: the ceiling of prediction under
    that planner.
    """

    def __init__(self, requests: Sequence[RequestTrace], visits: int | None = 1,
                 miss_steps: float = DEFAULT_MISS_STEPS) -> None:
        """``miss_steps``: the wait of a key unused at every visit known (at least ``visits``; default: the
        planner's)."""
        if visits is not None and visits < 1:
            raise ValueError(f"an oracle knows at least the next visit, got visits={visits}")
        header = requests[0].header
        super().__init__(header.num_layers, header.num_experts, header.top_k or 2, sources=())
        self._steps = [tuple(frozenset(experts) for experts in step.experts)
                       for request in requests for step, _ in replay_steps(request)]
        self.visits = visits
        self._begun = 0
        self._rows: list[list[float]] = []
        self._miss_steps = max(miss_steps, visits or 1)
        self._next_use: np.ndarray | None = None  # [steps + 1, L, E] the first step >= s using e at l
        if visits != 1:
            count = len(self._steps)
            next_use = np.full((count + 1, header.num_layers, header.num_experts), count + self._miss_steps)
            for step in range(count - 1, -1, -1):
                next_use[step] = next_use[step + 1]
                for layer, experts in enumerate(self._steps[step]):
                    next_use[step, layer, list(experts)] = step
            self._next_use = next_use

    def waits(self, state: RequestState) -> np.ndarray | None:
        """[L, E] steps from each key's next visit to its true use after it, for the keys that visit leaves
        unused, among the visits known (``max(miss_steps, visits)`` for those unused at every one; with every
        visit known, those never used again wait past the end of the future); None with ``visits`` 1 (the
        planner's ``miss_steps`` for all)."""
        if self._next_use is None:
            return None
        # each layer's next visit: the running step ahead of the frontier, the next one behind it
        running = self._begun - 1
        visit = np.where(np.arange(self.num_layers) < state.layers_seen, running + 1, running)  # [L]
        following = self._next_use[np.minimum(visit + 1, len(self._steps)), np.arange(self.num_layers)]  # [L, E]
        wait = following - visit[:, None]
        if self.visits is not None:
            wait = np.where(wait <= self.visits - 1, wait, self._miss_steps)
        return wait

    def begin_step(self, state: RequestState, decode: bool, predict: bool = True) -> None:
        """``state`` starts the next step of the known future: every layer's row is this step's use."""
        if self._begun >= len(self._steps):
            raise ValueError(f"step {self._begun} begun, but the known future has {len(self._steps)} steps")
        state.decode, state.layers_seen, state.predicting = decode, 0, predict
        self._rows = [self._row(self._begun, layer) for layer in range(self.num_layers)]
        self._begun += 1

    def observe_layer(self, state: RequestState, layer: int, experts: Sequence[int]) -> None:
        """``layer`` ran: its row turns to the next step's use."""
        if layer != state.layers_seen:
            raise ValueError(f"layer {layer} observed at frontier {state.layers_seen}: layers run in order")
        state.layers_seen = layer + 1
        self._rows[layer] = self._row(self._begun, layer)

    def end_step(self, state: RequestState) -> None:
        """Nothing to learn."""

    def observe_prompt(self, state: RequestState, tokens: Sequence[Sequence[Sequence[int]]]) -> None:
        """Nothing to learn."""

    def finish(self, state: RequestState) -> None:
        """Nothing to store."""

    def predict(self, state: RequestState) -> list[list[float]]:
        """1.0 where the key is used at its layer's next visit, else 0.0, [L][E]."""
        return self._rows

    def _row(self, step: int, layer: int) -> list[float]:
        used = self._steps[step][layer] if step < len(self._steps) else frozenset()
        return [1.0 if expert in used else 0.0 for expert in range(self.num_experts)]


def next_layer_recall(
    requests: Sequence[RequestTrace], sources: Sequence[str], predicted: int | None = None,
    max_offset: int = DEFAULT_MAX_OFFSET, warm_up: Sequence[RequestTrace] = (), learn_prompt: bool = True,
) -> float:
    """Share of decode experts at layers 1..L-1 found among the ``predicted`` (default 2 * top_k) most probable
    experts that `Predictor` with ``sources`` gave after the layer before ran (no source: the per-layer
    frequency baseline): `layer_recall` at distance 1 (same arguments and errors)."""
    return layer_recall(requests, sources, (1,), predicted, max_offset, warm_up, learn_prompt)[1]


def layer_recall(
    requests: Sequence[RequestTrace], sources: Sequence[str], distances: Sequence[int] = (1,),
    predicted: int | None = None, max_offset: int = DEFAULT_MAX_OFFSET, warm_up: Sequence[RequestTrace] = (),
    learn_prompt: bool = True,
) -> dict[int, float]:
    """{d: share of decode experts at layers d..L-1 found among the ``predicted`` (default 2 * top_k) most
    probable experts that `Predictor` with ``sources`` gave for their layer after the layer d before it ran} for
    each distance d of ``distances`` (d = 1: the next layer; no source: the per-layer frequency baseline). The
    ``warm_up`` requests, then ``requests``, run in order through one predictor (one store, one set of
    statistics); only ``requests`` are counted.

    Prompt stand-ins (`with_prompt_steps`) run as one prefill step, not scored, and with ``learn_prompt`` teach
    the request their tokens (module docstring).

    ValueError for a distance outside 1..L-1, if ``requests`` hold no decode step, or if the requests (warm-up
    ones included) differ in their layer/expert counts.
    """
    _shared_num_layers([*warm_up, *requests])
    header = requests[0].header
    if any(not 1 <= distance < header.num_layers for distance in distances):
        raise ValueError(f"distances must be in 1..{header.num_layers - 1}, got {list(distances)}")
    top_k = header.top_k or 2
    count = 2 * top_k if predicted is None else predicted
    predictor = Predictor(header.num_layers, header.num_experts, top_k, sources,
                          transitions=TransitionStatistics(header.num_layers, header.num_experts, max_offset,
                                                           top_k=top_k))
    found = dict.fromkeys(distances, 0)
    total = dict.fromkeys(distances, 0)
    for scored, request in _in_order(warm_up, requests):
        state = predictor.new_request()
        for step, prompt in replay_steps(request):
            decode = step.phase == "decode"
            predictor.begin_step(state, decode)
            for layer, experts in enumerate(step.experts):
                if scored and decode and layer:  # the frontier is ``layer``: layers 0..layer-1 ran
                    for distance in distances:
                        target = layer + distance - 1
                        if target >= header.num_layers:
                            continue
                        row = predictor.predict(state)[target].tolist()
                        best = sorted(range(len(row)), key=lambda expert: (-row[expert], expert))[:count]
                        found[distance] += len(set(best) & set(step.experts[target]))
                        total[distance] += len(step.experts[target])
                predictor.observe_layer(state, layer, experts)
            predictor.end_step(state)
            if prompt and learn_prompt:
                predictor.observe_prompt(state, [token.experts for token in prompt])
        predictor.finish(state)
    if not all(total.values()):
        raise ValueError("the traces hold no decode step: there is no recall to measure")
    return {distance: found[distance] / total[distance] for distance in distances}


PROMPT_PHASE = "prompt"
"""The in-memory phase of a decode step standing in for a prompt's token (`with_prompt_steps`)."""


def with_prompt_steps(requests: Sequence[RequestTrace], steps: int) -> list[RequestTrace]:
    """``requests`` with each one's first ``steps`` decode steps turned into prompt stand-ins (phase PROMPT_PHASE,
    in memory only; module docstring). ValueError if ``steps`` < 0."""
    if steps < 0:
        raise ValueError(f"prompt steps must be >= 0, got {steps}")
    prompted = []
    for request in requests:
        left, converted = steps, []
        for step in request.steps:
            if step.phase == "decode" and left > 0:
                step = dataclasses.replace(step, phase=PROMPT_PHASE)
                left -= 1
            converted.append(step)
        prompted.append(RequestTrace(request.header, tuple(converted)))
    return prompted


def replay_steps(request: RequestTrace) -> Iterator[tuple[TraceStep, tuple[TraceStep, ...]]]:
    """The steps a replay runs, each with the prompt stand-ins it stands for: a run of them as one prefill step
    (the union of their experts per layer, ascending) with the run, every other step as it is with ()."""
    run: list[TraceStep] = []
    for step in (*request.steps, None):
        if step is not None and step.phase == PROMPT_PHASE:
            run.append(step)
            continue
        if run:
            union = tuple(tuple(sorted({expert for token in run for expert in token.experts[layer]}))
                          for layer in range(len(run[0].experts)))
            yield TraceStep(run[0].step, "prefill", union), tuple(run)
            run = []
        if step is not None:
            yield step, ()


def _access_sequence(requests: Sequence[RequestTrace], warm_up: Sequence[RequestTrace] = ()) -> list[_Access]:
    """Every expert use of ``warm_up`` (not scored), then of ``requests``, in replay order (module docstring);
    steps numbered across requests.

    ValueError if none of ``requests``' is a decode access (there would be no hit rate to measure).
    """
    accesses = []
    running_step = 0
    for scored, request in _in_order(warm_up, requests):
        for step, _ in replay_steps(request):
            decode = step.phase == "decode"
            for layer, experts in enumerate(step.experts):
                accesses.extend(_Access((layer, expert, TRACE_PRECISION), running_step, decode, scored)
                                for expert in experts)
            running_step += 1
    if not any(access.decode and access.scored for access in accesses):
        raise ValueError("the traces hold no decode access: there is no hit rate to measure")
    return accesses


def _in_order(warm_up: Sequence[RequestTrace],
              requests: Sequence[RequestTrace]) -> Iterator[tuple[bool, RequestTrace]]:
    """``(scored, request)``: the warm-up requests (False), then the scored ones (True)."""
    for request in warm_up:
        yield False, request
    for request in requests:
        yield True, request


def _computed_layers(requests: Sequence[RequestTrace]) -> int:
    """How many (step, layer) pairs use at least one expert."""
    return sum(1 for request in requests for step, _ in replay_steps(request) for experts in step.experts if experts)


def _shared_num_layers(requests: Sequence[RequestTrace]) -> int:
    """The layer count all ``requests`` share (they replay through one cache); ValueError if none or mixed."""
    if not requests:
        raise ValueError("nothing to replay: no request traces")
    shapes = {(request.header.num_layers, request.header.num_experts) for request in requests}
    if len(shapes) > 1:
        raise ValueError(f"requests of different models cannot share a cache: (layers, experts) {sorted(shapes)}")
    return requests[0].header.num_layers


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``TRACE... [--warm-up TRACE...] [--policy NAME] [--slots-per-layer K | --capacity N] [--prompt-steps N]
    [--json]`` and the clock's ``[--load-bandwidth B] [--layer-compute-seconds S] [--loads-in-flight N]`` to
    ``parser``."""
    parser.add_argument("traces", nargs="+", type=Path, metavar="TRACE", help="routing trace files (JSONL), "
                        "replayed in order through one cache")
    parser.add_argument("--warm-up", nargs="+", type=Path, default=[], metavar="TRACE",
                        help="trace files replayed first through the same cache, store and statistics, not "
                        "counted: the figures of a server that has already served them")
    parser.add_argument("--policy", choices=REPLAY_POLICY_NAMES, default=DEFAULT_POLICY,
                        help=f"eviction policy (default {DEFAULT_POLICY}); {PREDICTIVE_POLICY!r} is the engine's: "
                        f"predicted priorities and prefetch over a global cache; {GATED_POLICY!r} the same behind "
                        f"the prefetch gate, as served; {ORACLE_POLICY!r} the same fed the trace's own next visits "
                        "(an offline bound, like belady), 'oracle-2' its next two visits, 'oracle-future' all")
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--slots-per-layer", type=int, metavar="K",
                          help=f"cache slots per layer (default {DEFAULT_SLOTS_PER_LAYER}); global policies "
                          "get K * num_layers in all")
    capacity.add_argument("--capacity", type=int, metavar="N",
                          help="cache slots in total; per-layer policies need a multiple of num_layers")
    parser.add_argument("--prompt-steps", type=int, default=0, metavar="N",
                        help="each request's first N decode steps stand in for the end of its prompt: replayed as "
                        "one prefill step, learned token by token by the predictor, not scored (default 0)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    clock = parser.add_argument_group("modelled clock")
    clock.add_argument("--load-bandwidth", type=float, default=ClockModel.load_bandwidth, metavar="BYTES_PER_S",
                       help=f"expert reads (default {ClockModel.load_bandwidth:g}, a disk)")
    clock.add_argument("--layer-compute-seconds", type=float, default=ClockModel.layer_compute_seconds,
                       metavar="S", help=f"compute per layer (default {ClockModel.layer_compute_seconds})")
    clock.add_argument("--loads-in-flight", type=int, default=ClockModel.max_bytes_in_flight // MIXTRAL_EXPERT_BYTES,
                       metavar="N", help="expert reads issued and unfinished at most (default %(default)s)")


def run_replay_command(args: argparse.Namespace) -> int:
    """Run ``moeserve replay`` with parsed ``args``: write a table (or JSON) to stdout; exit status 0.

    Unreadable or invalid traces and impossible capacities write ``moeserve replay: error: ...`` to stderr and
    return 2 (argparse's usage-error status).
    """
    try:
        requests = with_prompt_steps([request for path in args.traces for request in read_traces(path)],
                                     args.prompt_steps)
        warm_up = with_prompt_steps([request for path in args.warm_up for request in read_traces(path)],
                                    args.prompt_steps)
        result = replay(requests, args.policy, args.slots_per_layer, args.capacity, clock_from_arguments(args),
                        warm_up=warm_up)
    except (OSError, ValueError) as error:
        sys.stderr.write(f"moeserve replay: error: {error}\n")
        return 2
    sys.stdout.write((json.dumps(result.to_json(), indent=2) if args.json else format_table(result)) + "\n")
    return 0


def clock_from_arguments(args: argparse.Namespace) -> ClockModel:
    """The `ClockModel` of parsed replay arguments; ValueError for a non-positive value."""
    if args.load_bandwidth <= 0 or args.layer_compute_seconds < 0 or args.loads_in_flight < 1:
        raise ValueError("--load-bandwidth and --loads-in-flight must be positive, --layer-compute-seconds >= 0")
    return ClockModel(load_bandwidth=args.load_bandwidth, layer_compute_seconds=args.layer_compute_seconds,
                      max_bytes_in_flight=args.loads_in_flight * ClockModel.expert_bytes)


def format_table(result: ReplayResult) -> str:
    """A readable two-column summary of ``result``."""
    slots = f"{result.slots_per_layer} per layer, " if result.slots_per_layer is not None else ""
    rows = [
        ("policy", result.policy),
        ("capacity", f"{slots}{result.capacity} in total"),
        ("requests", f"{result.requests} ({result.decode_steps} decode steps, {result.accesses} decode accesses)"
                     + (f" after {result.warm_up_requests} warm-up" if result.warm_up_requests else "")),
        ("hit rate", f"{result.hit_rate:.3f}"),
        ("per-layer Belady", _rate(result.belady_hit_rate)),
        ("global Belady", _rate(result.global_belady_hit_rate)),
        ("prefetch precision", _share(result.prefetch_precision)),
        ("prefetch recall", _share(result.prefetch_recall)),
        ("expert blobs loaded", str(result.bytes_loaded)),
        ("stall seconds", f"{result.stall_seconds:.1f} (modelled; run {result.modelled_seconds:.1f})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _share(share: float | None) -> str:
    return "n/a (no prefetching policy)" if share is None else f"{share:.3f}"


def _rate(rate: float | None) -> str:
    return "n/a (capacity does not split over the layers)" if rate is None else f"{rate:.3f}"
