"""Offline replay: run recorded routing traces through an expert cache and measure it (demand paging).

The access sequence — the conventions that reproduce the reference hit rates of tests/data/README.md exactly:

- Requests are replayed in the order given, through ONE cache (nothing is reset between them).
- Within a request, steps in order; within a step, layers 0..L-1; within a layer, the expert ids in the order
  the trace lists them (a prefill step's union is listed in ascending id order in the reference traces).
  Empty layers (dense or unrecorded) are skipped. Every listed id is one access (`ExpertCache.access`).
- The hit rate counts decode accesses only. Prefill accesses warm the cache — they load what misses, update
  LRU recency and LFU frequencies, and are part of Belady's future — but count neither as hits nor as misses.
- LFU frequencies count every access (prefill included) and survive eviction; ties go to the least recently
  used (`LFUPolicy`). Belady looks ahead over the whole sequence, across request boundaries (`BeladyPolicy`).
- Loads: every miss, prefill included, loads one expert blob; ``bytes_loaded`` counts them in blobs.

Capacity is ``slots_per_layer`` K (per-layer policies hold K per layer, global ones K * num_layers in all) or
``capacity`` N in total (per-layer policies hold N // num_layers per layer; N must be a positive multiple of
num_layers). Each result also carries per-layer Belady at the same slots and global Belady at the same total.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from engine.offload.cache import POLICY_NAMES, Key, build_cache, policy_scope
from engine.trace.format import RequestTrace, read_traces

logger = logging.getLogger(__name__)

DEFAULT_POLICY = "lru"
DEFAULT_SLOTS_PER_LAYER = 4
TRACE_PRECISION = "native"
"""Routing traces record no precision; replay keys every expert with this one."""

MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2
"""One Mixtral-8x7B expert (w1, w2, w3 of 4096 x 14336) in bfloat16: 352,321,536 bytes."""


@dataclass(frozen=True)
class ClockModel:
    """Modelled time under demand paging: a miss blocks its layer until the blob is read, reads run one at a time.

    So ``stall_seconds = loads * expert_load_seconds``, and the modelled run takes ``stall_seconds`` plus
    ``layer_compute_seconds`` per (step, layer) that uses experts (prefill layers cost the same as decode ones:
    the trace records no prompt length). Defaults: a Mixtral-8x7B bf16 expert read from disk at 1.5 GB/s
    (~0.235 s, DESIGN.md's 1-2 GB/s) and 35 ms per layer (a decode token's two experts streamed from RAM at
    ~20 GB/s), i.e. a miss costs ~13x the compute of the expert it feeds.
    """

    expert_bytes: int = MIXTRAL_EXPERT_BYTES
    load_bandwidth: float = 1.5e9
    layer_compute_seconds: float = 0.035

    @property
    def expert_load_seconds(self) -> float:
        """Seconds to read one expert blob."""
        return self.expert_bytes / self.load_bandwidth


class _Access(NamedTuple):
    """One use of one expert: its key, the running step index across requests, whether the step decodes."""

    key: Key
    step: int
    decode: bool


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
        over the layers; the prefetch keys are None until a prefetching policy exists (never a made-up 0)."""
        return {
            "hit_rate": self.hit_rate,
            "belady_hit_rate": self.belady_hit_rate,
            "global_belady_hit_rate": self.global_belady_hit_rate,
            "prefetch_precision": None,
            "prefetch_recall": None,
            "bytes_loaded": self.bytes_loaded,
            "stall_seconds": self.stall_seconds,
            "policy": self.policy,
            "capacity": self.capacity,
            "slots_per_layer": self.slots_per_layer,
            "num_layers": self.num_layers,
            "requests": self.requests,
            "decode_steps": self.decode_steps,
            "accesses": self.accesses,
            "hits": self.hits,
            "modelled_seconds": self.modelled_seconds,
            "per_layer_hit_rate": list(self.per_layer_hit_rate),
        }


def replay(
    requests: Sequence[RequestTrace],
    policy: str = DEFAULT_POLICY,
    slots_per_layer: int | None = None,
    capacity: int | None = None,
    clock: ClockModel = ClockModel(),
) -> ReplayResult:
    """Replay ``requests`` in order through one cache of policy ``policy`` (one of POLICY_NAMES).

    Give at most one of ``slots_per_layer`` and ``capacity`` (neither: DEFAULT_SLOTS_PER_LAYER). ValueError for
    an unknown policy, both or a non-positive capacity, a per-layer policy whose capacity is not a positive
    multiple of num_layers, requests of different layer/expert counts, or no decode access to measure.
    """
    num_layers = _shared_num_layers(requests)
    total = resolve_capacity(num_layers, slots_per_layer, capacity)
    accesses = _access_sequence(requests)
    tally = _simulate(policy, _partition_capacity(policy, total, num_layers), accesses, num_layers)
    belady = _baseline("belady", policy, tally, total, accesses, num_layers)
    global_belady = _baseline("global-belady", policy, tally, total, accesses, num_layers)
    stall = tally.loads * clock.expert_load_seconds
    logger.info("replayed %d accesses with %s at capacity %d: hit rate %.3f", len(accesses), policy, total,
                tally.hit_rate)
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
        modelled_seconds=stall + _computed_layers(requests) * clock.layer_compute_seconds,
        belady_hit_rate=belady.hit_rate if belady is not None else None,
        global_belady_hit_rate=global_belady.hit_rate,
        per_layer_hit_rate=tuple(hit / n if n else None for hit, n in zip(tally.hits, tally.accesses)),
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
    """Drive one fresh cache through ``accesses``; count decode hits/accesses per layer and all loads."""
    cache = build_cache(policy, partition_capacity, future=[access.key for access in accesses])
    hits = [0] * num_layers
    counted = [0] * num_layers
    loads = 0
    for access in accesses:
        hit = cache.access(access.key, access.step).hit
        loads += not hit
        if access.decode:
            layer = access.key[0]
            counted[layer] += 1
            hits[layer] += hit
    return CacheTally(hits=tuple(hits), accesses=tuple(counted), loads=loads)


def _access_sequence(requests: Sequence[RequestTrace]) -> list[_Access]:
    """Every expert use of ``requests``, in replay order (module docstring); steps numbered across requests.

    ValueError if none of them is a decode access (there would be no hit rate to measure).
    """
    accesses = []
    running_step = 0
    for request in requests:
        for step in request.steps:
            decode = step.phase == "decode"
            for layer, experts in enumerate(step.experts):
                accesses.extend(_Access((layer, expert, TRACE_PRECISION), running_step, decode) for expert in experts)
            running_step += 1
    if not any(access.decode for access in accesses):
        raise ValueError("the traces hold no decode access: there is no hit rate to measure")
    return accesses


def _computed_layers(requests: Sequence[RequestTrace]) -> int:
    """How many (step, layer) pairs use at least one expert."""
    return sum(1 for request in requests for step in request.steps for experts in step.experts if experts)


def _shared_num_layers(requests: Sequence[RequestTrace]) -> int:
    """The layer count all ``requests`` share (they replay through one cache); ValueError if none or mixed."""
    if not requests:
        raise ValueError("nothing to replay: no request traces")
    shapes = {(request.header.num_layers, request.header.num_experts) for request in requests}
    if len(shapes) > 1:
        raise ValueError(f"requests of different models cannot share a cache: (layers, experts) {sorted(shapes)}")
    return requests[0].header.num_layers


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``TRACE... [--policy NAME] [--slots-per-layer K | --capacity N] [--json]`` to ``parser``."""
    parser.add_argument("traces", nargs="+", type=Path, metavar="TRACE", help="routing trace files (JSONL), "
                        "replayed in order through one cache")
    parser.add_argument("--policy", choices=POLICY_NAMES, default=DEFAULT_POLICY,
                        help=f"eviction policy (default {DEFAULT_POLICY})")
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--slots-per-layer", type=int, metavar="K",
                          help=f"cache slots per layer (default {DEFAULT_SLOTS_PER_LAYER}); global policies "
                          "get K * num_layers in all")
    capacity.add_argument("--capacity", type=int, metavar="N",
                          help="cache slots in total; per-layer policies need a multiple of num_layers")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run_replay_command(args: argparse.Namespace) -> int:
    """Run ``moeserve replay`` with parsed ``args``: write a table (or JSON) to stdout; exit status 0.

    Unreadable or invalid traces and impossible capacities write ``moeserve replay: error: ...`` to stderr and
    return 2 (argparse's usage-error status).
    """
    try:
        requests = [request for path in args.traces for request in read_traces(path)]
        result = replay(requests, args.policy, args.slots_per_layer, args.capacity)
    except (OSError, ValueError) as error:
        sys.stderr.write(f"moeserve replay: error: {error}\n")
        return 2
    sys.stdout.write((json.dumps(result.to_json(), indent=2) if args.json else format_table(result)) + "\n")
    return 0


def format_table(result: ReplayResult) -> str:
    """A readable two-column summary of ``result``."""
    slots = f"{result.slots_per_layer} per layer, " if result.slots_per_layer is not None else ""
    rows = [
        ("policy", result.policy),
        ("capacity", f"{slots}{result.capacity} in total"),
        ("requests", f"{result.requests} ({result.decode_steps} decode steps, {result.accesses} decode accesses)"),
        ("hit rate", f"{result.hit_rate:.3f}"),
        ("per-layer Belady", _rate(result.belady_hit_rate)),
        ("global Belady", _rate(result.global_belady_hit_rate)),
        ("prefetch precision", "n/a (no prefetching policy)"),
        ("prefetch recall", "n/a (no prefetching policy)"),
        ("expert blobs loaded", str(result.bytes_loaded)),
        ("stall seconds", f"{result.stall_seconds:.1f} (modelled; run {result.modelled_seconds:.1f})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _rate(rate: float | None) -> str:
    return "n/a (capacity does not split over the layers)" if rate is None else f"{rate:.3f}"
