"""Paged KV-cache block accounting with prefix caching. Pure: block ids and counts, no tensors.

The runner owns the storage: per layer a key and a value tensor of `num_blocks * block_size` slots (for
example shaped [num_blocks, block_size, num_kv_heads, head_dim]). Token position p of a request lives in
block `block_table[p // block_size]` at offset `p % block_size`, i.e. flat slot `slot_index(...)`; the pure
helpers below compute that mapping.

Prefix caching: full blocks are identified by chained hashes, sha256(parent hash + the block's token ids), so
a block matches only if every earlier token matches too. A block is published (hash -> block) only after its
KV has been computed (`cache_computed_blocks`, called by the scheduler after a step), so a cache hit never
points at KV that is still being written. Partial blocks are never shared, so no block is ever written by
two requests.

Free means reference count 0. Free blocks are either never-cached (handed out first, FIFO) or cached but
unreferenced (kept for future hits; reused least-recently-freed first when the never-cached ones run out,
which drops their hash). `usage` counts referenced blocks only.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.request import Request

DEFAULT_BLOCK_SIZE = 16
BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash of one full block: depends on the block's tokens and, through `parent`, all earlier ones."""
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def slot_index(block_id: int, offset: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Flat slot of (block, offset) in a cache of `num_blocks * block_size` slots."""
    return block_id * block_size + offset


def position_to_slot(block_table: Sequence[int], position: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Flat slot holding the KV of token `position` of a sequence with this block table."""
    return slot_index(block_table[position // block_size], position % block_size, block_size)


def slot_mapping(
    block_table: Sequence[int], start: int, num_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> list[int]:
    """Flat slots of positions start .. start + num_tokens - 1 (where a step writes its new K/V)."""
    return [position_to_slot(block_table, p, block_size) for p in range(start, start + num_tokens)]


@dataclass(frozen=True)
class PrefixHit:
    """The cached full blocks that cover a request's leading tokens (references not taken yet)."""

    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    next_hash: BlockHash | None = None
    """Hash of the first cacheable block after the hit (None if there is none): if a request scheduled in this
    step computes that block, waiting one step turns it into a hit."""


class KVCacheManager:
    """Hands out KV blocks to requests and keeps every reference accounted for.

    Use per request: `lookup_prefix` (new or resumed requests only) -> `allocate` each step before the step
    runs -> `cache_computed_blocks` after it ran -> `free` when the request finishes or is preempted.
    """

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._num_published: dict[str, int] = {}

    @property
    def num_total_blocks(self) -> int:
        return len(self._ref_counts)

    @property
    def num_free_blocks(self) -> int:
        """Blocks with reference count 0, cached-but-unreferenced ones included."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a published prefix (reusable by a hit)."""
        return len(self._free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def lookup_prefix(self, request: Request) -> PrefixHit:
        """Longest run of published blocks matching the request's leading full blocks.

        At most `num_tokens - 1` tokens are matched, so the last token is always recomputed (its logits are
        sampled). For a request that already holds blocks, or with prefix caching off, the hit is empty.
        """
        if not self.enable_prefix_caching or request.block_table:
            return PrefixHit()
        hashes = self._sync_hashes(request)[: (request.num_tokens - 1) // self.block_size]
        hit: list[int] = []
        for block_hash in hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hit.append(block_id)
        next_hash = hashes[len(hit)] if len(hit) < len(hashes) else None
        return PrefixHit(hit, len(hit) * self.block_size, next_hash)

    def allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Extend `request.block_table` to hold its computed tokens, the hit and `num_new_tokens` more.

        Takes a reference on each hit block and fresh blocks for the rest. Returns False, changing nothing,
        if there are not enough free blocks. The caller accounts the hit's tokens as computed.
        """
        hit = hit or PrefixHit()
        total = request.num_computed_tokens + hit.num_tokens + num_new_tokens
        num_fresh = self.blocks_for_tokens(total) - len(request.block_table) - len(hit.block_ids)
        revived = sum(1 for b in hit.block_ids if self._ref_counts[b] == 0)
        if max(num_fresh, 0) + revived > self.num_free_blocks:
            return False
        for block_id in hit.block_ids:
            self._acquire_cached(block_id)
        request.block_table.extend(hit.block_ids)
        request.block_table.extend(self._pop_free() for _ in range(num_fresh))
        self._num_published.setdefault(request.request_id, len(hit.block_ids))
        return True

    def pending_hashes(self, request: Request, num_new_tokens: int) -> list[BlockHash]:
        """Hashes of the blocks that become full once `num_new_tokens` more tokens of `request` are computed."""
        if not self.enable_prefix_caching:
            return []
        first = request.num_computed_tokens // self.block_size
        last = (request.num_computed_tokens + num_new_tokens) // self.block_size
        return self._sync_hashes(request)[first:last]

    def cache_computed_blocks(self, request: Request) -> None:
        """Publish the request's full blocks whose KV is now computed (call after num_computed_tokens grew).

        A block whose hash is already published (another request computed the same prefix) stays private.
        """
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        hashes = self._sync_hashes(request)
        for i in range(self._num_published.get(request.request_id, 0), num_full):
            block_id = request.block_table[i]
            if self._block_hash[block_id] is None and hashes[i] not in self._cached:
                self._block_hash[block_id] = hashes[i]
                self._cached[hashes[i]] = block_id
        self._num_published[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Drop the request's references; its block table becomes empty. Tail blocks are reused first."""
        for block_id in reversed(request.block_table):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._release(block_id)
        request.block_table.clear()
        self._num_published.pop(request.request_id, None)

    def _sync_hashes(self, request: Request) -> list[BlockHash]:
        """Extend `request.block_hashes` to cover every full block of its tokens; return it."""
        hashes, size = request.block_hashes, self.block_size
        for i in range(len(hashes), request.num_tokens // size):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, request.all_token_ids[i * size : (i + 1) * size]))
        return hashes

    def _acquire_cached(self, block_id: int) -> None:
        if self._ref_counts[block_id] == 0:
            del self._free_cached[block_id]
        self._ref_counts[block_id] += 1

    def _pop_free(self) -> int:
        if self._free_uncached:
            block_id = self._free_uncached.popleft()
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            del self._cached[self._block_hash[block_id]]
            self._block_hash[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id

    def _release(self, block_id: int) -> None:
        if self._block_hash[block_id] is None:
            self._free_uncached.append(block_id)
        else:
            self._free_cached[block_id] = None
