"""What a request's predictor gains from learning its prompt's routing token by token, on the real Mixtral traces.

In serving, a request's prompt runs through the forward before its first decode token, and the forward computes
each prompt token's routing at every layer. The batch prefetcher (engine.trace.batch) teaches a request its
prompt's last PROMPT_TOKENS tokens that way (`Predictor.observe_prompt`); before, a prompt was observed only as
one prefill step (the union of its experts) and a request's decode started cold. The recorded traces hold a
prompt only as one merged line, so here the first P decode steps of every request stand in for the end of its
prompt (engine.trace.replay.next_layer_recall's ``prompt_steps``): they are not scored, and the recall over the
rest of the request compares

- ``merged``: those steps seen only as one prefill step (the engine before), against
- ``learned``: the same, then learned token by token (the engine now),

for P in ``--prompt-steps`` (default 16 and 32): ``recall``, next-layer recall with M = 2 x top-k experts predicted
(as benchmarks/replay_policies.py), for the sources of the default policy (engine.trace.planner.POLICY_SOURCES) and
for the request's own sources with and without ``recent``; ``policies``, the replay of the default policy at 4 slots
per layer under the ``unbounded`` and ``nvme`` clocks of benchmarks/replay_policies.py, beside per-layer LRU and
global Belady on the same accesses (the issue's bars: hit rate >= 0.9 x global Belady, blobs <= LRU's). Traces: ``h39s_80`` (h39s's decode steps cut into
80-step requests, tuning data) and ``mario`` (held out: evaluated once, after the design and PROMPT_TOKENS were
fixed; ~80-step requests, so P = 32 leaves ~48 scored steps each). Decode steps stand in for prompt tokens: a
prompt's routing may differ from a generation's, so this measures the mechanism, not a real prompt's worth.

``cost``: seconds `observe_prompt` takes for PROMPT_TOKENS random tokens, per request, at Mixtral-8x7B's and
DeepSeek-V3's layer and expert counts (the predictor's shared statistics cold, each token's rows copied from them
as a request's first tokens copy them).

Replay is deterministic: the recall figures are exact. Results: benchmarks/results/prompt_learning.json.

Usage: python benchmarks/prompt_learning.py [--prompt-steps 16 32] [--out PATH]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from pathlib import Path

from common import write_result
from replay_policies import CLOCKS, SLOTS_PER_LAYER
from replay_policies import load as requests_of

from engine.logs import configure_logging
from engine.trace.batch import PROMPT_TOKENS
from engine.trace.planner import POLICY_SOURCES
from engine.trace.predictor import Predictor
from engine.trace.replay import PREDICTIVE_POLICY, next_layer_recall, replay, with_prompt_steps

logger = logging.getLogger("benchmarks.prompt_learning")

RESULTS = Path(__file__).parent / "results" / "prompt_learning.json"
TRACES = ("h39s_80", "mario")
SOURCES = {"policy": POLICY_SOURCES, "transitions+history": ("transitions", "history"),
           "transitions+history+recent": ("transitions", "history", "recent")}
COST_SHAPES = {"mixtral_8x7b": (32, 8, 2), "deepseek_v3": (61, 256, 8)}  # layers, experts, top-k


def recall(prompt_steps: list[int]) -> dict:
    rows: dict = {}
    for trace in TRACES:
        requests = requests_of(trace)
        for name, sources in SOURCES.items():
            row = rows.setdefault(trace, {}).setdefault(name, {})
            row["no_prompt"] = round(next_layer_recall(requests, sources), 4)
            for steps in prompt_steps:
                prompted = with_prompt_steps(requests, steps)
                merged = next_layer_recall(prompted, sources, learn_prompt=False)
                learned = next_layer_recall(prompted, sources, learn_prompt=True)
                row[f"prompt_{steps}"] = {"merged": round(merged, 4), "learned": round(learned, 4),
                                          "gain": round(learned - merged, 4)}
                logger.info("%s %s P=%d: merged %.4f, learned %.4f", trace, name, steps, merged, learned)
    return rows


def policies(prompt_steps: list[int], clocks: tuple[str, ...] = ("unbounded", "nvme")) -> dict:
    rows: dict = {}
    for trace in TRACES:
        requests = requests_of(trace)
        for steps in prompt_steps:
            prompted = with_prompt_steps(requests, steps)
            lru = replay(prompted, "lru", SLOTS_PER_LAYER)
            row = rows.setdefault(trace, {}).setdefault(f"prompt_{steps}", {"lru_blobs": lru.bytes_loaded})
            for clock in clocks:
                for name, learn in (("merged", False), ("learned", True)):
                    result = replay(prompted, PREDICTIVE_POLICY, SLOTS_PER_LAYER, clock=CLOCKS[clock],
                                    learn_prompt=learn)
                    row.setdefault(clock, {})[name] = {
                        "hit_rate": round(result.hit_rate, 4),
                        "over_global_belady": round(result.hit_rate / result.global_belady_hit_rate, 4),
                        "blobs": result.bytes_loaded, "stall_seconds": round(result.stall_seconds, 1)}
                logger.info("%s P=%d %s: %s (LRU %d blobs)", trace, steps, clock, row[clock], lru.bytes_loaded)
    return rows


def cost() -> dict:
    rows = {}
    for name, (layers, experts, top_k) in COST_SHAPES.items():
        rng = random.Random(0)
        tokens = [[sorted(rng.sample(range(experts), top_k)) for _ in range(layers)] for _ in range(PROMPT_TOKENS)]
        predictor = Predictor(layers, experts, top_k)
        best = float("inf")
        for _ in range(3):
            state = predictor.new_request()
            start = time.perf_counter()
            predictor.observe_prompt(state, tokens)
            best = min(best, time.perf_counter() - start)
        rows[name] = {"layers": layers, "experts": experts, "top_k": top_k, "prompt_tokens": PROMPT_TOKENS,
                      "seconds_per_request": round(best, 4)}
        logger.info("%s: observe_prompt of %d tokens %.1f ms", name, PROMPT_TOKENS, best * 1e3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-steps", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configure_logging("info")
    load_before = os.getloadavg()
    write_result(args.out, "prompt_learning", load_before,
                 {"prompt_tokens_learned_in_serving": PROMPT_TOKENS, "recall": recall(args.prompt_steps),
                  "policies": policies(args.prompt_steps), "cost": cost()})


if __name__ == "__main__":
    main()
