"""How far ahead routing can be predicted on the real Mixtral traces: layers ahead within a token, and tokens ahead.

Two measurements per trace (``h39s``, ``h39s_80``, ``mario`` of benchmarks/replay_policies.py; nothing here is
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

Deterministic: the figures are exact. Results: benchmarks/results/prediction_horizon.json.

Usage: python benchmarks/prediction_horizon.py [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

from common import write_result
from replay_policies import load as requests_of

from engine.logs import configure_logging
from engine.trace.horizon import horizon_figures
from engine.trace.planner import POLICY_SOURCES
from engine.trace.replay import layer_recall

logger = logging.getLogger("benchmarks.prediction_horizon")

RESULTS = Path(__file__).parent / "results" / "prediction_horizon.json"
TRACES = ("h39s", "h39s_80", "mario")
DISTANCES = tuple(range(1, 9))
SOURCES = {"policy": POLICY_SOURCES, "frequency": ()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="result JSON (default %(default)s)")
    args = parser.parse_args()
    configure_logging("info")
    load_before = os.getloadavg()
    recall, horizon = {}, {}
    for trace in TRACES:
        requests = requests_of(trace)
        recall[trace] = {name: {str(distance): value for distance, value in
                                layer_recall(requests, sources, DISTANCES).items()}
                         for name, sources in SOURCES.items()}
        horizon[trace] = dataclasses.asdict(horizon_figures(requests))
        logger.info("%s: recall d=1..8 %s; token AUC next %s, after next %s", trace,
                    [round(value, 3) for value in recall[trace]["policy"].values()],
                    {name: round(value, 3) for name, value in horizon[trace]["next_visit"].items()},
                    {name: round(value, 3) for name, value in horizon[trace]["after_next"].items()})
    write_result(args.out, "prediction_horizon", load_before, {
        "traces": list(TRACES), "predicted": "2 x top_k", "sources": {name: list(s) for name, s in SOURCES.items()},
        "layer_recall": recall, "token_horizon": horizon})


if __name__ == "__main__":
    main()
