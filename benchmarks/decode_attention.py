"""Decode attention on the compiled kernel against torch's SDPA, alone and in the engine, in one run.

Decode attends one new token per request over its context. engine.attention sends those tokens to the kernel's
``torch.ops.moeserve.decode_attention`` on the CPU, which reads the KV store in place through the step's slots;
before, the store gathered every context's rows at every layer and every request went through
``F.scaled_dot_product_attention``. The paths are measured in the same process:

- ``kernel``: as the engine runs;
- ``kernel_gathered`` (engine only): the kernel over gathered rows (the runner's ``kv_by_slot`` off), so the
  in-place read shows on its own;
- ``torch``: the attention function finding no kernel (``engine.attention.load_experts_kernel`` patched to return
  None for the block: exactly what a machine without the kernel runs, gathered rows and SDPA).

- ``call``: ``paged_attention_forward`` for one decode token over a context of 16 to 4096 rows (the gathered
  key/value rows given), per attention shape and dtype: the median microseconds of ``--calls`` calls after a
  warm-up, kernel and torch alternating in rounds;
- ``engine``: one-stream decode tok/s of ``LLM.generate`` on a random bf16 Mixtral of 16 layers (hidden 1024,
  intermediate 3584, 4 experts, top-2: a token touches what one of the issue-#5 16 x 16 shape touches) after a
  prompt of 16, 1024 and 4000 tokens, each path in turn, ``--rounds`` rounds, best and median (on these shared
  machines a round can run far slower than the next, so the best is the steadier figure).

Results: benchmarks/results/decode_attention.json.

Usage: python benchmarks/decode_attention.py [--calls 2000] [--rounds 5] [--max-tokens 33]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import engine  # noqa: F401, I001  (before torch: sets OMP_WAIT_POLICY=PASSIVE, see engine/__init__.py)
import torch
from common import require_experts_kernel, write_mixtral, write_result

import engine.attention
from engine import LLM, SamplingParams
from engine.attention import BatchLayout, paged_attention_forward
from engine.logs import configure_logging

logger = logging.getLogger("benchmarks.decode_attention")

RESULTS = Path(__file__).parent / "results" / "decode_attention.json"
ATTENTION_SHAPES = {  # name: (query heads, key/value heads, head dim)
    "h8_kv4_d128": (8, 4, 128),  # the issue-#5 shapes' attention (hidden 1024)
    "h32_kv8_d128": (32, 8, 128),  # Mixtral-8x7B's
}
CONTEXTS = (16, 64, 256, 1024, 4096)
ENGINE_SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=16, num_local_experts=4,
                    num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=4)
ENGINE_PROMPTS = (16, 1024, 4000)
PATHS = ("kernel", "torch")
ENGINE_PATHS = ("kernel", "kernel_gathered", "torch")


@contextlib.contextmanager
def attention_path(path: str, llm: LLM | None = None) -> Iterator[None]:
    """The block's attention on ``path`` (ENGINE_PATHS; ``kernel_gathered`` needs the ``llm``)."""
    if path == "kernel":
        yield
    elif path == "kernel_gathered":
        runner = llm.engine.runner
        by_slot, runner.kv_by_slot = runner.kv_by_slot, False
        try:
            yield
        finally:
            runner.kv_by_slot = by_slot
    else:
        with mock.patch.object(engine.attention, "load_experts_kernel", lambda: None):
            yield


def median_microseconds(fn: Callable[[], None], calls: int) -> dict[str, float]:
    """Median microseconds of ``calls`` timed calls of ``fn`` on each attention path after a warm-up; the paths
    alternate in rounds of 100 calls (the path is switched outside the timed calls)."""
    for path in PATHS:
        with attention_path(path):
            for _ in range(50):
                fn()
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(calls // 100):
        for path in PATHS:
            with attention_path(path):
                for _ in range(100):
                    start = time.perf_counter()
                    fn()
                    times[path].append(time.perf_counter() - start)
    return {path: statistics.median(t) * 1e6 for path, t in times.items()}


def measure_calls(calls: int) -> dict:
    rows: dict = {}
    for name, (heads, kv_heads, dim) in ATTENTION_SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            for context in CONTEXTS:
                layout = BatchLayout.build([(context - 1, 1, list(range((context + 15) // 16)))], block_size=16)
                query = torch.randn(1, 1, heads, dim).to(dtype).transpose(1, 2)  # [1, H, 1, d] as the model's
                key = torch.randn(1, kv_heads, context, dim).to(dtype)
                value = torch.randn(1, kv_heads, context, dim).to(dtype)

                def call() -> None:
                    paged_attention_forward(None, query, key, value, None, scaling=dim**-0.5, moeserve_batch=layout)

                with torch.no_grad():
                    micros = median_microseconds(call, calls)
                row = {f"{path}_us": round(micros[path], 1) for path in PATHS}
                row["torch_over_kernel"] = round(micros["torch"] / micros["kernel"], 2)
                rows.setdefault(name, {}).setdefault(str(dtype).removeprefix("torch."), {})[str(context)] = row
                logger.info("%s %s context %d: kernel %.1f us, torch %.1f us (%.1f x)", name, dtype, context,
                            micros["kernel"], micros["torch"], micros["torch"] / micros["kernel"])
    return rows


def measure_engine(rounds: int, max_tokens: int) -> dict:
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_mixtral(Path(tmp), ENGINE_SHAPE, torch.bfloat16)
        llm = LLM(tmp, max_model_len=max(ENGINE_PROMPTS) + max_tokens + 16, max_num_seqs=4,
                  max_num_batched_tokens=2048)
        for prompt_len in ENGINE_PROMPTS:
            prompt = [[8 + (7 * i) % 900 for i in range(prompt_len)]]

            def seconds(tokens: int) -> float:
                start = time.perf_counter()
                llm.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
                return time.perf_counter() - start

            seconds(4)  # warm-up
            rates: dict[str, list[float]] = {path: [] for path in ENGINE_PATHS}
            for _ in range(rounds):
                for path in ENGINE_PATHS:
                    with attention_path(path, llm):
                        rates[path].append((max_tokens - 1) / (seconds(max_tokens) - seconds(1)))
            row: dict = {f"{path}_tok_per_s": {"best": round(max(r), 2), "median": round(statistics.median(r), 2)}
                         for path, r in rates.items()}
            for baseline in ENGINE_PATHS[1:]:
                row[f"kernel_over_{baseline}"] = {
                    "best": round(max(rates["kernel"]) / max(rates[baseline]), 3),
                    "median": round(statistics.median(rates["kernel"]) / statistics.median(rates[baseline]), 3)}
            rows[str(prompt_len)] = row
            logger.info("engine, prompt %d, best tok/s: %s", prompt_len,
                        ", ".join(f"{path} {max(r):.1f}" for path, r in rates.items()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=33)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configure_logging("info")
    require_experts_kernel()
    load_before = os.getloadavg()
    calls = measure_calls(args.calls)
    engine_rows = measure_engine(args.rounds, args.max_tokens)
    write_result(args.out, "decode_attention", load_before, {
        "calls": args.calls,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "engine_shape": ENGINE_SHAPE,
        "call_microseconds": calls,
        "engine_one_stream_decode": engine_rows,
    })


if __name__ == "__main__":
    main()
