"""Trace-driven priorities and prefetch against on-demand LRU, in offload mode, at the same budget, in one run.

Two parts (results: benchmarks/results/trace_prefetch.json):

- ``replayed``: real routing. A random bf16 model with Mixtral-8x7B's layer and expert counts (32 layers x 8
  experts, top-2; hidden 512, intermediate 1792: 5.5 MB blobs, 1.4 GB of experts) serves the decode steps of
  the recorded Mixtral traces of tests/data — their routing replayed through the experts forward's
  benchmark-only ``routing_override``, so the cache sees real expert sequences while the bytes really move
  (O_DIRECT or buffered+fadvise reads, as the engine's probe chooses). Requests run one after another through
  one engine per mode, the engines taking turns request by request (mario's two requests, then h39s; the
  predictor's store and statistics carry over, as in serving). Modes: ``none`` (on-demand reads, plain global
  LRU), ``trace`` (predicted priorities and prefetch, behind the prefetch gate as served) and ``trace-ungated``
  (the same, always acting). The gate look-ahead is left out: with replayed routing its router's guess is about another
  routing. Prompt routing is the model's own. Budget: 4 of 8 slots per layer (128 blobs), like the replay.
- ``cold_to_warm``: the trained demo model (models/demo-moe) on varied prompts (the opening lines of standard
  library modules), one request at a time (the modes taking turns), hit rate per request (over all expert
  accesses, the prompt's included) at one budget for every ``expert_prefetch`` mode (``none``, ``lookahead``,
  ``trace``, ``all``, gated, and ``all-ungated``): how the shared store and the transition statistics warm up with the requests seen, and
  which sources pay on real routing.
- ``random_routing``: a random bf16 model of issue #6's offload shape (32 layers x 8 experts, top-2, hidden 1024,
  intermediate 3584: 22 MB blobs, 5.6 GB of experts) on its own routing, 4 of 8 slots per layer, every
  ``expert_prefetch`` mode taking turns over a few varied prompts: what the sources cost where routing holds no
  pattern to learn (a random model's residual stream barely changes between layers, so the look-ahead's guess is
  good, and nothing else is).

Reported per mode: demand misses, hit rate, stall seconds (time the forward waited on reads) per decode token,
decode tok/s, prefetches issued/used/wasted, disk MB read per decode token (the prompt's reads included); and
ratios to ``none``.

Usage: python benchmarks/trace_prefetch.py [--decode-steps 256] [--prompts 24]
    [--parts replayed cold_to_warm random_routing] [--random-prompts 4] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import engine  # noqa: F401, I001  (before torch: sets OMP_WAIT_POLICY=PASSIVE, see engine/__init__.py)
import torch
from common import write_mixtral, write_result

from engine import LLM, SamplingParams
from engine.logs import configure_logging
from engine.offload.layout import ensure_store
from engine.trace.format import RequestTrace, read_traces

logger = logging.getLogger("benchmarks.trace_prefetch")

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
RESULTS = Path(__file__).parent / "results" / "trace_prefetch.json"
TRACES = [DATA / "mixtral-mario-2req.jsonl", DATA / "mixtral-h39s-prompt1.jsonl"]
SHAPE = dict(num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2, hidden_size=512,
             intermediate_size=1792, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
RANDOM_SHAPE = dict(num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2, hidden_size=1024,
                    intermediate_size=3584, num_attention_heads=8, num_key_value_heads=4)
SLOTS_PER_LAYER = 4
MODES = ("none", "trace", "trace-ungated")
WARM_MODES = ("none", "lookahead", "trace", "all", "all-ungated")
UNGATED = "-ungated"
"""A mode ending so runs its ``expert_prefetch`` with ``expert_prefetch_gate: false`` (the sources always acting);
the others run gated, as served by default."""
PROMPT = "def main(argv):\n    parser = argparse.ArgumentParser()\n"
COUNTERS = ("expert_hits", "expert_misses", "expert_stall_seconds", "expert_prefetch_issued",
            "expert_prefetch_used", "expert_prefetch_wasted")


class ReplayedRouting:
    """``routing_override`` that feeds one request's recorded decode routing, step by step, to a batch of one.

    A call with one token row (a decode step) gets the trace's experts for that layer, equal gate weights; the
    step advances after the last MoE layer. Calls with more rows (the prompt) keep the model's own routing.
    """

    def __init__(self, trace: RequestTrace, last_layer: int) -> None:
        self.steps = [step.experts for step in trace.steps if step.phase == "decode"]
        self.last_layer = last_layer
        self.cursor = 0

    def __call__(self, layer: int | None, index: torch.Tensor, weights: torch.Tensor):
        if index.shape[0] != 1 or layer is None:
            return index, weights
        experts = self.steps[min(self.cursor, len(self.steps) - 1)][layer]
        if layer == self.last_layer:
            self.cursor += 1
        chosen = torch.tensor([list(experts)], dtype=index.dtype)  # [1, k]
        return chosen, torch.full(chosen.shape, 1.0 / chosen.shape[1], dtype=weights.dtype)


def mode_options(mode: str) -> dict:
    """The engine options of a benchmark mode: ``expert_prefetch`` and ``expert_prefetch_gate``."""
    return {"expert_prefetch": mode.removesuffix(UNGATED), "expert_prefetch_gate": not mode.endswith(UNGATED)}


def gate_state(llm: LLM) -> dict | None:
    """The prefetch gate's windows on and off and its switches (None: ungated or nothing to gate)."""
    gate = llm.stats()["expert_prefetch_gate"]
    return None if gate is None else {key: gate[key] for key in ("windows_on", "windows_off", "switches")}


def delta(after: dict, before: dict) -> dict:
    return {key: after[key] - before.get(key, 0) for key in COUNTERS}


def summarize(rows: list[dict]) -> dict:
    """Totals over requests: misses, hit rate, stall per decode token, decode tok/s, prefetch counts."""
    total = {key: sum(row[key] for row in rows) for key in (*COUNTERS, "decode_tokens", "decode_seconds")}
    accesses = total["expert_hits"] + total["expert_misses"]
    return {
        **{key: round(value, 4) if isinstance(value, float) else value for key, value in total.items()},
        "hit_rate": round(total["expert_hits"] / accesses, 4) if accesses else None,
        "stall_seconds_per_token": round(total["expert_stall_seconds"] / total["decode_tokens"], 5),
        "decode_tok_per_s": round(total["decode_tokens"] / total["decode_seconds"], 3),
        "disk_mb_per_decode_token": round(sum(row["disk_bytes"] for row in rows) / total["decode_tokens"] / 1e6, 1),
    }


def run_request(llm: LLM, prompt: str, max_tokens: int) -> dict:
    """One greedy request alone; its counters' deltas and its decode time (after the first token)."""
    before = llm.stats()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    core = llm.engine
    core.add_request("bench", prompt, params)
    start = time.perf_counter()
    first = None
    while core.has_unfinished_requests():
        core.step()
        if first is None:
            first = time.perf_counter()
    seconds = time.perf_counter() - first
    llm.engine.offload.drain()
    after = llm.stats()
    return {**delta(after, before), "decode_tokens": max_tokens - 1, "decode_seconds": seconds,
            "prefill_seconds": first - start,
            "disk_bytes": after["expert_bytes_read"]["disk"] - before["expert_bytes_read"]["disk"]}


@contextlib.contextmanager
def random_model_engines(shape: dict, modes: Sequence[str], max_model_len: int) -> Iterator[tuple[dict, int, Any]]:
    """A random bf16 model of ``shape`` written to a temporary directory with its expert store, and one offload
    engine per ``expert_prefetch`` mode at SLOTS_PER_LAYER slots per layer: (engines by mode, budget bytes, the
    store). The engines are closed and the files deleted after the block."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("MOESERVE_BENCH_DIR")) as work:
        model = Path(work) / "model"
        logger.warning("writing the %dx%d model to %s", shape["num_hidden_layers"], shape["num_local_experts"], model)
        write_mixtral(model, shape, torch.bfloat16)
        store = ensure_store(model, Path(work) / "store")
        budget = SLOTS_PER_LAYER * store.num_layers * store.max_blob_bytes
        engines = {mode: LLM(model, expert_cache_bytes=budget, offload_dir=str(Path(work) / "store"),
                             max_model_len=max_model_len, max_num_seqs=1, **mode_options(mode)) for mode in modes}
        try:
            yield engines, budget, store
        finally:
            for llm in engines.values():
                llm.engine.close()


def replayed(decode_steps: int) -> dict:
    requests = [request for path in TRACES for request in read_traces(path)]
    results: dict = {"shape": SHAPE, "slots_per_layer": SLOTS_PER_LAYER,
                     "requests": [f"{r.header.trace} ({min(decode_steps, r.num_decode_steps)} decode steps)"
                                  for r in requests]}
    with random_model_engines(SHAPE, MODES, max_model_len=2048) as (engines, budget, store):
        results["budget_bytes"] = budget
        rows: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for request in requests:
            steps = min(decode_steps, request.num_decode_steps)
            for mode, llm in engines.items():  # interleaved, so a change in machine load hits both modes
                forward = llm.engine.runner.experts_forward
                forward.routing_override = ReplayedRouting(request, max(store.moe_layers))
                rows[mode].append(run_request(llm, PROMPT, steps + 1))
                logger.warning("%s %s: %s", mode, request.header.trace, summarize([rows[mode][-1]]))
        for mode, llm in engines.items():
            results[mode] = {"per_request": [summarize([row]) for row in rows[mode]], "total": summarize(rows[mode]),
                             "read_mode": llm.engine.offload.reader.mode.value, "gate": gate_state(llm)}
    results["ratios"] = ratios(results["trace"]["total"], results["none"]["total"])
    results["ratios_ungated"] = ratios(results["trace-ungated"]["total"], results["none"]["total"])
    return results


def ratios(trace: dict, none: dict) -> dict:
    return {
        "stall_per_token": round(trace["stall_seconds_per_token"] / none["stall_seconds_per_token"], 3),
        "decode_tok_per_s": round(trace["decode_tok_per_s"] / none["decode_tok_per_s"], 3),
        "misses": round(trace["expert_misses"] / none["expert_misses"], 3),
    }


def varied_prompts(count: int) -> list[str]:
    """The first 300 characters of ``count`` standard library modules, in sorted order of name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in stdlib.glob("*.py") if path.stat().st_size > 2000)
    step = max(1, len(files) // count)
    return [path.read_text(encoding="utf-8", errors="replace")[:300] for path in files[::step][:count]]


def cold_to_warm(model: str, prompts: int, fraction: float, max_tokens: int) -> dict:
    texts = varied_prompts(prompts)
    results: dict = {"model": model, "prompts": len(texts), "max_tokens": max_tokens, "budget_fraction": fraction}
    with tempfile.TemporaryDirectory() as offload_dir:
        store = ensure_store(model, offload_dir)
        budget = int(sum(store.num_experts.values()) * fraction) * store.max_blob_bytes
        engines = {mode: LLM(model, expert_cache_bytes=budget, offload_dir=offload_dir, **mode_options(mode))
                   for mode in WARM_MODES}
        rows: dict[str, list[dict]] = {mode: [] for mode in WARM_MODES}
        for text in texts:
            for mode, llm in engines.items():  # interleaved, so a change in machine load hits both modes
                rows[mode].append(run_request(llm, text, max_tokens))
        for mode, llm in engines.items():
            results[mode] = {"hit_rate_per_request": [summarize([row])["hit_rate"] for row in rows[mode]],
                             "total": summarize(rows[mode]), "store_entries": llm.stats()["trace_store_entries"],
                             "gate": gate_state(llm)}
            logger.warning("cold->warm %s: %s", mode, results[mode]["hit_rate_per_request"])
            llm.engine.close()
    half = len(texts) // 2
    for mode in WARM_MODES:
        curve = results[mode]["hit_rate_per_request"]
        results[mode]["first_half_hit_rate"] = round(sum(curve[:half]) / half, 4)
        results[mode]["second_half_hit_rate"] = round(sum(curve[half:]) / (len(curve) - half), 4)
    results["ratios_to_none"] = {mode: ratios(results[mode]["total"], results["none"]["total"])
                                 for mode in WARM_MODES[1:]}
    return results


def random_routing(prompts: int, max_tokens: int) -> dict:
    texts = varied_prompts(prompts)
    results: dict = {"shape": RANDOM_SHAPE, "slots_per_layer": SLOTS_PER_LAYER, "prompts": len(texts),
                     "max_tokens": max_tokens}
    with random_model_engines(RANDOM_SHAPE, WARM_MODES, max_model_len=max_tokens + 256) as (engines, budget, _):
        results["budget_bytes"] = budget
        rows: dict[str, list[dict]] = {mode: [] for mode in WARM_MODES}
        for text in texts:
            for mode, llm in engines.items():  # interleaved, so a change in machine load hits every mode
                rows[mode].append(run_request(llm, text, max_tokens))
                logger.warning("random routing %s: %s", mode, summarize([rows[mode][-1]]))
        for mode, llm in engines.items():
            results[mode] = {"total": summarize(rows[mode]), "gate": gate_state(llm)}
    results["ratios_to_none"] = {mode: ratios(results[mode]["total"], results["none"]["total"])
                                 for mode in WARM_MODES[1:]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["replayed", "cold_to_warm"],
                        choices=["replayed", "cold_to_warm", "random_routing"])
    parser.add_argument("--random-prompts", type=int, default=4, help="prompts of the random-routing part")
    parser.add_argument("--decode-steps", type=int, default=256, help="decode steps replayed per request")
    parser.add_argument("--model", default="models/demo-moe", help="model of the cold->warm part")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--fraction", type=float, default=0.5, help="cold->warm budget: fraction of the blobs")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configure_logging("warning")
    load_before = os.getloadavg()
    fields: dict = {}
    if "replayed" in args.parts:
        fields["replayed"] = replayed(args.decode_steps)
    if "cold_to_warm" in args.parts:
        fields["cold_to_warm"] = cold_to_warm(args.model, args.prompts, args.fraction, args.max_tokens)
    if "random_routing" in args.parts:
        fields["random_routing"] = random_routing(args.random_prompts, args.max_tokens)
    write_result(args.out, "trace_prefetch", load_before, fields)


if __name__ == "__main__":
    main()
