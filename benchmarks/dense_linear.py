"""The kernel's row paths against their baselines, in one run: dense projections and huge-page expert memory.

Two measurements on the same machine, each a ratio against its baseline measured alongside:

- ``dense``: one-row bf16 products of the projections a decode token runs per layer of the issue-#5 Mixtral shapes
  (q and o 1024 x 1024, k and v 512 x 1024, the router 8 x 1024 at hidden 1024; and 2048 x 2048, 64 x 2048 at
  hidden 2048), through ``nn.Linear`` (torch's bf16 GEMM, oneDNN) and through ``engine.dense.RowStreamLinear``
  (the kernel's ``torch.ops.moeserve.dense``). Each cycles through enough distinct weights (>= 512 MiB) that they
  stream from RAM; microseconds per product and GB/s of weights.
- ``huge_pages``: one-token bf16 expert groups (h1024/i3584, top-2) through ``moeserve::experts_group`` over
  >= 2 GiB of experts held in ordinary memory and in ``engine.offload.tiers.pack_tensors``'s huge-page buffer;
  and what the huge pages cost up front: seconds per GiB to allocate and first touch a buffer of each kind.

Every timing is the best of ``--repeats`` rounds after a warm-up; each round runs every variant once, so load from
other processes falls on all alike. Results: benchmarks/results/dense_linear.json.

Usage: python benchmarks/dense_linear.py [--repeats 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import engine  # noqa: F401, I001  (before torch: sets OMP_WAIT_POLICY=PASSIVE, see engine/__init__.py)
import torch
from common import require_experts_kernel, write_result
from torch import nn

from engine.dense import RowStreamLinear
from engine.logs import configure_logging
from engine.offload.kernels import load_experts_kernel
from engine.offload.tiers import huge_page_empty, pack_tensors

logger = logging.getLogger("benchmarks.dense_linear")

RESULTS = Path(__file__).parent / "results" / "dense_linear.json"
DENSE_SHAPES = {"q_o_h1024": (1024, 1024), "k_v_h1024": (512, 1024), "router_h1024": (8, 1024),
                "q_o_h2048": (2048, 2048), "router_h2048": (64, 2048)}
STREAM_BYTES = 512 << 20
EXPERT_BYTES = 2 << 30
HIDDEN, INTERMEDIATE, TOP_K = 1024, 3584, 2


def best_of(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Best seconds of each function over ``repeats`` rounds (after one warm-up), every round running all."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@torch.inference_mode()
def dense(repeats: int) -> dict:
    """nn.Linear vs RowStreamLinear on one row, per shape."""
    rows = {}
    for name, (out_features, in_features) in DENSE_SHAPES.items():
        count = max(8, STREAM_BYTES // (out_features * in_features * 2))
        torch_layers = [nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16) for _ in range(count)]
        kernel_layers = []
        for layer in torch_layers:
            swapped = RowStreamLinear(in_features, out_features, bias=False, device="meta")
            swapped.weight = layer.weight
            kernel_layers.append(swapped)
        x = torch.randn(1, 1, in_features).to(torch.bfloat16)

        def run(layers: list[nn.Module]) -> Callable[[], None]:
            return lambda: [layer(x) for layer in layers]

        seconds = best_of({"torch": run(torch_layers), "kernel": run(kernel_layers)}, repeats)
        nbytes = out_features * in_features * 2
        rows[name] = {path: {"us_per_product": round(s / count * 1e6, 2),
                             "gb_per_s": round(nbytes * count / s / 1e9, 2)} for path, s in seconds.items()}
        rows[name]["kernel_speedup"] = round(seconds["torch"] / seconds["kernel"], 3)
        logger.info("dense %s: torch %.1f us, kernel %.1f us (%.2f x)", name,
                    rows[name]["torch"]["us_per_product"], rows[name]["kernel"]["us_per_product"],
                    rows[name]["kernel_speedup"])
    return rows


@torch.inference_mode()
def huge_pages(repeats: int) -> dict:
    """One-token expert groups over ordinary memory and over the same experts packed into huge pages."""
    op = load_experts_kernel()
    expert_bytes = 3 * HIDDEN * INTERMEDIATE * 2
    count = EXPERT_BYTES // expert_bytes // TOP_K * TOP_K
    ordinary = [(torch.randn(2 * INTERMEDIATE, HIDDEN).to(torch.bfloat16),
                 torch.randn(HIDDEN, INTERMEDIATE).to(torch.bfloat16)) for _ in range(count)]
    packed = [(nn.Parameter(g.clone(), requires_grad=False), nn.Parameter(d.clone(), requires_grad=False))
              for g, d in ordinary]
    buffer = pack_tensors([t for pair in packed for t in pair])
    hidden = torch.randn(1, HIDDEN).to(torch.bfloat16)
    token_ids, route_weights = torch.zeros(TOP_K, dtype=torch.int64), torch.ones(TOP_K)
    out = torch.zeros(1, HIDDEN)

    def run(experts: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
        def groups() -> None:
            for g in range(0, count, TOP_K):
                pairs = experts[g : g + TOP_K]
                op(hidden, token_ids, route_weights, list(range(TOP_K)), [1] * TOP_K, [p[0] for p in pairs],
                   [p[1] for p in pairs], [None] * TOP_K, [None] * TOP_K, False, 0, 0.0, 0.0, out)
        return groups

    seconds = best_of({"ordinary": run(ordinary), "huge_pages": run(packed)}, repeats)
    result = {name: {"gb_per_s": round(count * expert_bytes / s / 1e9, 2)} for name, s in seconds.items()}
    result["huge_page_speedup"] = round(seconds["ordinary"] / seconds["huge_pages"], 3)
    result["expert_gib"] = round(count * expert_bytes / 2**30, 2)
    result["first_touch_seconds_per_gib"] = first_touch(repeats)
    logger.info("experts over ordinary memory %.1f GB/s, huge pages %.1f GB/s (%.2f x)",
                result["ordinary"]["gb_per_s"], result["huge_pages"]["gb_per_s"], result["huge_page_speedup"])
    del buffer
    return result


def first_touch(repeats: int) -> dict[str, float]:
    """Seconds to allocate and fill 1 GiB: torch.empty vs huge_page_empty (fresh buffers every round)."""
    def touch(allocate: Callable[[int], torch.Tensor]) -> Callable[[], None]:
        return lambda: allocate(1 << 30).fill_(1)

    seconds = best_of({"ordinary": touch(lambda n: torch.empty(n, dtype=torch.uint8)),
                       "huge_pages": touch(huge_page_empty)}, repeats)
    return {name: round(s, 3) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configure_logging("info")
    require_experts_kernel()
    load_before = os.getloadavg()
    write_result(args.out, "dense_linear", load_before, {
        "repeats": args.repeats,
        "dense": dense(args.repeats),
        "huge_pages": huge_pages(args.repeats),
    })


if __name__ == "__main__":
    main()
