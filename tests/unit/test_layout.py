"""The expert store's pure parts: dequantizers against transformers' own, blob layout planning from checkpoint
headers, and typed zero-copy views.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.offload.layout import (
    BLOB_ALIGN, TENSOR_ALIGN, BlobEntry, ExpertStore, SourceTensor, StoreError, TensorEntry, make_plan,
)
from engine.offload.quant import dequantize_fp8_blocks, dequantize_mxfp4

SHARD = Path("model.safetensors")
CONFIG = {"model_type": "mixtral", "num_hidden_layers": 2, "dtype": "bfloat16"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_dequantization_equals_transformers(dtype: torch.dtype) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (1, 6, 3, 16), dtype=torch.uint8, generator=generator)  # [E, R, G, 16]
    scales = torch.randint(100, 140, (1, 6, 3), dtype=torch.uint8, generator=generator)  # [E, R, G]
    reference = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, G*32, R]
    ours = dequantize_mxfp4(blocks[0], scales[0], dtype)  # [R, G*32]
    assert ours.dtype == dtype and torch.equal(ours.t(), reference[0])


def test_mxfp4_decodes_low_nibble_first_with_biased_exponents() -> None:
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x72  # low nibble 2 (+1.0), high nibble 7 (+6.0)
    blocks[0, 0, 1] = 0x0F  # -6.0, then +0.0
    scales = torch.tensor([[127 - 3]], dtype=torch.uint8)  # 2 ** -3
    values = dequantize_mxfp4(blocks, scales, torch.float32)[0]
    assert values[:4].tolist() == [1.0 / 8, 6.0 / 8, -6.0 / 8, 0.0] and not values[4:].any()


def test_fp8_block_dequantization_equals_transformers_and_handles_partial_blocks() -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(32, 48, generator=generator) * 100).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(2, 3, generator=generator) + 0.01
    reference = Fp8Dequantize(None)._dequantize_one(weight, scale_inv, output_dtype=torch.bfloat16)
    assert torch.equal(dequantize_fp8_blocks(weight, scale_inv, (16, 16), torch.bfloat16), reference)

    partial = weight[:20, :40]  # blocks of 16 leave partial tiles at the bottom and right edges
    ours = dequantize_fp8_blocks(partial, scale_inv[:2, :3], (16, 16), torch.float32)
    for row, col in [(0, 0), (17, 3), (19, 39), (5, 33)]:
        assert ours[row, col] == partial[row, col].float() * scale_inv[row // 16, col // 16]
    with pytest.raises(ValueError, match=r"needs scales of shape \(2, 3\)"):
        dequantize_fp8_blocks(partial, scale_inv[:1], (16, 16), torch.float32)


def per_expert_tensors(layers: int, experts: int, rows: int = 3, cols: int = 5) -> list[SourceTensor]:
    """Headers of a Mixtral-style checkpoint: per layer a router and per-expert w1/w2/w3, float32."""
    tensors = [SourceTensor("model.embed_tokens.weight", SHARD, "F32", (7, cols))]
    for layer in range(layers):
        prefix = f"model.layers.{layer}.block_sparse_moe."
        tensors.append(SourceTensor(prefix + "gate.weight", SHARD, "F32", (experts, cols)))
        for expert in range(experts):
            for proj, shape in (("w1", (rows, cols)), ("w2", (cols, rows)), ("w3", (rows, cols))):
                tensors.append(SourceTensor(f"{prefix}experts.{expert}.{proj}.weight", SHARD, "F32", shape))
    return tensors


def test_plan_lays_blobs_out_aligned_with_gate_rows_before_up_rows() -> None:
    plan = make_plan(CONFIG, per_expert_tensors(layers=2, experts=3), ("native",))
    assert [(b.layer, b.expert, b.offset) for b in plan.blobs] == [
        (layer, expert, expert * BLOB_ALIGN) for layer in range(2) for expert in range(3)
    ]
    blob = plan.blobs[4]
    assert blob.file == "experts-native-L00001.bin"
    gate_up, down = blob.tensors
    assert (gate_up.role, gate_up.shape, gate_up.offset, gate_up.nbytes) == ("gate_up", (6, 5), 0, 120)
    assert (down.role, down.shape, down.offset, down.nbytes) == ("down", (5, 3), 128, 60)
    assert blob.nbytes == 188 and blob.padded_nbytes == BLOB_ALIGN and down.offset % TENSOR_ALIGN == 0
    writes = {piece.source.name.rsplit(".", 2)[-2]: offset for piece, offset in blob.writes}
    assert writes == {"w1": 0, "w3": 60, "w2": 128}
    assert [t.name for t in plan.resident] == [
        "model.embed_tokens.weight", "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.gate.weight",
    ]
    assert not plan.transposed and plan.quantization is None


def test_plan_names_missing_experts_and_incomplete_ones() -> None:
    tensors = [t for t in per_expert_tensors(layers=1, experts=4) if ".experts.2." not in t.name]
    with pytest.raises(StoreError, match=r"layer 0: the checkpoint lacks experts \[2\]"):
        make_plan(CONFIG, tensors, ("native",))
    tensors = [t for t in per_expert_tensors(layers=1, experts=2) if not t.name.endswith("experts.1.w3.weight")]
    with pytest.raises(StoreError, match=r"layer 0, expert 1: incomplete"):
        make_plan(CONFIG, tensors, ("native",))


def test_plan_refuses_unknown_expert_tensors_and_skips_layers_beyond_the_model() -> None:
    unknown = per_expert_tensors(1, 1) + [SourceTensor("model.layers.0.mlp.experts.0.w1.bias", SHARD, "F32", (3,))]
    with pytest.raises(StoreError, match="unrecognized routed-expert tensor model.layers.0.mlp.experts.0.w1.bias"):
        make_plan(CONFIG, unknown, ("native",))
    extra = per_expert_tensors(layers=3, experts=2)  # layer 2 is beyond num_hidden_layers (DeepSeek-V3's MTP layer)
    plan = make_plan(CONFIG, extra, ("native",))
    assert {b.layer for b in plan.blobs} == {0, 1}
    assert plan.skipped and all(".layers.2." in t.name for t in plan.skipped)


def test_plan_keeps_shared_experts_resident_and_consumes_fp8_scales() -> None:
    tensors = [SourceTensor("model.layers.0.mlp.shared_experts.gate_proj.weight", SHARD, "BF16", (4, 8))]
    for expert in range(2):
        for proj, shape in (("gate_proj", (4, 8)), ("up_proj", (4, 8)), ("down_proj", (8, 4))):
            name = f"model.layers.0.mlp.experts.{expert}.{proj}.weight"
            tensors += [SourceTensor(name, SHARD, "F8_E4M3", shape), SourceTensor(name + "_scale_inv", SHARD, "F32", (1, 1))]
    plan = make_plan(CONFIG, tensors, ("native",))
    assert [t.name for t in plan.resident] == ["model.layers.0.mlp.shared_experts.gate_proj.weight"]
    assert len(plan.consumed) == 6 and plan.quantization == "fp8"
    assert [(t.role, t.dtype, t.shape) for t in plan.blobs[0].tensors] == [
        ("gate_up", torch.bfloat16, (8, 8)), ("down", torch.bfloat16, (8, 4))
    ]


def test_fused_mxfp4_stacks_plan_transposed_blobs_with_biases() -> None:
    prefix = "model.layers.0.mlp.experts."
    tensors = [
        SourceTensor(prefix + "gate_up_proj_blocks", SHARD, "U8", (2, 128, 2, 16)),  # [E, 2I, H/32, 16]
        SourceTensor(prefix + "gate_up_proj_scales", SHARD, "U8", (2, 128, 2)),
        SourceTensor(prefix + "gate_up_proj_bias", SHARD, "BF16", (2, 128)),
        SourceTensor(prefix + "down_proj_blocks", SHARD, "U8", (2, 64, 2, 16)),  # [E, H, I/32, 16]
        SourceTensor(prefix + "down_proj_scales", SHARD, "U8", (2, 64, 2)),
        SourceTensor(prefix + "down_proj_bias", SHARD, "BF16", (2, 64)),
    ]
    plan = make_plan(CONFIG, tensors, ("native",))
    assert plan.transposed and plan.quantization == "mxfp4" and len(plan.blobs) == 2
    assert [(t.role, t.shape) for t in plan.blobs[1].tensors] == [
        ("gate_up", (64, 128)), ("down", (64, 64)), ("gate_up_bias", (128,)), ("down_bias", (64,))
    ]
    assert {piece.index for piece, _ in plan.blobs[1].writes} == {1}


def test_views_share_the_buffer_and_reject_small_buffers() -> None:
    tensors = (TensorEntry("gate_up", torch.bfloat16, (4, 2), 0, 16), TensorEntry("down", torch.float32, (2, 2), 64, 16))
    entry = BlobEntry(0, 0, "native", Path("x.bin"), 0, 80, BLOB_ALIGN, 0, tensors)
    buffer = torch.zeros(BLOB_ALIGN, dtype=torch.uint8)
    views = ExpertStore.view(entry, buffer)
    views["down"][1, 1] = 1.0
    assert buffer[64 + 12:64 + 16].tolist() == [0, 0, 128, 63]  # 1.0f little-endian, written through the view
    assert views["gate_up"].shape == (4, 2) and views["gate_up"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cannot hold a blob of 80"):
        ExpertStore.view(entry, buffer[:79])


def test_plan_refuses_scales_that_do_not_fit_their_weights() -> None:
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    tensors = [SourceTensor(name, SHARD, "F8_E4M3", (256, 130)), SourceTensor(name + "_scale_inv", SHARD, "F32", (2, 1))]
    with pytest.raises(StoreError, match=r"128x128 blocks .* need \[2, 2\]"):
        make_plan(CONFIG, tensors, ("native",))
    prefix = "model.layers.0.mlp.experts.down_proj"
    tensors = [SourceTensor(prefix + "_blocks", SHARD, "U8", (2, 64, 2, 16)),
               SourceTensor(prefix + "_scales", SHARD, "U8", (2, 64, 3))]
    with pytest.raises(StoreError, match="does not fit"):
        make_plan(CONFIG, tensors, ("native",))
