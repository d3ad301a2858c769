"""Dequantization of the quantized expert formats that hub checkpoints ship, done once at prepare time.

Two formats, with the semantics of transformers' own loaders (``transformers/integrations/mxfp4.py``,
``Fp8Dequantize`` in ``finegrained_fp8.py``), so a prepared expert equals what transformers would load:

- MXFP4 (gpt-oss): per output row, groups of 32 FP4 (e2m1) values packed two per byte (low nibble first) in
  ``*_blocks`` [.., rows, groups, 16] uint8, and one power-of-two scale per group in ``*_scales`` [.., rows, groups]
  uint8 holding the biased exponent (value = fp4 * 2 ** (scale - 127)).
- Block FP8 (DeepSeek-V3): ``weight`` float8_e4m3fn [rows, cols] and ``weight_scale_inv`` float32
  [ceil(rows / bm), ceil(cols / bn)], one scale per (bm x bn) block (``weight_block_size`` in the config's
  ``quantization_config``, 128 x 128 on the hub): value = weight * scale_inv of its block, computed in float32.
"""

from __future__ import annotations

import torch

# The 16 e2m1 values, indexed by the 4-bit code (sign bit 3).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32
MXFP4_SCALE_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 rows to ``dtype``: blocks [R, G, 16] uint8, scales [R, G] uint8 -> [R, G * 32].

    Bit-identical to transformers' ``convert_moe_packed_tensors`` before its final transpose.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, not {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_GROUP // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    rows, groups, half = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    out = torch.empty(rows, groups, 2 * half, dtype=dtype)  # [R, G, 32]
    out[..., 0::2] = lut[(blocks & 0x0F).int()]
    out[..., 1::2] = lut[(blocks >> 4).int()]
    exponents = scales.to(torch.int32).unsqueeze(-1) - MXFP4_SCALE_BIAS  # [R, G, 1]
    torch.ldexp(out, exponents, out=out)
    return out.reshape(rows, groups * 2 * half)


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Block-scaled FP8 to ``dtype``: weight [R, C], scale_inv [ceil(R / bm), ceil(C / bn)] -> [R, C].

    The product is taken in float32 and rounded once to ``dtype``, as transformers' ``Fp8Dequantize`` does.
    """
    rows, cols = weight.shape
    block_rows, block_cols = block
    expected = (-(-rows // block_rows), -(-cols // block_cols))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"FP8 weight {rows}x{cols} with {block_rows}x{block_cols} blocks needs scales of shape {expected}, "
            f"not {tuple(scale_inv.shape)}"
        )
    scale = scale_inv.float().repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)  # [R, C]
