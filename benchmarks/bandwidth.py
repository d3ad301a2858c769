"""The memory-bandwidth bound of MoE decode on this machine, and what it means for a model's tokens per second.

Decode is memory-bound: a token streams every weight it touches once. The RAM stream rate is the best of two
measurements taken in the same run, each over at least 1 GiB so caches cannot serve it:

- a STREAM triad ``a = b + s * c`` on fp32 vectors (bytes = 3 x vector size: two reads, one write);
- a one-row fp32 GEMV ``y = W x`` cycling through distinct 7168 x 1024 matrices (bytes = the matrices).

``bytes_per_token(config, dtype)`` counts the bytes one decode token touches in the checkpoint's dtype: every
non-expert parameter (embeddings excluded: one row is read, not the table) plus top_k experts per MoE layer —
so upcasting at run time cannot inflate a measured fraction of the bound. ``bound_tok_per_s = rate / bytes``.

Usage: python benchmarks/bandwidth.py [--gib 1.5] [--threads 2]; writes benchmarks/results/bandwidth.json.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import engine  # noqa: F401, I001  (before torch: sets OMP_WAIT_POLICY=PASSIVE, see engine/__init__.py)
import torch
from common import write_result
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from engine.logs import configure_logging
from engine.offload.kernels import best_seconds

logger = logging.getLogger("benchmarks.bandwidth")

RESULTS = Path(__file__).parent / "results" / "bandwidth.json"
GEMV_SHAPE = (7168, 1024)
REPEATS = 5


def triad_rate(total_bytes: int) -> float:
    """Bytes per second of the STREAM triad over three fp32 vectors of total_bytes / 3 each."""
    n = total_bytes // 3 // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    seconds = best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a), REPEATS)
    return 3 * n * 4 / seconds


def gemv_rate(total_bytes: int) -> float:
    """Bytes per second of one-row fp32 GEMVs over distinct GEMV_SHAPE matrices totalling total_bytes."""
    rows, cols = GEMV_SHAPE
    count = max(1, total_bytes // (rows * cols * 4))
    weights = [torch.rand(rows, cols) for _ in range(count)]
    x, y = torch.rand(cols), torch.empty(rows)

    def run() -> None:
        for w in weights:
            torch.mv(w, x, out=y)

    return count * rows * cols * 4 / best_seconds(run, REPEATS)


def stream_rate(total_bytes: int) -> dict[str, float]:
    """Both measurements and their best, bytes per second."""
    triad, gemv = triad_rate(total_bytes), gemv_rate(total_bytes)
    return {"triad": triad, "gemv_fp32": gemv, "best": max(triad, gemv)}


def bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes one decode token touches (see module doc), counted on a meta-device model of ``config``."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    text = config.get_text_config()
    top_k = getattr(text, "num_experts_per_tok", 0)
    touched = 0
    for name, parameter in model.named_parameters():
        if "embed_tokens" in name:
            continue
        if ".experts." in name and parameter.dim() >= 2 and parameter.shape[0] > 1:
            touched += parameter[0].numel() * top_k * parameter.element_size()  # top_k of the E stacked experts
        else:
            touched += parameter.numel() * parameter.element_size()
    return touched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.5, help="bytes streamed per measurement (>= 1 GiB)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configure_logging("info")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rates = stream_rate(int(args.gib * 2**30))
    shapes = {
        "mixtral_16x16_h1024_i3584": AutoConfig.for_model(
            "mixtral", hidden_size=1024, intermediate_size=3584, num_hidden_layers=16, num_local_experts=16,
            num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),
        "mixtral_32x8_h1024_i3584": AutoConfig.for_model(
            "mixtral", hidden_size=1024, intermediate_size=3584, num_hidden_layers=32, num_local_experts=8,
            num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),
        "mixtral_8x64_h2048_i768_top8": AutoConfig.for_model(
            "mixtral", hidden_size=2048, intermediate_size=768, num_hidden_layers=8, num_local_experts=64,
            num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    }
    bounds = {}
    for name, config in shapes.items():
        touched = bytes_per_token(config, torch.bfloat16)
        bounds[name] = {"bytes_per_token_bf16": touched, "bound_tok_per_s": round(rates["best"] / touched, 2)}
        logger.info("%s: %.1f MB per token, bound %.1f tok/s", name, touched / 1e6, rates["best"] / touched)
    logger.info("stream rate: triad %.1f GB/s, fp32 GEMV %.1f GB/s", rates["triad"] / 1e9, rates["gemv_fp32"] / 1e9)
    write_result(args.out, "bandwidth", load_before, {
        "threads": args.threads,
        "stream_bytes_per_s": {k: round(v) for k, v in rates.items()},
        "shapes": bounds,
    })


if __name__ == "__main__":
    main()
