"""Decode beside a busy core: the engine alone and with another process spinning, with OpenMP's default and passive
waiting, in one run.

A server rarely has its cores to itself: its HTTP thread, expert reads and neighbours want them too. Threads that
wait for each other at a barrier suffer most there: one descheduled thread holds up the rest for a time slice.
This benchmark decodes greedily on the embedded demo model (models/demo-moe) at 1 and 8 concurrent streams, in a
fresh child process per condition so the OpenMP setting takes effect: ``OMP_WAIT_POLICY`` unset (threads spin a
while, then sleep) or ``PASSIVE`` (they sleep at once), each alone and beside one Python busy loop (started before
the child, ended after it). Reported: decode tok/s (prefill excluded, best of ``--rounds``) per condition and
the ratios busy / alone. Results: benchmarks/results/busy_core.json.

Usage: python benchmarks/busy_core.py [--model models/demo-moe] [--tokens 64] [--rounds 3] [--streams 1 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from common import write_result

from engine.logs import configure_logging

logger = logging.getLogger("benchmarks.busy_core")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "busy_core.json"
POLICIES = {"default": None, "passive": "PASSIVE"}


def child(model: str, streams: list[int], tokens: int, rounds: int) -> None:
    """In the child: decode tok/s per stream count, printed as one JSON line."""
    from engine import LLM, SamplingParams

    llm = LLM(model, max_num_seqs=max(streams))
    rates = {}
    for count in streams:
        prompts = [[10 + i, 20 + i, 30, 40, 50, 60, 70, 80] for i in range(count)]

        def seconds(max_tokens: int) -> float:
            start = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            return time.perf_counter() - start

        seconds(4)  # warm-up
        best = max(count * (tokens - 1) / (seconds(tokens) - seconds(1)) for _ in range(rounds))
        rates[str(count)] = round(best, 1)
    print(json.dumps(rates))


def run_condition(args: argparse.Namespace, policy: str, busy: bool) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if POLICIES[policy] is not None:
        env["OMP_WAIT_POLICY"] = POLICIES[policy]
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        command = [sys.executable, __file__, "child", "--model", args.model, "--tokens", str(args.tokens),
                   "--rounds", str(args.rounds), "--streams", *map(str, args.streams)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    rates = json.loads(done.stdout.strip().splitlines()[-1])
    logger.info("%s, %s: %s tok/s", policy, "busy core" if busy else "alone", rates)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=["parent", "child"], default="parent")
    parser.add_argument("--model", default=str(ROOT / "models" / "demo-moe"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.mode == "child":
        child(args.model, args.streams, args.tokens, args.rounds)
        return
    configure_logging("info")
    load_before = os.getloadavg()
    results = {policy: {("busy" if busy else "alone"): run_condition(args, policy, busy) for busy in (False, True)}
               for policy in POLICIES}
    for row in results.values():
        row["busy_over_alone"] = {s: round(row["busy"][s] / row["alone"][s], 3) for s in row["alone"]}
    write_result(args.out, "busy_core", load_before, {"model": args.model, "tokens": args.tokens,
                                                      "rounds": args.rounds, "tok_per_s": results})


if __name__ == "__main__":
    main()
