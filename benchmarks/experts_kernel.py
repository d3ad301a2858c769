"""The compiled experts kernel alone against the pure-torch expert path and the RAM bandwidth bound.

Decode runs an expert over 1 token most of the time, so an expert's cost is streaming its weights once: the
kernel should read them near the RAM stream rate. For each expert shape (Mixtral-like H=1024, I=3584 with top-2
routing; H=2048, I=768 with top-8; with ``--shapes h4096_i14336_top2``, Mixtral-8x7B's own 352 MB experts: 5.6 GB
of bf16 weights, 11 GB in fp32), weight dtype (bf16, and fp32 for reference) and tokens per expert
(1, 2, 4, 8, 16, 64), one trial runs every expert of a stack once — as layer-sized groups of ``top_k`` experts
per ``moeserve::experts_group`` call, like the engine's decode — on:

- ``kernel``: the compiled op (the built one, or ``--library`` to load another build for before/after runs) on
  the richest instruction set this CPU has (engine.offload.kernels.ISAS), the engine's default;
- ``kernel_avx2``, ``kernel_avx512``: the same op with its decode paths forced to each instruction set below the
  richest (AVX2 where the CPU has AVX-512; AVX-512 without the bf16 pair products where it has AVX-512 BF16);
- ``kernel_one_run``, ``kernel_avx2_one_run``, ...: at 1-4 tokens, each of the above with every thread
  reading its chunk's rows as one run (``engine.offload.kernels.using_runs(1)``, the paths before the kernel
  read several runs side by side), so the gain of the runs shows against them in the same run;
- ``torch``: ``engine.offload.experts.torch_expert``, one expert at a time.

The stack holds at least 16 experts and ``--min-mib`` MiB (default 256, > 2x the last-level cache of the
machines we run on) so weights stream from RAM, not cache. Rate = weight bytes in the weight dtype / seconds;
each is the best and the median of ``--repeats`` rounds after one warm-up, every round running every (tokens,
path) once. The bound is the STREAM triad of benchmarks/bandwidth.py measured in the same run (fraction_of_triad
uses the best time). Results: benchmarks/results/experts_kernel.json.

``--busy-core`` measures the paths while another process spins on one core (a Python busy loop started after the
triad and ended before the results are written): how a kernel's threads cope with a core they do not have to
themselves, as in a server whose other threads (HTTP, expert reads) or neighbours run beside the decode.

Usage: python benchmarks/experts_kernel.py [--threads 2] [--repeats 7] [--dtypes bfloat16 float32]
[--tokens 1 2 4 8 16 64] [--paths kernel torch] [--library PATH] [--out PATH] [--busy-core]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import engine  # noqa: F401, I001  (before torch: sets OMP_WAIT_POLICY=PASSIVE, see engine/__init__.py)
import torch
from bandwidth import stream_rate
from common import require_experts_kernel, write_result
from transformers import AutoConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from engine.logs import configure_logging
from engine.offload.experts import ExpertsForward, RoutingPlan, StackedParameters, torch_expert
from engine.offload.kernels import ISAS, RUNS, best_isa, using_isa, using_runs

logger = logging.getLogger("benchmarks.experts_kernel")

RESULTS = Path(__file__).parent / "results" / "experts_kernel.json"
SHAPES = {  # name: (hidden, intermediate, top_k)
    "h1024_i3584_top2": (1024, 3584, 2),
    "h2048_i768_top8": (2048, 768, 8),
    "h4096_i14336_top2": (4096, 14336, 2),  # Mixtral-8x7B's experts (352 MB each in bf16); opt-in with --shapes
}
DEFAULT_SHAPES = ("h1024_i3584_top2", "h2048_i768_top8")
MIN_EXPERTS = 16
RUNS_MAX_TOKENS = 4  # tokens per expert up to which the kernel reads several runs of rows (experts_cpu.cpp)


def experts_module(hidden: int, inter: int, count: int, dtype: torch.dtype) -> torch.nn.Module:
    """A transformers MixtralExperts of ``count`` random experts in ``dtype`` (the layout the engine serves)."""
    config = AutoConfig.for_model("mixtral", hidden_size=hidden, intermediate_size=inter, num_local_experts=count)
    experts = MixtralExperts(config).to(dtype)
    with torch.no_grad():
        for parameter in (experts.gate_up_proj, experts.down_proj):
            parameter.normal_(std=parameter.shape[-1] ** -0.5)
    return experts


def seconds(fns: dict[tuple, Callable[[], None]], repeats: int) -> dict[tuple, tuple[float, float]]:
    """(best, median) seconds of each of ``fns`` over ``repeats`` rounds after one warm-up. Every round runs every
    function once, so a burst of load from other processes falls on all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[tuple, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: (min(t), statistics.median(t)) for key, t in times.items()}


def trials(forward: ExpertsForward, experts: torch.nn.Module, top_k: int, tokens: int) -> dict[str, Callable]:
    """One pass over every expert of ``experts`` with ``tokens`` tokens each, per path."""
    spec = forward.spec(experts)
    hidden = torch.randn(tokens, spec.hidden).to(spec.dtype)  # [n, H]
    token_ids = torch.arange(tokens).repeat(top_k)  # [top_k * n]: the same n tokens for every expert of a group
    route_weights = torch.rand(top_k * tokens)
    out = torch.zeros(tokens, spec.hidden)  # [n, H] fp32 accumulator
    plan = RoutingPlan(list(range(top_k)), [i * tokens for i in range(top_k)], [tokens] * top_k, token_ids,
                       route_weights)
    with StackedParameters().hold(experts, None, range(spec.num_experts)) as held:
        weights = list(held)
    groups = [list(enumerate(weights[g : g + top_k])) for g in range(0, len(weights), top_k)]

    def kernel() -> None:
        for group in groups:
            forward._kernel_experts(spec, hidden, plan, group, out)

    def kernel_on(isa: str, runs: int = max(RUNS)) -> Callable[[], None]:
        def run() -> None:
            with using_isa(isa), using_runs(runs):
                kernel()
        return run

    def torch_path() -> None:
        for w in weights:
            torch_expert(experts, spec, hidden, token_ids[:tokens], route_weights[:tokens], w, out)

    paths = {"kernel": kernel, "torch": torch_path}
    for isa in ISAS[: ISAS.index(best_isa())]:
        paths[f"kernel_{isa}"] = kernel_on(isa)
    if tokens <= RUNS_MAX_TOKENS:  # the same paths reading one run of rows per chunk (as before the runs)
        paths["kernel_one_run"] = kernel_on(best_isa(), 1)
        for isa in ISAS[: ISAS.index(best_isa())]:
            paths[f"kernel_{isa}_one_run"] = kernel_on(isa, 1)
    return paths


def measure(shape: str, dtype: torch.dtype, args: argparse.Namespace, forward: ExpertsForward, triad: float) -> dict:
    """Rates of both paths at every token count for one (shape, dtype)."""
    hidden, inter, top_k = SHAPES[shape]
    expert_bytes = 3 * hidden * inter * dtype.itemsize
    count = max(MIN_EXPERTS, math.ceil(args.min_mib * 2**20 / expert_bytes / top_k) * top_k)
    experts = experts_module(hidden, inter, count, dtype)
    total = count * expert_bytes
    fns = {(tokens, path): fn for tokens in args.tokens
           for path, fn in trials(forward, experts, top_k, tokens).items()
           if path.partition("_")[0] in args.paths}
    timings = seconds(fns, args.repeats)
    rows: dict[str, dict] = {}
    for (tokens, path), (best, median) in timings.items():
        rows.setdefault(str(tokens), {})[path] = {"gb_per_s_best": round(total / best / 1e9, 2),
                                                  "gb_per_s_median": round(total / median / 1e9, 2),
                                                  "fraction_of_triad_best": round(total / best / triad, 3)}
    for tokens, row in rows.items():
        logger.info("%s %s n=%s: %s", shape, dtype, tokens, ", ".join(
            f"{path} {rates['gb_per_s_best']:.1f} GB/s ({rates['fraction_of_triad_best']:.2f} of triad)"
            for path, rates in row.items()))
    return {"experts": count, "top_k": top_k, "weight_mib": round(total / 2**20), "tokens": rows}


def load_kernel(library: Path | None) -> Callable[..., None]:
    """The op from ``library`` when given (a build to compare), else the engine's current build."""
    if library is not None:
        torch.ops.load_library(str(library))
        return torch.ops.moeserve.experts_group
    return require_experts_kernel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-mib", type=int, default=256, help="least weight bytes per stack (MiB)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(DEFAULT_SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16", "float32"],
                        default=["bfloat16", "float32"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--paths", nargs="+", choices=["kernel", "torch"], default=["kernel", "torch"])
    parser.add_argument("--library", type=Path, help="kernel library to load instead of the built one")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--busy-core", action="store_true", help="measure beside a process spinning on one core")
    args = parser.parse_args()
    configure_logging("info")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    forward = ExpertsForward(use_kernel=False)
    forward.kernel = load_kernel(args.library)
    rates = stream_rate(2**30)
    triad = rates["triad"]
    logger.info("STREAM triad: %.1f GB/s", triad / 1e9)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy_core else None
    try:
        results = {shape: {name: measure(shape, getattr(torch, name), args, forward, triad) for name in args.dtypes}
                   for shape in args.shapes}
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    write_result(args.out, "experts_kernel", load_before, {
        "threads": args.threads,
        "repeats": args.repeats,
        "library": str(args.library) if args.library else "built",
        "busy_core": args.busy_core,
        "kernel_isa": best_isa(),
        "stream_bytes_per_s": {k: round(v) for k, v in rates.items()},
        "shapes": results,
    })


if __name__ == "__main__":
    main()
