"""The two-level expert cache (device slots over host slots over the disk), with its fast tier on the CPU.

The GPU's layout, driven on a CPU machine: ``LLMEngine(config, expert_tier_device=cpu)`` builds the very
hierarchy a GPU gets (``OffloadedExperts(device=...)``: its own ``ExpertCache`` per tier, copies through the
synchronous ``HostToDevice``). Greedy tokens equal the all-resident engine's at device/host budget combinations
from the minimum up, including a host tier smaller than the working set (host evictions, re-reads from disk);
bytes are accounted per tier exactly; aborts leak no slot in either tier; a corrupted blob is still an error
naming file, layer and expert; a host budget below top_k blobs is refused with the number; the per-tier figures
reach Prometheus under their ``tier`` labels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.offload.layout import ExpertStore, ensure_store
from engine.offload.offloaded import (
    MAX_PREFETCH_IN_FLIGHT,
    BudgetTooSmall,
    OffloadedExperts,
    default_host_budget,
    expert_tensors_on_meta,
    minimum_budget,
)
from server.metrics import ServerMetrics
from offload_runs import (  # pytest puts tests/integration on sys.path
    GREEDY, PROMPTS, checksum_error, engine_for, flip_a_byte, generate, top_k_of,
)

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


def slots(store: ExpertStore, fraction: float, top_k: int) -> int:
    """Bytes of ``fraction`` of the store's experts, at least top_k blobs."""
    experts = sum(store.num_experts.values())
    return max(int(experts * fraction), top_k) * store.max_blob_bytes


def assert_every_slot_accounted(offload: OffloadedExperts) -> None:
    assert len(offload._free_slots) + len(offload._slot_of) == offload.num_slots, "device slots accounted"
    host = offload.host
    assert len(host.free_slots) + len(host.slot_of) == host.num_slots, "host slots accounted"
    assert all(key in host.cache for key in host.slot_of) and len(host.cache) == len(host.slot_of), "host residency"
    assert not offload.cache.policy._pins and not host.cache.policy._pins, "nothing pinned in either tier"
    assert not offload._staging and not offload._loading, "no load left in flight"


# (device fraction, host fraction or None for the default): the minimum in both; device half with the default
# host tier; a small device tier over a host tier holding everything (device misses served by copies only);
# every expert on the device over the minimum host tier (host evictions, every first load through staging).
BUDGETS = [(0.0, 0.0), (0.5, None), (0.25, 1.0), (1.0, 0.0)]


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_two_level_greedy_equals_resident_with_exact_accounting_per_tier(
    arch: str, demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = demo_model(arch)
    expected = generate(engine_for(model_dir))
    store = ensure_store(model_dir, tmp_path)
    top_k, slot = top_k_of(model_dir), store.max_blob_bytes
    experts = sum(store.num_experts.values())
    for device_fraction, host_fraction in BUDGETS:
        budget = slots(store, device_fraction, top_k)
        host_budget = None if host_fraction is None else slots(store, host_fraction, top_k)
        name = f"{arch} device {device_fraction} host {host_fraction}"
        engine = engine_for(model_dir, CPU, expert_cache_bytes=budget, host_cache_bytes=host_budget,
                            offload_dir=str(tmp_path))
        offload = engine.offload
        assert offload.host is not None and expert_tensors_on_meta(engine.runner.model)
        assert offload.host.num_slots == min((host_budget or default_host_budget(store, top_k)) // slot, experts)
        assert generate(engine) == expected, name
        offload.drain()
        stats, counters = engine.stats(), offload.stats
        loads = stats["expert_misses"] + stats["expert_prefetch_issued"]
        assert counters.host_hits + counters.host_misses == loads, f"{name}: every device load asks the host tier"
        assert stats["expert_bytes_read"] == {"disk": counters.host_misses * slot, "host": loads * slot}, name
        assert offload.copier.copies == loads
        cached = stats["expert_cache_bytes"]
        assert set(cached) == {"device", "host"} and cached["device"] <= budget
        assert cached["host"] <= offload.host.num_slots * slot
        assert cached["host"] == len(offload.host.slot_of) * slot
        verified = len(offload._verified)
        if offload.host.num_slots >= experts:
            assert counters.host_misses == verified, f"{name}: with every expert in the host tier, one disk read each"
            assert counters.host_hits == loads - verified and (device_fraction == 1.0 or counters.host_hits > 0)
        elif device_fraction < 1.0:
            assert counters.host_misses > verified, f"{name}: host evictions caused re-reads from disk"
        else:
            assert loads == counters.host_misses == verified, f"{name}: every expert fits the device: loaded once"
            assert len(offload.host.slot_of) == offload.host.num_slots < verified, f"{name}: the host tier evicted"
        if offload.prefetch_limit < 1:
            assert stats["expert_prefetch_issued"] == 0
        else:
            assert stats["expert_prefetch_issued"] > 0
        engine.close()
        assert_every_slot_accounted(offload)


def test_the_host_tier_bounds_prefetches_and_groups(demo_model: Callable[..., Path], tmp_path: Path) -> None:
    """Each load in flight stages through a host slot: at the host minimum nothing is prefetched and a group
    is top_k experts, however large the device tier."""
    model_dir = demo_model("olmoe")
    store = ensure_store(model_dir, tmp_path)
    top_k = top_k_of(model_dir)
    everything = sum(store.num_experts.values()) * store.max_blob_bytes
    minimal = OffloadedExperts(store, everything, top_k, device=CPU, host_budget_bytes=minimum_budget(store, top_k))
    assert (minimal.prefetch_limit, minimal.max_group_size(store.moe_layers[0])) == (0, top_k)
    default = OffloadedExperts(store, everything, top_k, device=CPU)
    assert default.prefetch_limit == MAX_PREFETCH_IN_FLIGHT
    assert default.max_group_size(store.moe_layers[0]) == default.host.num_slots - MAX_PREFETCH_IN_FLIGHT
    for offload in (minimal, default):
        offload.close()


def test_aborted_requests_leave_no_slot_behind_in_either_tier(
    demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = demo_model("mixtral")
    expected = generate(engine_for(model_dir))
    store = ensure_store(model_dir, tmp_path)
    top_k = top_k_of(model_dir)
    engine = engine_for(model_dir, CPU, expert_cache_bytes=slots(store, 0.5, top_k),
                        host_cache_bytes=slots(store, 0.25, top_k), offload_dir=str(tmp_path))
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"a{i}", prompt, GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.offload.stats.host_misses > 0, "the aborted requests did load experts"
    for i in range(len(PROMPTS)):
        assert engine.abort(f"a{i}")
    assert not engine.has_unfinished_requests()
    engine.offload.drain()
    assert_every_slot_accounted(engine.offload)
    assert generate(engine) == expected, "the cache serves on after the aborts"
    engine.close()
    assert_every_slot_accounted(engine.offload)


def test_a_flipped_byte_names_file_layer_and_expert_through_the_host_tier(
    demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = demo_model("mixtral")
    store = ensure_store(model_dir, tmp_path)
    layer = store.moe_layers[-1]
    victim = store.blob(layer, 3)
    flip_a_byte(victim)
    engine = engine_for(model_dir, CPU, expert_cache_bytes=4 * store.max_blob_bytes,
                        host_cache_bytes=4 * store.max_blob_bytes, offload_dir=str(tmp_path))
    message = checksum_error(engine, layer, good=2, bad=3)
    offload = engine.offload
    assert victim.file.name in message and f"layer {layer}" in message and "expert 3" in message
    bad, good = (layer, 3, "native"), (layer, 2, "native")
    assert bad not in offload.cache and bad not in offload.host.cache, "a blob that failed its checksum is in no tier"
    assert good in offload.cache and good in offload.host.cache
    assert offload.copier.copies == 1, "the corrupt blob was never copied to the device tier"
    assert_every_slot_accounted(offload)
    engine.close()


def test_a_host_budget_below_top_k_blobs_is_refused_with_the_minimum(
    demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = demo_model("olmoe")
    store = ensure_store(model_dir, tmp_path)
    minimum = minimum_budget(store, top_k_of(model_dir))
    with pytest.raises(BudgetTooSmall, match=f"host_cache_bytes={minimum - 1} is below the minimum of {minimum} bytes"):
        engine_for(model_dir, CPU, expert_cache_bytes=4 * minimum, host_cache_bytes=minimum - 1,
                   offload_dir=str(tmp_path))
    with pytest.raises(BudgetTooSmall, match=f"expert_cache_bytes={minimum - 1} is below the minimum of {minimum}"):
        engine_for(model_dir, CPU, expert_cache_bytes=minimum - 1, offload_dir=str(tmp_path))


def test_without_a_gpu_the_cache_has_one_host_tier_and_host_cache_bytes_is_ignored(
    demo_model: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device 'auto' is cuda here")
    model_dir = demo_model("mixtral")
    store = ensure_store(model_dir, tmp_path)
    budget = 8 * store.max_blob_bytes
    with caplog.at_level("WARNING", logger="engine.engine"):
        engine = engine_for(model_dir, expert_cache_bytes=budget, host_cache_bytes=budget, offload_dir=str(tmp_path))
    assert engine.device == CPU and engine.offload.host is None
    assert "host_cache_bytes is ignored" in caplog.text
    generate(engine)
    stats = engine.stats()
    assert set(stats["expert_bytes_read"]) == {"disk"} and set(stats["expert_cache_bytes"]) == {"host"}
    engine.close()


def test_the_tiers_reach_prometheus_under_their_labels(demo_model: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = demo_model("mixtral")
    store = ensure_store(model_dir, tmp_path)
    top_k = top_k_of(model_dir)
    engine = engine_for(model_dir, CPU, expert_cache_bytes=slots(store, 0.5, top_k), offload_dir=str(tmp_path))
    generate(engine)
    engine.offload.drain()
    stats = engine.stats()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in ServerMetrics(engine.stats).render().decode().splitlines() if not line.startswith("#")}
    assert stats["expert_bytes_read"]["host"] > stats["expert_cache_bytes"]["device"] > 0
    for tier in ("disk", "host"):
        assert samples[f'moeserve:expert_load_bytes_total{{tier="{tier}"}}'] == stats["expert_bytes_read"][tier]
    for tier in ("device", "host"):
        assert samples[f'moeserve:expert_cache_bytes{{tier="{tier}"}}'] == stats["expert_cache_bytes"][tier]
    engine.close()
