"""The real CUDA path: the model on the GPU, experts in device slots over pinned host slots, copies on a stream.

Skipped without a GPU (``torch.cuda.is_available()`` false: a CPU-only torch wheel, or no device); run on a GPU
machine by ``scripts/gpu_check.sh`` (``pytest -m cuda``). Greedy tokens of ``device=cuda`` — resident, and in
offload mode at several device/host budgets — equal the CPU all-resident engine's in float32; bytes are accounted
per tier (disk reads land in host slots, every device load is one host-to-device copy); the copier orders copies
after the compute that read a slot and keeps a host slot until its copy has run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.offload.layout import ensure_store
from engine.offload.tiers import ALIGNMENT, CudaHostToDevice, SlotArena, host_to_device
from offload_runs import engine_for, generate, top_k_of  # pytest puts tests/integration on sys.path

FLOAT32 = dict(dtype="float32")  # the CPU reference and the GPU engines alike: token equality in fp32

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: torch.cuda.is_available() is False (CPU-only torch or no GPU)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_cuda_greedy_tokens_equal_the_cpu_resident_engine_with_exact_bytes_per_tier(
    arch: str, demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = demo_model(arch)
    expected = generate(engine_for(model_dir, **FLOAT32, device="cpu"))
    resident = engine_for(model_dir, **FLOAT32, device="cuda")
    assert all(p.device.type == "cuda" for p in resident.runner.model.parameters())
    assert generate(resident) == expected, f"{arch} resident on cuda"
    store = ensure_store(model_dir, tmp_path)
    top_k, slot = top_k_of(model_dir), store.max_blob_bytes
    experts = sum(store.num_experts.values())
    # (device slots, host slots or None for the default): the minimum of both; half the experts over the default.
    for device_slots, host_slots in ((top_k, top_k), (experts // 2, None)):
        engine = engine_for(model_dir, **FLOAT32, device="auto", expert_cache_bytes=device_slots * slot,
                            host_cache_bytes=None if host_slots is None else host_slots * slot,
                            offload_dir=str(tmp_path))
        offload = engine.offload
        assert offload.arena.device.type == "cuda" and offload.host.arena.pinned
        assert isinstance(offload.copier, CudaHostToDevice)
        assert generate(engine) == expected, f"{arch} offloaded on cuda, {device_slots} device slots"
        assert {t.device.type for t in engine.runner.kv_store._keys if t is not None} == {"cuda"}
        offload.drain()
        stats, counters = engine.stats(), offload.stats
        loads = stats["expert_misses"] + stats["expert_prefetch_issued"]
        assert counters.host_hits + counters.host_misses == loads
        assert stats["expert_bytes_read"] == {"disk": counters.host_misses * slot, "host": loads * slot}
        assert set(stats["expert_cache_bytes"]) == {"device", "host"}
        assert stats["expert_cache_bytes"]["device"] <= device_slots * slot
        engine.close()
        assert not offload.cache.policy._pins and not offload.host.cache.policy._pins and not offload._staging


def test_cuda_copies_wait_for_the_compute_that_read_a_slot_and_keep_their_host_slot() -> None:
    host = SlotArena(2, 256 * ALIGNMENT, pinned=True)
    device = SlotArena(1, 256 * ALIGNMENT, device="cuda")
    copier = host_to_device(host, device)
    assert isinstance(copier, CudaHostToDevice) and host.pinned
    host.slot(0).fill_(1)
    host.slot(1).fill_(2)
    copier.copy(0, 0, host.slot_bytes)
    copier.reuse_host(0)
    host.slot(0).fill_(3)  # after reuse_host the copy has read slot 0: this must not reach the device
    copier.ready(0)
    first = device.slot(0).to(torch.int64).sum()  # queued on the compute stream, after the copy
    copier.release([0])
    copier.copy(1, 0, host.slot_bytes)  # waits for the sum above before it overwrites the slot
    copier.ready(0)
    second = device.slot(0).to(torch.int64).sum()
    torch.cuda.synchronize()
    assert (int(first), int(second)) == (host.slot_bytes, 2 * host.slot_bytes)
    assert (copier.copies, copier.bytes_copied) == (2, 2 * host.slot_bytes)
