"""Gate look-ahead prefetch against on-demand reads, in offload mode, on the trained demo model, in one run.

For each cache budget (a fraction of the model's expert blobs), the same greedy requests run twice on fresh
engines over one prepared store (O_DIRECT or buffered+fadvise reads, as the engine's probe chooses): with the
experts forward's gate look-ahead (the default in offload mode) and with it switched off (on-demand reads only).
Reported: demand misses, seconds the forward waited on reads, prefetches issued/used/wasted, the look-ahead's
recall, wall seconds, and the look-ahead / on-demand ratios. Results: benchmarks/results/lookahead_prefetch.json.

Usage: python benchmarks/lookahead_prefetch.py [--model models/demo-moe] [--fractions 0.5 0.25] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from common import write_result

from engine import LLM, SamplingParams
from engine.logs import configure_logging
from engine.offload.layout import ensure_store

logger = logging.getLogger("benchmarks.lookahead_prefetch")

RESULTS = Path(__file__).parent / "results" / "lookahead_prefetch.json"
PROMPTS = ["def fib(n):\n", "import os\nimport sys\n\n\ndef main(argv):\n", "class Stack:\n    def __init__(self):\n",
           "    for key, value in sorted(d.items()):\n"]
COUNTERS = ("expert_misses", "expert_stall_seconds", "expert_prefetch_issued", "expert_prefetch_used",
            "expert_prefetch_wasted", "expert_prediction_recall")


def run(model: str, budget: int, offload_dir: str, lookahead: bool, max_tokens: int) -> dict:
    """One engine at ``budget`` bytes; the look-ahead switched off when ``lookahead`` is False."""
    llm = LLM(model, expert_cache_bytes=budget, offload_dir=offload_dir)
    if not lookahead:
        llm.engine.runner.experts_forward.lookahead = {}
    start = time.perf_counter()
    llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    seconds = time.perf_counter() - start
    stats = llm.stats()
    llm.engine.close()
    return {**{key: stats[key] for key in COUNTERS}, "wall_seconds": round(seconds, 3),
            "read_mode": llm.engine.offload.reader.mode.value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/demo-moe")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configure_logging("warning")
    load_before = os.getloadavg()
    rows = {}
    with tempfile.TemporaryDirectory() as offload_dir:
        store = ensure_store(args.model, offload_dir)
        blobs = sum(store.num_experts.values())
        for fraction in args.fractions:
            budget = int(blobs * fraction) * store.max_blob_bytes
            on_demand = run(args.model, budget, offload_dir, False, args.max_tokens)
            lookahead = run(args.model, budget, offload_dir, True, args.max_tokens)
            rows[str(fraction)] = {
                "budget_bytes": budget, "on_demand": on_demand, "lookahead": lookahead,
                "misses_ratio": round(lookahead["expert_misses"] / on_demand["expert_misses"], 3),
                "stall_ratio": round(lookahead["expert_stall_seconds"] / on_demand["expert_stall_seconds"], 3),
                "wall_ratio": round(lookahead["wall_seconds"] / on_demand["wall_seconds"], 3),
            }
            logger.warning("%.2f of the experts: misses %d -> %d, stall %.2f s -> %.2f s", fraction,
                           on_demand["expert_misses"], lookahead["expert_misses"],
                           on_demand["expert_stall_seconds"], lookahead["expert_stall_seconds"])
    write_result(args.out, "lookahead_prefetch", load_before, {
        "model": args.model, "prompts": len(PROMPTS), "max_tokens": args.max_tokens, "budgets": rows})


if __name__ == "__main__":
    main()
