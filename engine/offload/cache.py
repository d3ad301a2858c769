"""Expert-cache policy: which experts stay resident and which one to evict. No tensors, no I/O.

Keys are ``(layer, expert, precision)`` tuples. A policy (`EvictionPolicy` and its subclasses) keeps the
bookkeeping a decision needs and answers `EvictionPolicy.victim`; `ExpertCache` bounds the number of resident
keys — per layer (``scope="layer"``) or across all layers (``scope="global"``) — and asks its policy for a
victim when a miss finds the partition full. The engine, the offline replay (engine/trace/replay.py) and the
tests drive these very objects, so a policy measured in replay is the policy that serves.

Rules every policy shares (in `EvictionPolicy.victim`): pinned keys are never victims; among the remaining
candidates, only those with the lowest priority (`EvictionPolicy.set_priorities`, default 0.0) are
considered; the policy's own rule then picks one, with the tie-breaks documented on each class.

Priorities for every key of a model come as a `PriorityTable` (the trace planner's, one float64 [L, E] array per
plan), and a global cache's victim is then found by `EvictionPolicy.victim_of_all` in a few numpy calls over the
policy's resident keys, which it keeps in index arrays as well as in a set; a dict of priorities or a per-layer
cache takes the plain scan over the candidates. The rules, and the victim, are the same either way.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

Key = tuple[int, int, str]
"""(layer, expert, precision)"""

Scope = Literal["layer", "global"]

POLICY_NAMES: tuple[str, ...] = ("lru", "lfu", "belady", "global-lru", "global-lfu", "global-belady")
"""Names accepted by `build_cache`: a rule, prefixed ``global-`` when all layers share one capacity."""

_GLOBAL_PREFIX = "global-"
INFINITY = float("inf")


VECTOR_VICTIM_KEYS = 128
"""`EvictionPolicy.victim_of_all` takes its numpy path from this many resident keys: on an AMD EPYC Zen 4 its ~12
us per call matched the scan's at 128 keys (4 us at 32, 46 us at 512, ~1.2 ms at 4,000)."""


class NoVictimError(RuntimeError):
    """Every candidate for eviction is pinned."""


class PriorityTable(Mapping[Key, float]):
    """Keep-priorities of every ``(layer, expert, precision)`` key of one ``precision``, read-only, from a float64
    [L, E] array ``values``; keys of another precision or outside the array are absent (a policy counts them 0.0).

    What `engine.trace.predictor.batch_priorities` hands the policies: no dict of ``L x E`` entries is built per
    plan, and `EvictionPolicy.victim_of_all` reads the priorities of every resident key in one call.
    """

    def __init__(self, values: np.ndarray, precision: str) -> None:
        self.values = values
        self.precision = precision
        self._num_layers, self._num_experts = values.shape
        self._rows: list[list[float]] | None = None  # values as lists, made on the first key read

    def __getitem__(self, key: Key) -> float:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: Key, default: float | None = None) -> float | None:
        """The priority of ``key``, or ``default`` if it is absent."""
        return self.values_of((key,), default)[0]

    def values_of(self, keys: Iterable[Key], default: float | None) -> list[float | None]:
        """The priorities of ``keys``, ``default`` where absent: a scan's reads, through ``values`` as nested lists
        (made once), with no numpy call or method call per key."""
        if self._rows is None:
            self._rows = self.values.tolist()
        rows, precision, num_layers, num_experts = self._rows, self.precision, self._num_layers, self._num_experts
        return [rows[layer][expert] if key_precision == precision and 0 <= layer < num_layers
                and 0 <= expert < num_experts else default for layer, expert, key_precision in keys]

    def __iter__(self) -> Iterator[Key]:
        num_layers, num_experts = self.values.shape
        return ((layer, expert, self.precision) for layer in range(num_layers) for expert in range(num_experts))

    def __len__(self) -> int:
        return self.values.size


class EvictionPolicy(ABC):
    """Base policy: tracks resident keys, pins and priorities; subclasses supply the eviction rule.

    Contract: `admit` a key when it becomes resident and `evict` it when it leaves; call `on_access` for every
    use of a key, resident or not, in execution order. Subclasses implement `on_access` and `_choose`.

    Resident keys are also kept in slots of index arrays (layer, expert, precision id, resident, pinned), for
    `victim_of_all`.
    """

    def __init__(self) -> None:
        self._resident: set[Key] = set()
        self._pins: Counter[Key] = Counter()
        self._priorities: Mapping[Key, float] = {}
        self._slot_of: dict[Key, int] = {}
        self._key_at: list[Key | None] = []  # [slots] the key in each slot, None where free
        self._free_slots: list[int] = []
        self._precision_ids: dict[str, int] = {}
        self._slot_layer = np.zeros(0, dtype=np.int64)  # [capacity of the arrays] per slot
        self._slot_expert = np.zeros(0, dtype=np.int64)
        self._slot_precision = np.zeros(0, dtype=np.int64)
        self._slot_live = np.zeros(0, dtype=bool)  # a resident key holds the slot
        self._slot_pinned = np.zeros(0, dtype=bool)

    def lookup(self, key: Key) -> bool:
        """Whether ``key`` is resident."""
        return key in self._resident

    @abstractmethod
    def on_access(self, key: Key, step: int, layer: int) -> None:
        """Record a use of ``key`` by engine step ``step`` at ``layer``."""

    def admit(self, key: Key) -> None:
        """``key`` became resident."""
        self._resident.add(key)
        if self._free_slots:
            slot = self._free_slots.pop()
            self._key_at[slot] = key
        else:
            slot = len(self._key_at)
            self._key_at.append(key)
            if slot == len(self._slot_live):
                self._grow_slots(max(16, 2 * slot))
        self._slot_of[key] = slot
        self._slot_layer[slot], self._slot_expert[slot] = key[0], key[1]
        self._slot_precision[slot] = self._precision_ids.setdefault(key[2], len(self._precision_ids))
        self._slot_live[slot] = True
        self._slot_pinned[slot] = key in self._pins

    def evict(self, key: Key) -> None:
        """``key`` left the cache; KeyError if it was not resident."""
        self._resident.remove(key)
        slot = self._slot_of.pop(key)
        self._key_at[slot] = None
        self._slot_live[slot] = False
        self._free_slots.append(slot)

    def _grow_slots(self, size: int) -> None:
        for name in ("_slot_layer", "_slot_expert", "_slot_precision", "_slot_live", "_slot_pinned"):
            old = getattr(self, name)
            new = np.zeros(size, dtype=old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def victim(self, candidates: Iterable[Key]) -> Key:
        """The candidate to evict: never a pinned one, one of the lowest priority, then the policy's rule.

        Raises NoVictimError when every candidate is pinned (or there is none).
        """
        eligible = [key for key in candidates if key not in self._pins] if self._pins else list(candidates)
        if not eligible:
            raise NoVictimError("no eviction candidate: every candidate is pinned, or none was given")
        if self._priorities:
            priorities = self._priorities_of(eligible)
            lowest = min(priorities)
            eligible = [key for key, priority in zip(eligible, priorities) if priority == lowest]
        return self._choose(eligible)

    def _priorities_of(self, keys: list[Key]) -> list[float]:
        """The priorities of ``keys`` (0.0 where absent), read without a method call per key."""
        table = self._priorities
        if isinstance(table, PriorityTable):
            return table.values_of(keys, 0.0)
        get = table.get
        return [get(key, 0.0) for key in keys]

    def victim_of_all(self) -> Key:
        """`victim` with every resident key a candidate (a global cache's choice). Under a `PriorityTable` and at
        least VECTOR_VICTIM_KEYS resident keys, the lowest priority among the unpinned ones is found in a few
        numpy calls over their slots and the policy's rule picks among the keys that have it; otherwise `victim`
        scans them."""
        table = self._priorities
        if not isinstance(table, PriorityTable) or len(self._resident) < VECTOR_VICTIM_KEYS:
            return self.victim(self._resident)
        used = len(self._key_at)
        eligible = self._slot_live[:used] & ~self._slot_pinned[:used]
        if not eligible.any():
            raise NoVictimError("no eviction candidate: every candidate is pinned, or none was given")
        layers, experts = self._slot_layer[:used], self._slot_expert[:used]
        num_layers, num_experts = table.values.shape
        listed = (eligible & (self._slot_precision[:used] == self._precision_ids.get(table.precision, -1))
                  & (layers < num_layers) & (experts < num_experts))
        priorities = np.zeros(used)  # absent keys count 0.0
        priorities[listed] = table.values[layers[listed], experts[listed]]
        priorities[~eligible] = np.inf
        lowest = np.flatnonzero(priorities == priorities.min())
        return self._choose([self._key_at[slot] for slot in lowest.tolist()])

    def pin(self, key: Key) -> None:
        """Protect ``key`` from eviction until a matching `unpin` (pins nest: two pins need two unpins)."""
        self._pins[key] += 1
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slot_pinned[slot] = True

    def unpin(self, key: Key) -> None:
        """Undo one `pin` of ``key``; ValueError if it is not pinned."""
        if self._pins[key] <= 0:
            raise ValueError(f"unpin of {key} which is not pinned")
        self._pins[key] -= 1
        if not self._pins[key]:
            del self._pins[key]
            slot = self._slot_of.get(key)
            if slot is not None:
                self._slot_pinned[slot] = False

    def set_priorities(self, priorities: Mapping[Key, float]) -> None:
        """Replace the keep-priorities (higher = keep longer; absent keys count 0.0). An empty map clears them. A
        `PriorityTable` is kept as it is (it is read-only); any other map is copied."""
        if not priorities:
            self._priorities = {}
        elif isinstance(priorities, PriorityTable):
            self._priorities = priorities
        else:
            self._priorities = dict(priorities)

    def priority(self, key: Key) -> float:
        """The keep-priority of ``key`` set by `set_priorities` (0.0 if it has none)."""
        return self._priorities.get(key, 0.0)

    @abstractmethod
    def _choose(self, candidates: list[Key]) -> Key:
        """The policy's rule over a non-empty list of unpinned, equal-priority candidates."""


class LRUPolicy(EvictionPolicy):
    """Least recently used: evicts the candidate whose last use is oldest.

    A use is an access or an admission; each ticks a logical clock, so two keys never tie. A candidate never
    used at all counts as older than any used one; among several such, the smallest key goes.
    """

    def __init__(self) -> None:
        super().__init__()
        self._clock = 0
        self._last_use: defaultdict[Key, int] = defaultdict(int)  # 0: never used

    def on_access(self, key: Key, step: int, layer: int) -> None:
        """Mark ``key`` as the most recently used."""
        self._touch(key)

    def admit(self, key: Key) -> None:
        """``key`` became resident; an admission counts as a use."""
        super().admit(key)
        self._touch(key)

    def _touch(self, key: Key) -> None:
        self._clock += 1
        self._last_use[key] = self._clock

    def _choose(self, candidates: list[Key]) -> Key:
        oldest = min(candidates, key=self._last_use.__getitem__)
        if self._last_use[oldest] == 0:
            return min(key for key in candidates if self._last_use[key] == 0)
        return oldest


class LFUPolicy(LRUPolicy):
    """Least frequently used: evicts the candidate with the fewest accesses; ties go to the least recently used.

    The frequency of a key counts every `on_access` since the policy was created, whether or not the key was
    resident, and survives eviction ("perfect" LFU); admissions do not count. Recency is LRU's clock.
    """

    def __init__(self) -> None:
        super().__init__()
        self._frequency: Counter[Key] = Counter()

    def on_access(self, key: Key, step: int, layer: int) -> None:
        """Count a use of ``key`` and mark it the most recently used."""
        self._frequency[key] += 1
        super().on_access(key, step, layer)

    def _choose(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda key: (self._frequency[key], self._last_use[key], key))


class BeladyPolicy(EvictionPolicy):
    """Belady's offline optimum (MIN): evicts the candidate whose next access lies farthest in the future.

    ``future`` is the complete access sequence that `on_access` will then follow, one call per element, in
    order (ValueError on any divergence). It may span several requests and all layers: the policy compares
    next uses of the candidates it is given, so the same object serves a per-layer and a global cache. Keys
    never accessed again tie at infinity; among them the smallest key goes (which one does not change the
    number of hits).
    """

    def __init__(self, future: Sequence[Key]) -> None:
        super().__init__()
        self._future = future
        self._cursor = 0
        self._following: list[float] = [INFINITY] * len(future)
        first: dict[Key, float] = {}
        for position in range(len(future) - 1, -1, -1):
            key = future[position]
            self._following[position] = first.get(key, INFINITY)
            first[key] = position
        # Next use of every key; an access moves its key's entry on, keys outside the future read infinity.
        self._next: defaultdict[Key, float] = defaultdict(lambda: INFINITY, first)

    def on_access(self, key: Key, step: int, layer: int) -> None:
        """Consume the next element of the future, which must be ``key``."""
        if self._cursor >= len(self._future) or self._future[self._cursor] != key:
            expected = self._future[self._cursor] if self._cursor < len(self._future) else "the end"
            raise ValueError(f"access {self._cursor} is {key}, but the known future has {expected}")
        self._next[key] = self._following[self._cursor]
        self._cursor += 1

    def next_use(self, key: Key) -> float:
        """Position in the future of the next access of ``key`` not yet consumed; infinity if none."""
        return self._next[key]

    def _choose(self, candidates: list[Key]) -> Key:
        farthest = max(candidates, key=self._next.__getitem__)
        if self._next[farthest] == INFINITY:
            return min(key for key in candidates if self._next[key] == INFINITY)
        return farthest


class CacheAccess(NamedTuple):
    """Outcome of `ExpertCache.access`: whether it hit, and which key (if any) the miss evicted."""

    hit: bool
    evicted: Key | None


class ExpertCache:
    """A capacity-bounded set of resident expert keys whose evictions ``policy`` decides.

    ``scope="layer"``: each layer holds at most ``capacity`` keys and evicts only among its own.
    ``scope="global"``: all layers together hold at most ``capacity`` keys.
    Residency must change only through the cache (not by calling the policy's `admit`/`evict` directly);
    pins and priorities go to ``cache.policy``.
    """

    def __init__(self, policy: EvictionPolicy, capacity: int, scope: Scope = "layer") -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        if scope not in ("layer", "global"):
            raise ValueError(f"cache scope must be 'layer' or 'global', got {scope!r}")
        self.policy = policy
        self.capacity = capacity
        self.scope = scope
        self._per_layer = scope == "layer"
        self._members: dict[int | None, set[Key]] = defaultdict(set)

    def access(self, key: Key, step: int) -> CacheAccess:
        """Use ``key`` in engine step ``step``: a hit, or a miss that admits it (demand paging).

        A miss in a full partition first evicts the policy's victim. If every resident key of the partition is
        pinned, NoVictimError is raised and nothing changes.
        """
        policy = self.policy
        members = self._members[key[0] if self._per_layer else None]
        hit = policy.lookup(key)
        evicted = None
        if not hit and len(members) >= self.capacity:
            evicted = policy.victim(members) if self._per_layer else policy.victim_of_all()
        policy.on_access(key, step, key[0])
        if evicted is not None:
            policy.evict(evicted)
            members.remove(evicted)
            logger.debug("evict %s for %s", evicted, key)
        if not hit:
            policy.admit(key)
            members.add(key)
        return CacheAccess(hit, evicted)

    def victim_for(self, key: Key) -> Key | None:
        """The key that admitting ``key`` now would evict: None if ``key`` is resident or its partition has room.

        Raises NoVictimError when the partition is full of pinned keys. Changes nothing.
        """
        members = self._members[key[0] if self._per_layer else None]
        if self.policy.lookup(key) or len(members) < self.capacity:
            return None
        return self.policy.victim(members) if self._per_layer else self.policy.victim_of_all()

    def admit(self, key: Key) -> Key | None:
        """Make a non-resident ``key`` resident without an access (a prefetch); returns the key it evicted.

        The victim is `victim_for`'s; the policy sees `admit` (LRU counts it as a use) but no `on_access`.
        ValueError if ``key`` is already resident; NoVictimError (nothing changed) if every member is pinned.
        """
        if self.policy.lookup(key):
            raise ValueError(f"admit of {key}, which is already resident")
        evicted = self.victim_for(key)
        members = self._members[key[0] if self._per_layer else None]
        if evicted is not None:
            self.policy.evict(evicted)
            members.remove(evicted)
            logger.debug("evict %s for prefetch of %s", evicted, key)
        self.policy.admit(key)
        members.add(key)
        return evicted

    def remove(self, key: Key) -> None:
        """Make a resident ``key`` non-resident outside any eviction (its load failed); KeyError if absent."""
        self._members[key[0] if self._per_layer else None].remove(key)
        self.policy.evict(key)

    def __contains__(self, key: Key) -> bool:
        return self.policy.lookup(key)

    def __len__(self) -> int:
        return sum(len(members) for members in self._members.values())


def build_cache(name: str, capacity: int, future: Sequence[Key] | None = None) -> ExpertCache:
    """The cache named ``name`` (one of POLICY_NAMES) with ``capacity`` keys per partition.

    ``capacity`` is per layer for a per-layer name and the total for a ``global-`` name. Belady policies need
    ``future``, the complete access sequence (see `BeladyPolicy`).
    """
    scope = policy_scope(name)
    rule = name.removeprefix(_GLOBAL_PREFIX)
    if rule == "belady":
        if future is None:
            raise ValueError(f"policy {name!r} is an offline optimum: it needs the future access sequence")
        return ExpertCache(BeladyPolicy(future), capacity, scope)
    policy = LRUPolicy() if rule == "lru" else LFUPolicy()
    return ExpertCache(policy, capacity, scope)


def policy_scope(name: str) -> Scope:
    """Whether the policy ``name`` bounds each layer (``"layer"``) or all layers together (``"global"``).

    ValueError if ``name`` is not one of POLICY_NAMES.
    """
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    return "global" if name.startswith(_GLOBAL_PREFIX) else "layer"
