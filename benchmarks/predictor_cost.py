"""What trace prediction costs the host per request and per decode token, at the expert counts people serve.

The predictor (engine.trace.predictor) and the plan it drives (engine.trace.planner) run in Python inside the
forward, after every MoE layer, once per running sequence; the request's own transition statistics are sized
``(max_offset + 1) x layers x experts x experts``. This measures, for the layer/expert/top-k shapes of the MoE
families moeserve serves (the model is not needed: only the routing's shape matters), on routing drawn at random
from a skewed per-layer popularity (seeded):

- ``statistics_seconds``: building the shared `TransitionStatistics`;
- ``new_request_seconds``: one `Predictor.new_request` (the request's own statistics);
- ``request_bytes``: what one request (alone, on fresh statistics) holds after ``--steps`` decode tokens, Python
  allocations traced by tracemalloc in a pass of its own (the shared tensors are not Python allocations);
- ``predict_ms_per_token`` and ``plan_ms_per_token``: per decode token and sequence, the predictor's work
  (begin_step, observe_layer at every layer, end_step) and the plan's (`PrefetchPlanner.plan` after every layer
  with the batch's predictions, the cache's accesses and evictions, the queue drained as if every read finished
  at once), with ``--batch`` sequences decoding in lockstep over a global cache of half the layers' experts.

Results: benchmarks/results/predictor_cost.json; a baseline from an older checkout's engine, run with the same
script (``PYTHONPATH=<checkout> python benchmarks/predictor_cost.py --out ...``), in
benchmarks/results/predictor_cost_baseline.json (``engine_commit`` says which code each measured).

Usage: python benchmarks/predictor_cost.py [--shapes NAME ...] [--batch 2] [--steps 16] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import subprocess
import time
import tracemalloc
from pathlib import Path

import engine  # noqa: F401, I001  (before torch: sets OMP_WAIT_POLICY=PASSIVE, see engine/__init__.py)
from common import write_result
from tqdm import tqdm

from engine.logs import configure_logging
from engine.offload.cache import ExpertCache, LRUPolicy
from engine.offload.prefetch import PrefetchQueue
from engine.trace.planner import COMPUTE_BOUND_MIN_PROBABILITY, PrefetchPlanner, PrefetchSettings
from engine.trace.predictor import Predictor, TransitionStatistics

logger = logging.getLogger("benchmarks.predictor_cost")

RESULTS = Path(__file__).parent / "results" / "predictor_cost.json"
SHAPES = {  # (layers, routed experts, top_k) of each family's config
    "mixtral-8x7b": (32, 8, 2),
    "gpt-oss-20b": (24, 32, 4),
    "qwen1.5-moe-a2.7b": (24, 60, 4),
    "olmoe-1b-7b": (16, 64, 8),
    "deepseek-v2-lite": (27, 64, 6),
    "gpt-oss-120b": (36, 128, 4),
    "qwen3-30b-a3b": (48, 128, 8),
    "deepseek-v2": (60, 160, 6),
    "deepseek-v3": (61, 256, 8),
}


def engine_commit() -> str:
    """The commit of the engine package measured (``git describe --always --dirty`` in its directory): the script
    also runs against an older checkout's engine (PYTHONPATH) to measure a baseline."""
    source = Path(engine.__file__).resolve().parent
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=source, capture_output=True, text=True)
    return described.stdout.strip() or "unknown"


class Routing:
    """Seeded random decode routing: each layer has a skewed popularity (weights 1 / rank, shuffled) and every
    token draws ``top_k`` distinct experts by it."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.top_k = top_k
        self.experts = list(range(num_experts))
        self.weights = []
        for _ in range(num_layers):
            ranks = [1.0 / (rank + 1) for rank in range(num_experts)]
            self.rng.shuffle(ranks)
            self.weights.append(ranks)

    def token(self) -> list[list[int]]:
        """One decode token's expert ids per layer, sorted."""
        token = []
        for weights in self.weights:
            chosen: set[int] = set()
            while len(chosen) < self.top_k:
                chosen.update(self.rng.choices(self.experts, weights, k=self.top_k - len(chosen)))
            token.append(sorted(chosen))
        return token


def traced_request_bytes(num_layers: int, num_experts: int, top_k: int, settings: PrefetchSettings,
                         steps: int) -> int:
    """Python bytes one request holds after ``steps`` decode tokens on fresh statistics (tracemalloc)."""
    statistics = TransitionStatistics(num_layers, num_experts, settings.max_offset, top_k=top_k)
    predictor = Predictor(num_layers, num_experts, top_k, settings.sources, transitions=statistics)
    routing = Routing(num_layers, num_experts, top_k, seed=1)
    gc.collect()
    tracemalloc.start()
    try:
        state = predictor.new_request()
        for _ in range(steps):
            token = routing.token()
            predictor.begin_step(state, decode=True)
            for layer, experts in enumerate(token):
                predictor.observe_layer(state, layer, experts)
            predictor.end_step(state)
        gc.collect()
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def measure(num_layers: int, num_experts: int, top_k: int, batch: int, steps: int) -> dict:
    """One shape's costs (module docstring)."""
    settings = PrefetchSettings(min_probability=COMPUTE_BOUND_MIN_PROBABILITY, horizon=2)  # an NVMe-like plan
    gc.collect()
    started = time.perf_counter()
    statistics = TransitionStatistics(num_layers, num_experts, settings.max_offset, top_k=top_k)
    statistics_seconds = time.perf_counter() - started
    predictor = Predictor(num_layers, num_experts, top_k, settings.sources, transitions=statistics)
    cache = ExpertCache(LRUPolicy(), max(batch * top_k, num_layers * num_experts // 2), scope="global")
    queue = PrefetchQueue(cache, 1, 4)
    planner = PrefetchPlanner(cache, queue, num_layers, settings)
    routing = Routing(num_layers, num_experts, top_k)

    started = time.perf_counter()
    states = [predictor.new_request()]
    new_request_seconds = time.perf_counter() - started
    states.extend(predictor.new_request() for _ in range(batch - 1))
    predict_seconds = plan_seconds = 0.0
    for step in range(2 * steps):  # the first half warms the histories up, the second is timed
        if step == steps:
            predict_seconds = plan_seconds = 0.0
        tokens = [routing.token() for _ in states]
        tick = time.perf_counter()
        for state in states:
            predictor.begin_step(state, decode=True)
        predict_seconds += time.perf_counter() - tick
        for layer in range(num_layers):
            tick = time.perf_counter()
            for state, token in zip(states, tokens):
                predictor.observe_layer(state, layer, token[layer])
            predictions = [predictor.predict(state) for state in states]
            predict_seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            keys = sorted({(layer, expert, "native") for token in tokens for expert in token[layer]})
            for key in keys:
                cache.access(key, step)
                cache.policy.pin(key)
            planner.plan(predictions, layer + 1, step * num_layers + layer)
            while (load := queue.next_load()) is not None:
                queue.complete(load.key)
            for key in keys:
                cache.policy.unpin(key)
            plan_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        for state in states:
            predictor.end_step(state)
        predict_seconds += time.perf_counter() - tick
    del states, predictions, predictor, statistics, planner, queue, cache  # before the memory pass
    request_bytes = traced_request_bytes(num_layers, num_experts, top_k, settings, steps)
    per_token = 1000.0 / (steps * batch)
    return {
        "layers": num_layers, "experts": num_experts, "top_k": top_k, "max_offset": settings.max_offset,
        "statistics_seconds": round(statistics_seconds, 4),
        "new_request_seconds": round(new_request_seconds, 4),
        "request_bytes": request_bytes,
        "predict_ms_per_token": round(predict_seconds * per_token, 3),
        "plan_ms_per_token": round(plan_seconds * per_token, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--batch", type=int, default=2, help="sequences decoding in lockstep")
    parser.add_argument("--steps", type=int, default=16, help="decode tokens timed (after as many warming up)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configure_logging("info")
    load_before = os.getloadavg()
    rows = {}
    for name in tqdm(args.shapes, desc="shapes"):
        rows[name] = measure(*SHAPES[name], args.batch, args.steps)
        logger.info("%s: %s", name, rows[name])
    write_result(args.out, "predictor_cost", load_before, {"engine_commit": engine_commit(), "batch": args.batch,
                                                          "steps": args.steps, "shapes": rows})


if __name__ == "__main__":
    main()
