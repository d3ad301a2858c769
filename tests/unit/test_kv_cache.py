"""Paged block accounting, chained-hash prefix caching and slot mapping (no tensors)."""

import pytest

from engine.kv_cache import KVCacheManager, hash_block, position_to_slot, slot_index, slot_mapping
from engine.request import Request
from engine.sampling import SamplingParams

BS = 16


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams())


def prefill(kv: KVCacheManager, request: Request) -> None:
    """Admit and fully compute a request's tokens the way the scheduler does."""
    hit = kv.lookup_prefix(request)
    assert kv.allocate(request, request.num_tokens - hit.num_tokens, hit)
    request.num_computed_tokens = request.num_tokens
    kv.cache_computed_blocks(request)


def test_slot_mapping_helpers():
    assert slot_index(3, 5, BS) == 53
    table = [7, 2, 9]
    assert position_to_slot(table, 0, BS) == 112
    assert position_to_slot(table, 17, BS) == 33
    assert slot_mapping(table, 14, 4, BS) == [126, 127, 32, 33]


def test_hash_is_chained():
    a, b = list(range(16)), list(range(100, 116))
    assert hash_block(None, a) == hash_block(None, a)
    assert hash_block(hash_block(None, a), b) != hash_block(hash_block(None, b), b)
    assert hash_block(None, a) != hash_block(None, b)


def test_allocate_and_free_account_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    request = make_request("a", list(range(40)))
    assert kv.allocate(request, 40)
    assert len(request.block_table) == 3 and kv.num_free_blocks == 5
    assert kv.usage == pytest.approx(3 / 8)
    assert all(kv.ref_count(b) == 1 for b in request.block_table)
    kv.free(request)
    assert request.block_table == [] and kv.num_free_blocks == 8 and kv.usage == 0.0


def test_allocate_grows_only_at_block_boundaries_and_fails_without_change():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    request = make_request("a", list(range(16)))
    assert kv.allocate(request, 16)
    request.num_computed_tokens = 16
    assert kv.allocate(request, 1) and len(request.block_table) == 2
    request.num_computed_tokens = 17
    assert kv.allocate(request, 15) and len(request.block_table) == 2
    request.num_computed_tokens = 32
    table = list(request.block_table)
    assert not kv.allocate(request, 1)
    assert request.block_table == table and kv.num_free_blocks == 0


def test_same_prefix_shares_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    first = make_request("a", list(range(40)))
    prefill(kv, first)
    second = make_request("b", list(range(32)) + [999] * 5)
    hit = kv.lookup_prefix(second)
    assert hit.block_ids == first.block_table[:2] and hit.num_tokens == 32
    assert kv.allocate(second, 5, hit)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert [kv.ref_count(b) for b in first.block_table] == [2, 2, 1]


def test_different_earlier_block_means_no_hit_even_if_later_block_equal():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    prefill(kv, make_request("a", list(range(33))))
    other = make_request("b", [500] * 16 + list(range(16, 33)))
    assert kv.lookup_prefix(other).num_tokens == 0


def test_hit_leaves_the_last_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    prefill(kv, make_request("a", list(range(32))))
    same = make_request("b", list(range(32)))
    hit = kv.lookup_prefix(same)
    assert hit.num_tokens == 16 and hit.next_hash is None


def test_only_computed_blocks_are_published():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    first = make_request("a", list(range(48)))
    assert kv.allocate(first, 20)
    first.num_computed_tokens = 20
    kv.cache_computed_blocks(first)
    assert kv.lookup_prefix(make_request("b", list(range(48)))).num_tokens == 16


def test_cached_blocks_are_free_and_revived_by_a_hit():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    first = make_request("a", list(range(33)))
    prefill(kv, first)
    blocks = list(first.block_table)
    kv.free(first)
    assert kv.num_free_blocks == 4 and kv.usage == 0.0 and kv.num_cached_free_blocks == 2
    again = make_request("b", list(range(33)))
    prefill(kv, again)
    assert again.block_table[:2] == blocks[:2]
    assert kv.num_free_blocks == 1


def test_cached_blocks_are_evicted_lru_when_uncached_run_out():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    old = make_request("old", list(range(32)) + [1])
    prefill(kv, old)
    kv.free(old)
    big = make_request("big", [7] * 50)
    assert kv.allocate(big, 50)
    assert kv.num_free_blocks == 0 and kv.num_cached_free_blocks == 0
    kv.free(big)
    assert kv.lookup_prefix(make_request("c", list(range(32)) + [1])).num_tokens == 0


def test_tail_blocks_are_evicted_before_the_prefix():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    old = make_request("old", list(range(32)) + [1])
    prefill(kv, old)
    kv.free(old)
    assert kv.allocate(make_request("x", [7] * 40), 40)
    assert kv.lookup_prefix(make_request("c", list(range(32)) + [1])).num_tokens == 16


def test_prefix_caching_can_be_switched_off():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    first = make_request("a", list(range(40)))
    prefill(kv, first)
    assert kv.lookup_prefix(make_request("b", list(range(40)))).num_tokens == 0
    kv.free(first)
    assert kv.num_cached_free_blocks == 0 and kv.num_free_blocks == 10


def test_duplicate_computation_stays_private_and_all_blocks_free_afterwards():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    first, second = make_request("a", list(range(33))), make_request("b", list(range(33)))
    for request in (first, second):
        assert kv.allocate(request, 33)
    for request in (first, second):
        request.num_computed_tokens = 33
        kv.cache_computed_blocks(request)
    kv.free(first)
    kv.free(second)
    assert kv.num_free_blocks == 10
    assert kv.num_cached_free_blocks == 2
    assert all(kv.ref_count(b) == 0 for b in range(10))
