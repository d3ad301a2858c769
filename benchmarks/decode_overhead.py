"""Where a decode token's time goes beyond moving weights: the Python and dispatch per layer, module by module.

Issue #5's shapes decode at 0.5-0.7 of the bandwidth bound where llama.cpp reaches ~0.8 (llamacpp_decode.py), and
the kernels themselves stream at the kernel's standalone speed: the rest is the time between them. This benchmark
measures that time directly. Each issue shape's layer count, expert count and top-k are built with every weight
tiny (hidden 128, intermediate 128, one attention head of 128): the kernels then cost next to nothing, and what a
token takes is the per-layer and per-step overhead of the engine (or of transformers' stock forward, for
comparison) at that depth. In one run per shape:

- ``engine_ms_per_token``: moeserve's one-stream greedy decode (prefill time subtracted, as experts_decode.py),
  best of ``--rounds`` rounds; ``transformers_ms_per_token``: transformers' own ``generate`` on the same checkpoint
  (its default experts implementation and attention), best of as many rounds;
- ``breakdown_us_per_layer``: one more engine run with forward hooks (torch's ``register_forward_pre_hook`` /
  ``register_forward_hook``) on every module of interest and the engine's attention function registered as a timed
  wrapper under another name (transformers' ``AttentionInterface``): time per layer inside each. The hooks add
  ~1-2 us per hooked call, so this run's total (``hooked_ms_per_token``) is above the plain one; the split is
  what to read. ``moeserve`` entries are the engine's own code (its linear, RMSNorm and router modules, the
  registered experts forward, the paged attention function); ``transformers`` entries are what transformers'
  modules do around them (``self_attn`` less its projections and the attention function: RoPE, reshapes, the
  cache call; ``moe_block`` less router and experts; ``decoder_layer`` less its attention, MoE block and norms:
  the residual adds and the call itself); ``per_step_ms`` is what a step costs outside the layers (embedding,
  rotary table, mask, final norm, LM head, and the engine's scheduling, sampling and detokenizing).

Usage: python benchmarks/decode_overhead.py [--shapes NAME ...] [--max-tokens 64] [--rounds 3]
Results: benchmarks/results/decode_overhead.json.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import tempfile
import time
from pathlib import Path

import engine  # noqa: F401, I001  (before torch: sets OMP_WAIT_POLICY=PASSIVE, see engine/__init__.py)
import torch
from common import write_mixtral, write_result
from experts_decode import ISSUE_SHAPES, SHAPES, engine_decode, transformers_decode
from transformers import AttentionInterface, AutoModelForCausalLM

from engine import LLM
from engine.attention import ATTENTION_NAME, paged_attention_forward
from engine.dense import RowStreamLinear
from engine.logs import configure_logging
from engine.norms import KernelRMSNorm
from engine.offload.experts import is_experts_module
from engine.routers import KernelTopKRouter

logger = logging.getLogger("benchmarks.decode_overhead")

RESULTS = Path(__file__).parent / "results" / "decode_overhead.json"
TINY = dict(hidden_size=128, intermediate_size=128, num_attention_heads=1, num_key_value_heads=1, head_dim=128)
"""Every weight tiny: the kernels cost next to nothing, the overhead is what is left."""
TIMED_ATTENTION = "moeserve_paged_timed"


class Timers:
    """Accumulated seconds and calls per name, from forward hooks and the timed attention function."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self._started: dict[int, float] = {}

    def hook(self, name: str, module: torch.nn.Module) -> None:
        """Time every call of ``module`` under ``name``."""
        key = id(module)

        def before(*_args, **_kwargs) -> None:
            self._started[key] = time.perf_counter()

        def after(*_args, **_kwargs) -> None:
            self.seconds[name] += time.perf_counter() - self._started.pop(key)
            self.calls[name] += 1

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def timed(self, name: str, function):
        """``function`` timed under ``name``."""

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return wrapper

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def instrument(model: torch.nn.Module, timers: Timers) -> None:
    """Hooks on the decoder layers and the modules inside them, and the timed attention function selected."""
    for layer in model.model.layers:
        timers.hook("decoder_layer", layer)
        timers.hook("self_attn", layer.self_attn)
        for child in layer.self_attn.children():
            if isinstance(child, RowStreamLinear):
                timers.hook("projections", child)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            timers.hook("norms", norm)
        block = layer.mlp
        timers.hook("moe_block", block)
        for child in block.children():
            if isinstance(child, KernelTopKRouter) or child is getattr(block, "gate", None):
                timers.hook("router", child)
            elif is_experts_module(child):
                timers.hook("experts", child)
    timers.hook("model", model)
    AttentionInterface.register(TIMED_ATTENTION, timers.timed("attention_function", paged_attention_forward))
    model.set_attn_implementation(TIMED_ATTENTION)


def breakdown(timers: Timers, layers: int, tokens: int) -> dict:
    """Microseconds per layer and token of each part (module docstring), and the step's rest in ms."""
    per_layer = {name: seconds * 1e6 / (tokens * layers) for name, seconds in timers.seconds.items()}
    get = per_layer.get
    ours = {
        "projections": get("projections", 0.0),
        "attention_function": get("attention_function", 0.0),
        "norms": get("norms", 0.0),
        "router": get("router", 0.0),
        "experts": get("experts", 0.0),
    }
    theirs = {
        "self_attn_rest": get("self_attn", 0.0) - ours["projections"] - ours["attention_function"],
        "moe_block_rest": get("moe_block", 0.0) - ours["router"] - ours["experts"],
        "decoder_layer_rest": get("decoder_layer", 0.0) - get("self_attn", 0.0) - get("moe_block", 0.0) - ours["norms"],
    }
    return {
        "moeserve": {k: round(v, 1) for k, v in ours.items()},
        "transformers": {k: round(v, 1) for k, v in theirs.items()},
        "moeserve_total": round(sum(ours.values()), 1),
        "transformers_total": round(sum(theirs.values()), 1),
        "decoder_layer_total": round(get("decoder_layer", 0.0), 1),
        "calls_per_token": {name: round(calls / tokens, 1) for name, calls in timers.calls.items()},
    }


def measure_shape(name: str, shape: dict, max_tokens: int, rounds: int) -> dict:
    layers = shape["num_hidden_layers"]
    with tempfile.TemporaryDirectory() as tmp:
        write_mixtral(Path(tmp), {**shape, **TINY}, torch.bfloat16)
        llm = LLM(tmp, max_model_len=64 + max_tokens, max_num_seqs=16, max_num_batched_tokens=512)
        engine_decode(llm, 1, 8)  # warm-up
        engine_ms = min(1e3 / engine_decode(llm, 1, max_tokens) for _ in range(rounds))
        model = llm.engine.runner.model
        timers = Timers()
        instrument(model, timers)
        engine_decode(llm, 1, 8)
        timers.clear()
        start = time.perf_counter()
        hooked_ms = 1e3 / engine_decode(llm, 1, max_tokens)
        # engine_decode runs a 1-token generate and a max_tokens one: the hooks saw both (1 + max_tokens forwards
        # with one prefill each); a prefill forward at this size costs about a decode step, so count them all.
        forwards = timers.calls["model"]
        elapsed = time.perf_counter() - start
        parts = breakdown(timers, layers, forwards)
        parts["per_step_ms"] = round(elapsed * 1e3 / forwards - timers.seconds["decoder_layer"] * 1e3 / forwards, 3)
        model.set_attn_implementation(ATTENTION_NAME)
        del llm, model
        stock = AutoModelForCausalLM.from_pretrained(tmp, dtype="auto").eval()
        transformers_decode(stock, 4)  # warm-up
        stock_ms = min(1e3 / transformers_decode(stock, max_tokens) for _ in range(rounds))
    row = {
        "layers": layers, "experts": shape["num_local_experts"], "top_k": shape["num_experts_per_tok"],
        "engine_ms_per_token": round(engine_ms, 3),
        "engine_us_per_layer": round(engine_ms * 1e3 / layers, 1),
        "transformers_ms_per_token": round(stock_ms, 3),
        "transformers_us_per_layer": round(stock_ms * 1e3 / layers, 1),
        "hooked_ms_per_token": round(hooked_ms, 3),
        "breakdown_us_per_layer": parts,
    }
    logger.info("%s: engine %.2f ms/token (%.0f us/layer; moeserve's code %.0f, transformers' %.0f), transformers "
                "%.2f", name, engine_ms, row["engine_us_per_layer"], parts["moeserve_total"],
                parts["transformers_total"], stock_ms)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(ISSUE_SHAPES))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configure_logging("info")
    load_before = os.getloadavg()
    rows = {name: measure_shape(name, SHAPES[name], args.max_tokens, args.rounds) for name in args.shapes}
    write_result(args.out, "decode_overhead", load_before, {
        "tiny_weights": TINY, "max_tokens": args.max_tokens, "rounds": args.rounds, "shapes": rows})


if __name__ == "__main__":
    main()
