"""Decode speed of the engine's experts forward against transformers' stock forward, as fractions of the bound.

For each shape (random bf16 Mixtral-architecture models, all weights resident: the three of benchmarks/bandwidth.py,
and, run alone with ``--shapes``, Mixtral-8x7B's own layer cut to 2 layers, whose fp32 build peaks at ~17 GB of
RAM), in one run on the same machine:

- ``engine``: moeserve's ``LLM.generate`` (registered experts forward, compiled kernel where built) at 1, 4 and
  16 concurrent streams;
- ``engine_16_streams_tok_per_s_on_isa``: 16 streams again with the kernel's decode paths switched to each
  instruction set below the CPU's best (engine.offload.kernels.using_isa; the paths calibrated at load stay), so
  a kernel change shows against the path it adds to in the same run;
- ``engine_1_stream_tok_per_s_one_run``: one stream with every kernel thread reading its rows as one run
  (engine.offload.kernels.using_runs(1), the paths before the kernel read several runs side by side), in rounds
  alternating with the default (the 1-stream figure is the best of those rounds and the first measurement);
- ``engine_1_stream_tok_per_s_module_norms`` and ``_module_routers``: one stream with the model's RMSNorm modules,
  or its routers after their linear layer, running their own torch ops instead of the kernel's ``rms_norm`` or
  ``route_topk`` (engine.replacement.original_modules; engine.norms, engine.routers), in the same alternating rounds
  (each arm's figure is the best of its rounds; ``engine_1_stream_default_over_arm_per_round``: the median over the
  rounds of the default's tok/s over the arm's in that round, the steadier comparison on a host whose bandwidth
  swings within seconds);
- ``transformers``: the same checkpoint through transformers' own ``generate`` (its default experts
  implementation), one stream.

Decode tok/s per stream excludes the prefill: (tokens - 1) / (time to last token - time to first token), the
first token's time taken from a run with ``max_tokens=1``. The bound is the RAM stream rate measured in the same
run divided by the bytes a token touches in bf16 (benchmarks/bandwidth.py); the rate is the best of the run's first
measurement, two taken around each shape's engine runs and the paired ones below (``stream_bytes_per_s_measured``),
since this host's memory bandwidth swings within minutes. As it swings within seconds too, each one-stream round of
the default is also paired with stream rates taken just before and just after it (``engine_1_stream_paired_rounds``):
the round's fraction is its tok/s over the bound from the higher of the two, and ``engine_fraction_of_bound_paired``
is their median — the fraction at the bandwidth the host gave at that moment, where the run-wide fraction can fall
on a fast minute's bound (low) or miss it (above 1). ``engine_load_seconds``: the time
``LLM(...)`` took (reading the checkpoint, packing the experts, timing kernel against torch per shape). Each model
is written to a temporary directory and deleted after its shape. Results: benchmarks/results/experts_decode.json.

Usage: python benchmarks/experts_decode.py [--shapes NAME ...] [--layers N] [--max-tokens 32]
(``--layers`` trims every shape to N layers for a quick check; the bound is computed for the trimmed model).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import engine  # noqa: F401, I001  (before torch: sets OMP_WAIT_POLICY=PASSIVE, see engine/__init__.py)
import torch
from bandwidth import bytes_per_token, stream_rate
from common import write_mixtral, write_result
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.logs import configure_logging
from engine.norms import KernelRMSNorm
from engine.offload.kernels import ISAS, best_isa, load_experts_kernel, using_isa, using_runs
from engine.replacement import original_modules
from engine.routers import KernelTopKRouter

logger = logging.getLogger("benchmarks.experts_decode")

RESULTS = Path(__file__).parent / "results" / "experts_decode.json"
SHAPES = {
    "mixtral_16x16_h1024_i3584": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=16,
                                      num_local_experts=16, num_experts_per_tok=2),
    "mixtral_32x8_h1024_i3584": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=32,
                                     num_local_experts=8, num_experts_per_tok=2),
    "mixtral_8x64_h2048_i768_top8": dict(hidden_size=2048, intermediate_size=768, num_hidden_layers=8,
                                         num_local_experts=64, num_experts_per_tok=8),
    # Mixtral-8x7B's own layer (its attention heads included), 2 of its 32 layers: 5.6 GB of bf16 experts, what
    # the kernel and the per-layer overhead come to at the size people serve (the three above are the issue's).
    "mixtral8x7b_layer_2x8_h4096_i14336": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                               num_local_experts=8, num_experts_per_tok=2, num_attention_heads=32,
                                               num_key_value_heads=8),
}
ISSUE_SHAPES = tuple(SHAPES)[:3]
PROMPT_LEN = 16
STREAM_BYTES = int(1.5 * 2**30)  # the stream rate's working set (benchmarks/bandwidth.py)
ONE_STREAM_ROUNDS = 5  # alternating rounds of one stream: one run, module norms, module routers, default


def with_heads(shape: dict) -> dict:
    """``shape`` with attention heads of 128 dimensions and half as many key/value heads, unless it names its own."""
    heads = shape["hidden_size"] // 128
    return {"num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2), **shape}


def prompts(count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(count)
    return torch.randint(8, 1000, (count, PROMPT_LEN), generator=generator).tolist()


def engine_decode(llm: LLM, streams: int, max_tokens: int, batch: list[list[int]] | None = None) -> float:
    """Aggregate decode tok/s of ``streams`` concurrent greedy streams (prefill time subtracted), from ``batch``'s
    prompts (default: `prompts`)."""
    batch = prompts(streams) if batch is None else batch
    first = _seconds(lambda: llm.generate(batch, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
    total = _seconds(lambda: llm.generate(batch, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                ignore_eos=True)))
    return streams * (max_tokens - 1) / (total - first)


def transformers_decode(model: torch.nn.Module, max_tokens: int) -> float:
    """One-stream decode tok/s of transformers' generate (prefill time subtracted)."""
    ids = torch.tensor(prompts(1))

    def run(n: int) -> None:
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    first = _seconds(lambda: run(1))
    return (max_tokens - 1) / (_seconds(lambda: run(max_tokens)) - first)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_shape(name: str, shape: dict, first_rate: float, max_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = write_mixtral(Path(tmp), with_heads(shape), torch.bfloat16)
        start = time.perf_counter()
        llm = LLM(tmp, max_model_len=PROMPT_LEN + max_tokens + 16, max_num_seqs=16, max_num_batched_tokens=512)
        load = time.perf_counter() - start  # reading the checkpoint, packing the experts, calibrating the paths
        engine_decode(llm, 1, 4)  # warm-up
        # The bound from the best stream rate of the run's first measurement, two taken before and after this shape's
        # engine runs and those paired with its one-stream rounds: this host's memory bandwidth swings within
        # seconds (README), and the bound must not be read from a slow moment while the engine ran in a fast one.
        rates = [first_rate, stream_rate(STREAM_BYTES)["best"]]
        engine = {streams: engine_decode(llm, streams, max_tokens) for streams in (1, 4, 16)}
        lower_isas = {}  # 16 streams with the kernel's decode paths on each instruction set below the best
        arms = {  # 1 stream with one thing switched back, in rounds alternating with the default
            "one_run": lambda: using_runs(1),  # every kernel thread reading one run of rows (before the runs)
            "module_norms": lambda: original_modules(KernelRMSNorm),  # the RMSNorm modules' torch ops
            "module_routers": lambda: original_modules(KernelTopKRouter),  # the routers' torch ops after the linear
        }
        rounds: dict[str, list[float]] = {arm: [] for arm in (*arms, "default")}
        paired = []  # (1-stream tok/s, stream rate just before, just after) of the default's rounds
        if load_experts_kernel() is not None:
            for isa in ISAS[: ISAS.index(best_isa())]:
                with using_isa(isa):
                    lower_isas[isa] = engine_decode(llm, 16, max_tokens)
            for _ in range(ONE_STREAM_ROUNDS):  # alternating: the arms compare on the same minutes
                for arm, switch in arms.items():
                    with switch():
                        rounds[arm].append(engine_decode(llm, 1, max_tokens))
                before = stream_rate(STREAM_BYTES)["best"]
                rounds["default"].append(engine_decode(llm, 1, max_tokens))
                paired.append((rounds["default"][-1], before, stream_rate(STREAM_BYTES)["best"]))
            engine[1] = max(engine[1], *rounds["default"])
        rates.append(stream_rate(STREAM_BYTES)["best"])
        rates.extend(rate for _, before, after in paired for rate in (before, after))  # the run-wide bound: all
        token_bytes = bytes_per_token(config, torch.bfloat16)
        bound = max(rates) / token_bytes
        paired_fractions = [tok_per_s * token_bytes / max(before, after) for tok_per_s, before, after in paired]
        del llm
        gc.collect()
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype="auto").eval()
        transformers_decode(model, 4)  # warm-up
        stock = transformers_decode(model, max_tokens)
        del model
    row = {
        "stream_bytes_per_s_measured": [round(r) for r in rates],
        "bound_tok_per_s": round(bound, 2),
        "engine_load_seconds": round(load, 1),
        "engine_tok_per_s": {str(s): round(v, 2) for s, v in engine.items()},
        "engine_16_streams_tok_per_s_on_isa": {isa: round(v, 2) for isa, v in lower_isas.items()},
        **{f"engine_1_stream_tok_per_s_{arm}": round(max(rounds[arm]), 2) if rounds[arm] else None for arm in arms},
        "engine_1_stream_default_over_arm_per_round": {  # the steadier A/B on this host: ratios within a round
            arm: round(statistics.median(d / a for d, a in zip(rounds["default"], rounds[arm])), 3)
            if rounds[arm] else None for arm in arms},
        "transformers_tok_per_s": round(stock, 2),
        "engine_fraction_of_bound": round(engine[1] / bound, 3),
        "engine_1_stream_paired_rounds": [
            {"tok_per_s": round(tok_per_s, 2), "stream_bytes_per_s_before": round(before),
             "stream_bytes_per_s_after": round(after), "fraction_of_bound": round(fraction, 3)}
            for (tok_per_s, before, after), fraction in zip(paired, paired_fractions)],
        "engine_fraction_of_bound_paired": (round(statistics.median(paired_fractions), 3) if paired_fractions
                                            else None),
        "transformers_fraction_of_bound": round(stock / bound, 3),
        "engine_over_transformers": round(engine[1] / stock, 3),
    }
    logger.info("%s: bound %.1f tok/s, engine %.1f (%.2f of bound; paired %s), transformers %.1f (%.2f)", name,
                bound, engine[1], engine[1] / bound, row["engine_fraction_of_bound_paired"], stock, stock / bound)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(ISSUE_SHAPES),
                        help="default: the three issue shapes; run the Mixtral-8x7B layer alone (its build needs "
                             "~17 GB, and memory of earlier shapes is not all returned within one process)")
    parser.add_argument("--layers", type=int, help="trim every shape to this many layers (quick check)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configure_logging("info")
    load_before = os.getloadavg()
    rate = stream_rate(STREAM_BYTES)
    rows = {}
    for name in args.shapes:
        shape = dict(SHAPES[name], **({"num_hidden_layers": args.layers} if args.layers else {}))
        rows[name] = measure_shape(name, shape, rate["best"], args.max_tokens)
    write_result(args.out, "experts_decode", load_before, {
        "stream_bytes_per_s": {k: round(v) for k, v in rate.items()},
        "layers_override": args.layers,
        "max_tokens": args.max_tokens,
        "shapes": rows,
    })


if __name__ == "__main__":
    main()
