"""How far ahead routing can be predicted on the real Mixtral traces: layers ahead within a token, and tokens ahead.

Three measurements per trace (``h39s``, ``h39s_80``, ``mario`` of benchmarks/replay_policies.py; nothing here is
tuned, so mario is scored as the others):

- ``layer_recall``: the predictor's recall of a token's experts d = 1..8 layers ahead of the frontier within the
  same token (engine.trace.replay.layer_recall, M = 2 x top-k), for the default policy's sources
  (engine.trace.planner.POLICY_SOURCES) and the per-layer frequency baseline. A prefetch must be issued as many
  layers ahead as a read takes (3 at the engine benchmark's ratio), so this is the quality of the predictions a
  prefetch acts on.
- ``token_horizon``: how well a request's own past ranks the keys its next token uses, and — among the keys the
  next token does not use, which the cache's priorities cannot tell apart — those the token after it uses
  (engine.trace.horizon: mean ranking AUC per token, 0.5 = a coin). Keeping the right keys across tokens is what
  loads fewer blobs; with reads the bottleneck, blobs are the stall.

- ``knowing_ahead``: what knowing more of the future is worth to the same planner: the replay (4 slots per layer)
  of the default policy and of the oracles that know each key's next visit (``oracle``), its next two
  (``oracle-2``) and all of them (``oracle-future``) (engine.trace.replay.ORACLE_VISITS), beside on-demand global
  LRU and global Belady, under the ``unbounded``, ``nvme`` and ``read_3_layers`` clocks of
  benchmarks/replay_policies.py; each with its stall over global LRU's (None with instant reads).

Deterministic: the figures are exact on a given CPU. Results: benchmarks/results/prediction_horizon.json.

Usage: python benchmarks/prediction_horizon.py [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

from common import write_result
from replay_policies import CLOCKS, SLOTS_PER_LAYER
from replay_policies import load as requests_of

from engine.logs import configure_logging
from engine.trace.horizon import horizon_figures
from engine.trace.planner import POLICY_SOURCES
from engine.trace.replay import ORACLE_VISITS, PREDICTIVE_POLICY, layer_recall, replay

logger = logging.getLogger("benchmarks.prediction_horizon")

RESULTS = Path(__file__).parent / "results" / "prediction_horizon.json"
TRACES = ("h39s", "h39s_80", "mario")
DISTANCES = tuple(range(1, 9))
SOURCES = {"policy": POLICY_SOURCES, "frequency": ()}
KNOWING_CLOCKS = ("unbounded", "nvme", "read_3_layers")
KNOWING_POLICIES = ("global-lru", PREDICTIVE_POLICY, *ORACLE_VISITS, "global-belady")


def knowing_ahead(trace: str) -> dict[str, dict[str, dict[str, float]]]:
    """{clock: {policy: hit rate, blobs, stall and stall over global LRU's}} on ``trace`` (module docstring)."""
    requests = requests_of(trace)
    figures = {}
    for clock in KNOWING_CLOCKS:
        results = {policy: replay(requests, policy, SLOTS_PER_LAYER, clock=CLOCKS[clock])
                   for policy in KNOWING_POLICIES}
        lru_stall = results["global-lru"].stall_seconds if clock != "unbounded" else 0.0  # reads take no time
        figures[clock] = {policy: {"hit_rate": result.hit_rate, "bytes_loaded": result.bytes_loaded,
                                   "stall_seconds": result.stall_seconds,
                                   "stall_over_global_lru": result.stall_seconds / lru_stall if lru_stall else None}
                          for policy, result in results.items()}
        logger.info("%s @%s: blobs %s, stall / global LRU %s", trace, clock,
                    {policy: each["bytes_loaded"] for policy, each in figures[clock].items()},
                    {policy: None if each["stall_over_global_lru"] is None else round(each["stall_over_global_lru"], 3)
                     for policy, each in figures[clock].items()})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="result JSON (default %(default)s)")
    args = parser.parse_args()
    configure_logging("info")
    load_before = os.getloadavg()
    recall, horizon, knowing = {}, {}, {}
    for trace in TRACES:
        requests = requests_of(trace)
        recall[trace] = {name: {str(distance): value for distance, value in
                                layer_recall(requests, sources, DISTANCES).items()}
                         for name, sources in SOURCES.items()}
        horizon[trace] = dataclasses.asdict(horizon_figures(requests))
        knowing[trace] = knowing_ahead(trace)
        logger.info("%s: recall d=1..8 %s; token AUC next %s, after next %s", trace,
                    [round(value, 3) for value in recall[trace]["policy"].values()],
                    {name: round(value, 3) for name, value in horizon[trace]["next_visit"].items()},
                    {name: round(value, 3) for name, value in horizon[trace]["after_next"].items()})
    write_result(args.out, "prediction_horizon", load_before, {
        "traces": list(TRACES), "predicted": "2 x top_k", "sources": {name: list(s) for name, s in SOURCES.items()},
        "slots_per_layer": SLOTS_PER_LAYER, "layer_recall": recall, "token_horizon": horizon,
        "knowing_ahead": knowing})


if __name__ == "__main__":
    main()
