"""Offload mode: experts on the meta device, read from a prepared store through a byte-budgeted cache.

For every demo architecture, greedy tokens of a batch equal the all-resident engine's at budgets of 100 %, 50 %
and the minimum (top_k blobs), with misses at 50 % and the minimum and exact byte accounting. A corrupted blob is
an error naming file, layer and expert; a budget below the minimum is refused with the number.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from engine.models.demo import ARCHITECTURES
from engine.offload.gate import MAX_WINDOW_GROWTH, WINDOW_STEPS
from engine.offload.layout import ExpertStore, ensure_store
from engine.offload.offloaded import BudgetTooSmall, expert_tensors_on_meta, minimum_budget
from engine.trace.batch import ADAPT_EVERY
from engine.trace.planner import PrefetchSettings
from offload_runs import (  # pytest puts tests/integration on sys.path
    checksum_error, engine_for, flip_a_byte, generate,
)

pytestmark = pytest.mark.slow


def budgets(store: ExpertStore, top_k: int) -> dict[str, int]:
    slot = store.max_blob_bytes
    experts = sum(store.num_experts.values())
    return {"100%": experts * slot, "50%": (experts // 2) * slot, "minimum": minimum_budget(store, top_k)}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_offloaded_greedy_equals_resident_at_every_budget(
    arch: str, demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = demo_model(arch)
    expected = generate(engine_for(model_dir))
    store = ensure_store(model_dir, tmp_path)
    blobs = [store.blob(layer, e) for layer in store.moe_layers for e in range(store.num_experts[layer])]
    assert {blob.padded_nbytes for blob in blobs} == {store.max_blob_bytes}, "equal slots: bytes = misses x slot"
    for name, budget in budgets(store, _top_k(model_dir)).items():
        engine = engine_for(model_dir, expert_cache_bytes=budget, offload_dir=str(tmp_path))
        assert expert_tensors_on_meta(engine.runner.model)
        assert generate(engine) == expected, f"{arch} at {name} of the experts"
        offload = engine.offload
        offload.drain()
        stats = engine.stats()
        assert stats["expert_hits"] + stats["expert_misses"] > 0
        reads = stats["expert_misses"] + stats["expert_prefetch_issued"]
        assert stats["expert_bytes_read"]["disk"] == reads * store.max_blob_bytes
        assert stats["expert_prefetch_used"] + stats["expert_prefetch_wasted"] <= stats["expert_prefetch_issued"]
        assert sum(stats["per_layer"]["misses"]) == stats["expert_misses"]
        stalls = stats["expert_stall_histogram"]
        assert stalls["count"] > 0 and abs(stalls["sum"] - stats["expert_stall_seconds"]) < 1e-9
        assert sum(stats["per_layer"]["hits"]) == stats["expert_hits"]
        assert stats["expert_cache_bytes"]["host"] <= budget
        assert not offload.cache.policy._pins, "nothing stays pinned once the reads in flight landed"
        if name == "100%":
            assert reads == len(offload._verified), "with every expert fitting, each is read once"
        else:
            assert reads > len(offload._verified), f"{arch} at {name}: evictions caused re-reads"
        if name == "minimum":
            assert stats["expert_prefetch_issued"] == 0, "no slot to spare for prefetch at the minimum budget"
        else:
            assert stats["expert_prefetch_issued"] > 0 and stats["expert_prediction_recall"] is not None
        engine.close()
        assert not offload.cache.policy._pins and not offload._loading, "close lands every read in flight"
        assert len(offload._free_slots) + len(offload._slot_of) == offload.num_slots, "every slot accounted"


def test_the_prefetch_gate_judges_every_window_and_while_off_nothing_is_predicted_or_prefetched(
    demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = demo_model("mixtral")
    expected = generate(engine_for(model_dir))
    store = ensure_store(model_dir, tmp_path)
    engine = engine_for(model_dir, expert_cache_bytes=budgets(store, _top_k(model_dir))["50%"],
                        offload_dir=str(tmp_path))
    offload, gate = engine.offload, engine.offload.gate
    assert gate is not None and gate.prefetch_on and gate.priorities_on and gate.prioritized is not None
    outputs = [generate(engine) for _ in range(3)]
    assert outputs == [expected] * 3
    snapshot = engine.stats()["expert_prefetch_gate"]
    windows = snapshot["windows_on"] + snapshot["windows_off"]
    assert 1 <= windows <= offload._step // WINDOW_STEPS
    last = snapshot["last_window"]
    assert WINDOW_STEPS <= last["steps"] <= MAX_WINDOW_GROWTH * WINDOW_STEPS and 0.0 <= last["busy"] <= 1.0
    assert last["lru_misses"] > 0 and last["prioritized_misses"] is not None
    # As after a window where both lost, with the next retry far off: nothing acts.
    gate.prefetch_on = gate.priorities_on = False
    gate.retry_after = 1000
    offload.cache.policy.set_priorities({})
    before, planned = engine.stats(), engine.prefetcher.prefetches_planned
    assert generate(engine) == expected
    after = engine.stats()
    assert after["expert_prefetch_issued"] == before["expert_prefetch_issued"]
    assert after["expert_misses"] > before["expert_misses"], "demand reads still happen"
    assert engine.prefetcher.prefetches_planned == planned and not offload.cache.policy._priorities
    assert not gate.prefetch_on and not gate.priorities_on
    engine.close()
    ungated = engine_for(model_dir, expert_cache_bytes=budgets(store, _top_k(model_dir))["50%"],
                         offload_dir=str(tmp_path), expert_prefetch_gate=False)
    assert ungated.offload.gate is None and ungated.stats()["expert_prefetch_gate"] is None
    ungated.close()
    no_prefetch = engine_for(model_dir, expert_cache_bytes=budgets(store, _top_k(model_dir))["50%"],
                             offload_dir=str(tmp_path), expert_prefetch="none")
    assert no_prefetch.offload.gate is None, "nothing to gate"
    no_prefetch.close()


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_every_prefetch_mode_keeps_greedy_tokens_and_trace_mode_drives_the_cache(
    arch: str, demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    """deepseek_v3's first layer is dense: the trace planner skips it and never queues a key the store lacks."""
    model_dir = demo_model(arch)
    expected = generate(engine_for(model_dir))
    store = ensure_store(model_dir, tmp_path)
    budget = budgets(store, _top_k(model_dir))["50%"]
    for mode in ("none", "lookahead", "trace"):  # ungated: each source acts all along (the gate: next test)
        engine = engine_for(model_dir, expert_cache_bytes=budget, offload_dir=str(tmp_path), expert_prefetch=mode,
                            expert_prefetch_gate=False)
        assert generate(engine) == expected, f"{arch} with expert_prefetch={mode}"
        stats, policy = engine.stats(), engine.offload.cache.policy
        assert (stats["expert_prefetch_issued"] > 0) == (mode != "none"), mode
        assert (engine.prefetcher is not None) == (mode == "trace")
        assert bool(policy._priorities) == (mode == "trace"), "only trace predictions set priorities"
        if mode == "trace":
            assert generate(engine) == expected, "a warm store and warm statistics change no token"
            prefetcher = engine.prefetcher
            assert prefetcher._steps >= ADAPT_EVERY and prefetcher.read_layers > 0
            tuned = PrefetchSettings.for_read_time(prefetcher.read_layers)
            settings = prefetcher.planner.settings
            assert (settings.horizon, settings.min_probability) == (tuned.horizon, tuned.min_probability)
            assert engine.prefetcher.prefetches_planned > 0
            assert {key[0] for key in policy._priorities} == set(range(engine.offload.num_layers))
            assert len(engine.prefetcher) == 0, "finished sequences are forgotten"
        engine.close()
        assert not policy._pins, "every read landed and released its pin"


def test_a_flipped_byte_names_file_layer_and_expert(demo_model: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = demo_model("mixtral")
    store = ensure_store(model_dir, tmp_path)
    layer = store.moe_layers[-1]
    victim = store.blob(layer, 3)
    flip_a_byte(victim)
    engine = engine_for(model_dir, expert_cache_bytes=4 * store.max_blob_bytes, offload_dir=str(tmp_path))
    message = checksum_error(engine, layer, good=2, bad=3)
    offload = engine.offload
    assert victim.file.name in message and f"layer {layer}" in message and "expert 3" in message
    assert (layer, 3, "native") not in offload.cache, "a blob that failed its checksum is not cached"
    assert (layer, 2, "native") in offload.cache and not offload.cache.policy._pins
    assert len(offload._free_slots) + len(offload._slot_of) == offload.num_slots, "every slot accounted"


def test_a_budget_below_top_k_blobs_is_refused_with_the_minimum(
    demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = demo_model("olmoe")
    store = ensure_store(model_dir, tmp_path)
    minimum = minimum_budget(store, _top_k(model_dir))
    with pytest.raises(BudgetTooSmall, match=f"minimum of {minimum} bytes"):
        engine_for(model_dir, expert_cache_bytes=minimum - 1, offload_dir=str(tmp_path))


def _top_k(model_dir: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).get_text_config().num_experts_per_tok
