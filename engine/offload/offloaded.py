"""Experts served from a prepared store through a byte-budgeted cache: the offload-mode weight source.

``OffloadedExperts`` implements ``ExpertWeightSource`` (engine.offload.experts): when the experts forward asks
to ``hold`` a group of a layer's routed experts, each one is looked up in the cache *policy*
(``engine.offload.cache.ExpertCache``, global LRU over all layers); a miss takes a free slot or the policy's
victim's slot and is read from disk by the *mechanism* (``engine.offload.tiers``), several reads in flight;
the group is pinned while it computes and unpinned when the forward leaves the context. A blob's checksum is
verified the first time it is loaded. Counters (hits, misses, bytes read, stall time, per layer) are kept here
and reported by ``LLM.stats()``.

The budget is ``expert_cache_bytes``: ``budget // slot_bytes`` slots, where a slot holds the largest blob of the
store. Below ``top_k`` slots a layer cannot hold one token's experts, so start-up is refused with the minimum.

Two levels (``device`` given: a GPU in serving, any torch device in tests): the slots above live on ``device``
(the tier the forward computes from) and a ``HostTier`` of ``host_budget_bytes // slot_bytes`` host slots
(pinned for a GPU) sits between them and the disk, with its own ``ExpertCache`` (global LRU). A device miss that
hits the host tier is one host-to-device copy; a miss in both is a disk read into a host slot (the key pinned in
the host policy while the read is in flight), verified there on its first load, then the copy. Copies go
through ``engine.offload.tiers.HostToDevice`` (on a GPU a copy stream and events: the forward's stream waits for
a slot's copy before it computes, a host slot is not overwritten while a copy reads it). Each load in flight
holds a host slot until its copy is issued, so prefetches in flight are also bounded by ``host slots - top_k``
and a group by ``host slots - prefetches in flight``: the host tier's minimum is ``top_k`` slots too.

Prefetch goes through one `PrefetchQueue` (engine.offload.prefetch) over the same cache: `prefetch(layer, ids,
priority)` (the experts forward's gate look-ahead) and the trace planner (engine.trace.planner, which also sets
the policy's priorities) queue requests; `pump` hands them to the reader while bytes in flight allow. The queue
admits a prefetched key at once (evicting the policy's victim, never a pinned slot, never one the predictor
values more than the prefetch) and pins it while its read is in flight; the reaper completes it when the read
has landed. At most ``num_slots - top_k`` (and MAX_PREFETCH_IN_FLIGHT) reads are in flight, so a demand group
always finds victims once in-flight reads are drained — which ``hold`` does, waiting, only when every other slot
is pinned. Queued prefetches for a layer the forward has reached are dropped as stale. A demand use of a
prefetched expert is a hit (``prefetch_used``; the forward waits if its read is still in flight, counted as
stall); a prefetched expert evicted before any use is ``prefetch_wasted``.

With ``gate`` (``expert_prefetch_gate``, the default when anything prefetches) a `PrefetchGate`
(engine.offload.gate) shadows the cache with demand-only LRU (and, under a planner, prioritized) caches fed the
same accesses, and every few steps decides whether prefetch reads start at all and whether the planner's
priorities act on the cache: both only while they beat on-demand LRU. ``begin_step`` / ``end_step`` bracket each
forward so the gate knows the step time, the stall in it, how much of it the reader was busy and the CPU time
its reads took.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.offload.cache import ExpertCache, Key, LRUPolicy, NoVictimError
from engine.offload.experts import LAYER_ATTRIBUTE, ExpertWeights
from engine.offload.gate import PrefetchGate
from engine.offload.layout import BlobEntry, ExpertStore, StoreError
from engine.offload.prefetch import PrefetchQueue
from engine.offload.tiers import (
    BlobReader,
    HostToDevice,
    ReadMode,
    ReadRequest,
    SlotArena,
    choose_read_mode,
    host_to_device,
)

logger = logging.getLogger(__name__)

PRECISION = "native"
MAX_PREFETCH_IN_FLIGHT = 8


LANDED: Future = Future()
"""The future of a load with nothing left to wait for (a host-tier hit: its copy is issued at once)."""
LANDED.set_result(None)


class BudgetTooSmall(ValueError):
    """``expert_cache_bytes`` (or ``host_cache_bytes``) cannot hold one token's routed experts of a layer."""


STALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds (seconds) of the stall histogram's buckets; a last, unbounded bucket follows."""


@dataclass
class StallHistogram:
    """Durations of the forward's waits on expert reads, one observation per group that waited."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(STALL_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[next((i for i, bound in enumerate(STALL_BUCKETS) if seconds <= bound), len(STALL_BUCKETS))] += 1
        self.total += seconds

    def snapshot(self) -> dict:
        """{"buckets": upper bounds, "counts": per bucket (the last unbounded), "sum": seconds, "count": waits}."""
        return {"buckets": list(STALL_BUCKETS), "counts": list(self.counts), "sum": self.total,
                "count": sum(self.counts)}


@dataclass
class OffloadStats:
    """Counters since start-up. ``per_layer_*`` are indexed by decoder layer (dense layers stay 0)."""

    num_layers: int
    hits: int = 0
    misses: int = 0
    disk_bytes_read: int = 0
    host_hits: int = 0  # two levels: device misses the host tier served, and those it did not
    host_misses: int = 0
    host_bytes_copied: int = 0
    stall_seconds: float = 0.0
    stalls: StallHistogram = field(default_factory=StallHistogram)
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    per_layer_hits: list[int] = field(default_factory=list)
    per_layer_misses: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.per_layer_hits = [0] * self.num_layers
        self.per_layer_misses = [0] * self.num_layers


def minimum_budget(store: ExpertStore, top_k: int) -> int:
    """The smallest ``expert_cache_bytes`` (and ``host_cache_bytes``) that serves the store: ``top_k`` slots of
    its largest blob."""
    return top_k * store.max_blob_bytes


def default_host_budget(store: ExpertStore, top_k: int) -> int:
    """``host_cache_bytes`` when a GPU is present and it is unset: ``2 * top_k + MAX_PREFETCH_IN_FLIGHT`` blobs —
    staging for a demand group of ``top_k`` beside a full prefetch window, and ``top_k`` more as a small
    second-level cache."""
    return (2 * top_k + MAX_PREFETCH_IN_FLIGHT) * store.max_blob_bytes


def _check_budget(key: str, budget_bytes: int, store: ExpertStore, top_k: int) -> None:
    """BudgetTooSmall naming ``key`` and the minimum when ``budget_bytes`` holds fewer than ``top_k`` blobs."""
    needed = minimum_budget(store, top_k)
    if budget_bytes < needed:
        raise BudgetTooSmall(
            f"{key}={budget_bytes} is below the minimum of {needed} bytes for this model "
            f"(top_k {top_k} x the largest expert blob, {store.max_blob_bytes} bytes)"
        )


class HostTier:
    """The second level of a two-level cache: host slots where disk reads land and device copies start.

    ``cache`` (global LRU) decides which blobs stay; the owner pins a key while its disk read is in flight, so a
    slot is never a victim before its copy to the device was issued. ``slot_of`` and ``free_slots`` account for
    every slot.
    """

    def __init__(self, num_slots: int, slot_bytes: int, pinned: bool) -> None:
        self.arena = SlotArena(num_slots, slot_bytes, pinned=pinned)
        self.cache = ExpertCache(LRUPolicy(), capacity=num_slots, scope="global")
        self.slot_of: dict[Key, int] = {}
        self.free_slots = list(range(num_slots - 1, -1, -1))

    @property
    def num_slots(self) -> int:
        return self.arena.num_slots

    @property
    def resident_bytes(self) -> int:
        """Bytes of host slots holding blobs now."""
        return len(self.slot_of) * self.arena.slot_bytes

    def claim(self, key: Key, evicted: Key | None) -> int:
        """The slot for ``key``, just admitted to ``cache`` (evicting ``evicted``): the victim's or a free one."""
        slot = self.slot_of.pop(evicted) if evicted is not None else self.free_slots.pop()
        self.slot_of[key] = slot
        return slot

    def forget(self, key: Key) -> None:
        """Drop a key whose slot holds no valid blob: out of the policy, its slot back to the free list."""
        self.cache.remove(key)
        self.free_slots.append(self.slot_of.pop(key))


class OffloadedExperts:
    """A byte-budgeted cache of expert blobs in front of an ``ExpertStore``. One model thread uses it.

    ``device`` None: one tier of ``budget_bytes`` in host RAM (a CPU machine). A torch device: ``budget_bytes`` of
    slots on ``device``, the tier the forward computes from, in front of a ``HostTier`` of ``host_budget_bytes``
    (None: ``default_host_budget``), pinned when ``device`` is a GPU. BudgetTooSmall below ``top_k`` blobs.
    ``gate``: decide online whether prefetch and priorities act (module docstring); False: they always do.
    """

    def __init__(self, store: ExpertStore, budget_bytes: int, top_k: int, read_mode: ReadMode | None = None,
                 device: torch.device | str | None = None, host_budget_bytes: int | None = None,
                 gate: bool = False) -> None:
        slot_bytes = store.max_blob_bytes
        _check_budget("expert_cache_bytes", budget_bytes, store, top_k)
        total_experts = sum(store.num_experts.values())
        num_slots = min(budget_bytes // slot_bytes, total_experts)
        self.store = store
        self.arena = SlotArena(num_slots, slot_bytes, device or "cpu")
        self.cache = ExpertCache(LRUPolicy(), capacity=num_slots, scope="global")
        self.host: HostTier | None = None
        self.copier: HostToDevice | None = None
        if device is not None:
            host_budget = default_host_budget(store, top_k) if host_budget_bytes is None else host_budget_bytes
            _check_budget("host_cache_bytes", host_budget, store, top_k)
            self.host = HostTier(min(host_budget // slot_bytes, total_experts), slot_bytes,
                                 pinned=self.arena.device.type == "cuda")
            self.copier = host_to_device(self.host.arena, self.arena)
        self._staging: set[Key] = set()  # two levels: disk reads into host slots whose device copy is not issued
        self.stats = OffloadStats(store.num_layers)
        self._slot_of: dict[Key, int] = {}
        self._views: dict[Key, ExpertWeights] = {}  # typed views into each resident key's slot, made on first use
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._verified: set[Key] = set()
        self._loading: dict[Key, Future] = {}  # prefetch reads in flight (their keys pinned by the queue)
        self._prefetched_unused: set[Key] = set()
        self.prefetch_limit = min(MAX_PREFETCH_IN_FLIGHT, num_slots - top_k)
        if self.host is not None:
            self.prefetch_limit = min(self.prefetch_limit, self.host.num_slots - top_k)
        self.queue = PrefetchQueue(self.cache, slot_bytes, max(self.prefetch_limit, 1) * slot_bytes)
        self._step = 0
        self.gate = PrefetchGate(num_slots, served=self.cache) if gate and self.prefetch_limit >= 1 else None
        self._step_began: tuple[float, float, float, float] | None = None  # clock, stall, reader busy and CPU
        first = store.blob(store.moe_layers[0], 0, PRECISION)
        mode = read_mode or choose_read_mode(first.file, self._probe_offsets(first.file), first.padded_nbytes,
                                             self.read_arena)
        self.reader = BlobReader(mode)
        logger.info("expert cache: %d slots of %d bytes on %s (%.1f%% of %d experts)%s, %s reads",
                    num_slots, slot_bytes, self.arena.device, 100 * num_slots / total_experts, total_experts,
                    f" over {self.host.num_slots} host slots" if self.host else "", mode.value)

    @property
    def num_slots(self) -> int:
        """Slots of the tier the forward computes from."""
        return self.arena.num_slots

    @property
    def read_arena(self) -> SlotArena:
        """The slots disk reads land in: the host tier's with two levels, else the cache's own."""
        return self.host.arena if self.host is not None else self.arena

    def cache_bytes(self) -> dict[str, int]:
        """Bytes of slots holding expert blobs now, per tier: {"host"} on one level, {"device", "host"} on two."""
        resident = len(self._slot_of) * self.arena.slot_bytes
        if self.host is None:
            return {"host": resident}
        return {"device": resident, "host": self.host.resident_bytes}

    def bytes_read(self) -> dict[str, int]:
        """Expert bytes loaded, by the tier they came from: {"disk"}, and {"host"} (copied to the device) on two
        levels."""
        if self.host is None:
            return {"disk": self.stats.disk_bytes_read}
        return {"disk": self.stats.disk_bytes_read, "host": self.stats.host_bytes_copied}

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model (dense ones included): positions count ``step * num_layers + layer``."""
        return self.store.num_layers

    def begin_step(self) -> None:
        """Mark the start of an engine step (the clock the policy sees)."""
        self._step += 1
        if self.gate is not None:
            self._step_began = (time.perf_counter(), self.stats.stall_seconds, self.reader.busy_seconds,
                                self.reader.cpu_seconds)

    def end_step(self) -> None:
        """Mark the end of the step's forward: the gate gets its time, the stall, the reader's busy time and the
        CPU its reads took in it, and may decide (priorities it turns off it clears from the cache at once)."""
        if self.gate is None or self._step_began is None:
            return
        began, stall, busy, cpu = self._step_began
        self._step_began = None
        self.gate.end_step(time.perf_counter() - began, self.stats.stall_seconds - stall,
                           self.reader.busy_seconds - busy, self.reader.cpu_seconds - cpu)

    def position(self, layer: int) -> int:
        """The position of ``layer`` in this step, the unit prefetch targets are given in."""
        return self._step * self.num_layers + layer

    def max_group_size(self, layer: int | None) -> int:
        """At most every slot at once: a group's experts are all pinned while it computes. With two levels, also
        at most the host slots a prefetch window leaves: each of the group's loads stages through one."""
        if self.host is None:
            return self.num_slots
        return min(self.num_slots, self.host.num_slots - self.prefetch_limit)

    @contextmanager
    def hold(self, experts: nn.Module, layer: int | None, expert_ids: Sequence[int]) -> Iterator[list[ExpertWeights]]:
        """Make ``expert_ids`` of ``layer`` resident and pinned; yield their weights as views into their slots."""
        if layer is None:
            raise RuntimeError("offloaded experts need the layer index tagged on every experts module")
        keys = [(layer, expert, PRECISION) for expert in expert_ids]
        loads: list[tuple[Key, Future]] = []
        pinned: list[Key] = []
        self.queue.drop_stale(self.position(layer))
        self._reap_prefetches(block=False)
        try:
            for key in keys:
                future = self._demand_access(key)
                self.cache.policy.pin(key)
                pinned.append(key)
                if future is not None:
                    loads.append((key, future))
            self._finish_loads(loads)
            if self.copier is not None:
                for key in keys:
                    self.copier.ready(self._slot_of[key])
            yield [self._weights(key) for key in keys]
        finally:
            for key in pinned:
                self.cache.policy.unpin(key)
            if self.copier is not None:
                self.copier.release([self._slot_of[key] for key in pinned if key in self._slot_of])

    def prefetch(self, layer: int, expert_ids: Sequence[int], priority: float = 1.0) -> None:
        """Queue prefetches of ``expert_ids`` of ``layer`` (needed at its next visit in this step) and start
        what the in-flight limit allows; never blocks."""
        if self.prefetch_limit < 1 or (self.gate is not None and not self.gate.prefetch_on):
            return
        target = self.position(layer)
        for expert in expert_ids:
            self.queue.push_prefetch((layer, expert, PRECISION), priority, target)
        self.pump()

    def pump(self) -> int:
        """Start the queued reads that may start now (in queue order, within the in-flight limit); how many."""
        if self.prefetch_limit < 1:
            return 0
        self._reap_prefetches(block=False)
        if self.gate is not None and not self.gate.prefetch_on:
            return 0  # what is queued waits and goes stale
        started = 0
        while (load := self.queue.next_load()) is not None:
            self._loading[load.key] = self._load_into_slot(load.key, load.evicted)
            self._prefetched_unused.add(load.key)
            self.stats.prefetch_issued += 1
            if self.gate is not None:
                self.gate.prefetch_read()
            started += 1
        return started

    def _demand_access(self, key: Key) -> Future | None:
        """A use of ``key`` by the forward: a hit (waiting on its prefetch read if in flight) or a miss that
        claims a slot and starts the read. Returns the future to wait on, if any."""
        layer = key[0]
        hit = key in self.cache
        if self.gate is not None:
            self.gate.access(key, self._step, hit)
        if hit:
            self.cache.access(key, self._step)
            self.stats.hits += 1
            self.stats.per_layer_hits[layer] += 1
            if key in self._prefetched_unused:
                self._prefetched_unused.discard(key)
                self.stats.prefetch_used += 1
            return self._loading.get(key)
        self.stats.misses += 1
        self.stats.per_layer_misses[layer] += 1
        try:
            return self._admit(key)
        except NoVictimError:
            self._reap_prefetches(block=True)  # every other slot is pinned by reads in flight: let them land
            return self._admit(key)

    def _admit(self, key: Key) -> Future:
        """Make ``key`` resident in the policy (a demand access), claim its slot and start its read (urgent).

        Raises NoVictimError, changing nothing, when the cache is full and every member is pinned."""
        return self._load_into_slot(key, self.cache.access(key, self._step).evicted, urgent=True)

    def _load_into_slot(self, key: Key, evicted: Key | None, urgent: bool = False) -> Future:
        """``key`` was just made resident (evicting ``evicted``): take the victim's slot or a free one and start
        filling it — a disk read into it (``urgent``: ahead of queued prefetch reads) or, with two levels,
        ``_stage``. The future completes when the bytes are ready to land (``_land``)."""
        if evicted is not None:
            slot = self._slot_of.pop(evicted)
            self._views.pop(evicted, None)
            if evicted in self._prefetched_unused:
                self._prefetched_unused.discard(evicted)
                self.stats.prefetch_wasted += 1
        else:
            slot = self._free_slots.pop()
        self._slot_of[key] = slot
        if self.host is not None:
            return self._stage(key, urgent)
        entry = self.store.blob(*key)
        request = ReadRequest(entry.file, entry.offset, entry.padded_nbytes, self.arena.slot(slot))
        return self.reader.submit(request, urgent=urgent)

    def _stage(self, key: Key, urgent: bool) -> Future:
        """Two levels: fill ``key``'s device slot from the host tier. A host hit issues the copy now (the future
        returned is already done); a host miss claims a host slot (the policy's victim's, once no copy reads it
        any more), pins the key there and starts the disk read into it; ``_land`` issues the copy.

        A host victim always exists: pins there are the loads in flight, fewer than the host slots (the bounds
        on groups and prefetches in the module docstring)."""
        host = self.host
        access = host.cache.access(key, self._step)
        if access.hit:
            self.stats.host_hits += 1
            self._copy_to_device(key)
            return LANDED
        self.stats.host_misses += 1
        host_slot = host.claim(key, access.evicted)
        self.copier.reuse_host(host_slot)
        host.cache.policy.pin(key)
        self._staging.add(key)
        entry = self.store.blob(*key)
        request = ReadRequest(entry.file, entry.offset, entry.padded_nbytes, host.arena.slot(host_slot))
        return self.reader.submit(request, urgent=urgent)

    def _copy_to_device(self, key: Key) -> None:
        """Issue the copy of ``key``'s blob from its host slot into its device slot; a staged key's host pin is
        released (the copier keeps the host slot from being overwritten until the copy has run)."""
        entry = self.store.blob(*key)
        self.copier.copy(self.host.slot_of[key], self._slot_of[key], entry.padded_nbytes)
        self.stats.host_bytes_copied = self.copier.bytes_copied
        if key in self._staging:
            self._staging.discard(key)
            self.host.cache.policy.unpin(key)

    def _reap_prefetches(self, block: bool) -> None:
        """Unpin prefetched keys whose reads finished (all of them, waiting, with ``block``); a failed or corrupt
        read is forgotten and logged — the forward will read it again on demand and report the error there."""
        for key, future in list(self._loading.items()):
            if not (block or future.done()):
                continue
            error = self._land(key, future)
            if error is not None:
                logger.warning("prefetch of expert %d of layer %d failed: %s", key[1], key[0], error)
                self._prefetched_unused.discard(key)
                self._forget(key)
        self.stats.disk_bytes_read = self.reader.bytes_read

    def _land(self, key: Key, future: Future) -> OSError | StoreError | None:
        """Wait for ``key``'s read, verify a first load and, with two levels, issue the copy of a staged key to
        the device; a prefetch's in-flight pin is released. Returns the read's or the checksum's error instead
        of raising it (the caller decides what a failure means)."""
        if self._loading.pop(key, None) is not None:
            self.queue.complete(key)
        try:
            future.result()
            self._verify_first_load(key)
        except (OSError, StoreError) as error:
            return error
        if key in self._staging:
            self._copy_to_device(key)
        return None

    def _finish_loads(self, loads: list[tuple[Key, Future]]) -> None:
        """Wait for the group's reads (the wait is stall time); verify first loads; drop keys whose load failed.

        A key whose read was a prefetch still in flight is waited on here and then handed back to the reaper's
        bookkeeping (unpinned once: the forward's own pin keeps it for the group)."""
        start = time.perf_counter()
        failed = [(key, error) for key, future in loads if (error := self._land(key, future)) is not None]
        if loads:
            waited = time.perf_counter() - start
            self.stats.stall_seconds += waited
            self.stats.stalls.observe(waited)
        self.stats.disk_bytes_read = self.reader.bytes_read
        for key, _ in failed:
            self._forget(key)
        if failed:
            key, error = failed[0]
            raise StoreError(f"loading expert {key[1]} of layer {key[0]} failed: {error}") from error

    def _verify_first_load(self, key: Key) -> None:
        """Check the crc32 of ``key``'s blob where its disk read landed, the first time it is loaded."""
        if key not in self._verified:
            slot = self.host.slot_of[key] if self.host is not None else self._slot_of[key]
            self.store.verify(self.store.blob(*key), self.read_arena.slot(slot))
            self._verified.add(key)

    def _forget(self, key: Key) -> None:
        """Drop a key whose slot holds no valid blob: out of the policy, its slot back to the free list; a staged
        key's host slot too."""
        self.cache.remove(key)
        self._free_slots.append(self._slot_of.pop(key))
        self._views.pop(key, None)
        if key in self._staging:
            self._staging.discard(key)
            self.host.cache.policy.unpin(key)
            self.host.forget(key)

    def _weights(self, key: Key) -> ExpertWeights:
        """``key``'s weights as views into its slot: made once while it stays resident in that slot (a decode step
        asks for each routed expert of every layer; building the views is Python the forward need not repeat)."""
        weights = self._views.get(key)
        if weights is None:
            entry: BlobEntry = self.store.blob(*key)
            views = self.store.view(entry, self.arena.slot(self._slot_of[key]))
            weights = self._views[key] = ExpertWeights(
                gate_up=views["gate_up"], down=views["down"],
                gate_up_bias=views.get("gate_up_bias"), down_bias=views.get("down_bias"),
            )
        return weights

    def _probe_offsets(self, file) -> list[int]:
        """Offsets of two blobs in ``file`` for the read-mode probe (from different layers where possible)."""
        offsets = []
        for layer in (self.store.moe_layers[0], self.store.moe_layers[-1]):
            entry = self.store.blob(layer, self.store.num_experts[layer] - 1, PRECISION)
            if entry.file == file and entry.offset not in offsets:
                offsets.append(entry.offset)
        return offsets

    def drain(self) -> None:
        """Wait for the prefetch reads in flight to land (their pins released, their bytes counted) and, with two
        levels, for the copies issued."""
        self._reap_prefetches(block=True)
        if self.copier is not None:
            self.copier.synchronize()

    def close(self) -> None:
        """Release the reader's files and threads (after the reads in flight land)."""
        self.drain()
        self.reader.close()


def expert_tensors_on_meta(model: nn.Module) -> bool:
    """True when every experts module's stacked parameters live on the meta device (nothing resident)."""
    stacks = [module.gate_up_proj for module in model.modules() if hasattr(module, LAYER_ATTRIBUTE)]
    return bool(stacks) and all(t.device == torch.device("meta") for t in stacks)
