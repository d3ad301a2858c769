"""Aggregate decode throughput of the continuous-batching engine against transformers, in one run.

For each concurrency c (default 1, 4, 16) the same c requests (random prompts of --prompt-len tokens, exactly
--max-tokens greedy tokens each) are completed three ways, one after the other on the same model in this process:

- ``engine``: moeserve's ``LLM.generate`` with all c requests at once (continuous batching, paged attention,
  the registered experts forward);
- ``hf_sequential``: transformers ``generate(do_sample=False)``, one request at a time;
- ``hf_generate_batch``: transformers' own continuous batching, ``generate_batch`` with all c requests.

Throughput is generated tokens / wall seconds (prefill included: prompts are short). Each measurement is preceded by
an untimed warm-up on one request. The result, with machine facts and the load average before and after, goes to
benchmarks/results/engine_throughput.json; ratios (engine / baseline) are the figures to compare across machines.

Usage: python benchmarks/engine_throughput.py [--concurrency 1 4 16] [--max-tokens 64] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import engine  # noqa: F401, I001  (before torch: sets OMP_WAIT_POLICY=PASSIVE, see engine/__init__.py)
import torch
from common import write_mixtral, write_result
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

from engine import LLM, SamplingParams
from engine.logs import configure_logging

logger = logging.getLogger("benchmarks.engine_throughput")

RESULTS = Path(__file__).parent / "results" / "engine_throughput.json"
# A small Mixtral: 8 layers x 8 experts top-2, large enough that the model's math, not Python, dominates a step.
MODEL_SHAPE = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
)


def prompts_for(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``count`` random prompts of ``length`` ordinary token ids (special tokens, ids < 8, avoided)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(8, vocab, (count, length), generator=generator).tolist()


def timed(fn: Callable[[], int]) -> dict[str, float]:
    """Run ``fn`` (returns tokens generated) once; tokens, seconds and tokens per second."""
    start = time.perf_counter()
    tokens = fn()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tok_per_s": round(tokens / seconds, 2)}


def run_engine(llm: LLM, prompts: list[list[int]], max_tokens: int) -> int:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return sum(len(o.outputs[0].token_ids) for o in llm.generate(prompts, params))


def run_hf_sequential(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> int:
    generated = 0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        generated += out.shape[1] - ids.shape[1]
    return generated


def run_hf_batch(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> int:
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb_config = ContinuousBatchingConfig(num_blocks=64 * len(prompts), max_batch_tokens=512,
                                         max_requests_per_batch=len(prompts), block_size=16)
    with torch.inference_mode():
        results = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb_config,
                                       warmup=False)
    return sum(len(r.generated_tokens) for r in results.values())


def measure(model_dir: Path, concurrency: list[int], prompt_len: int, max_tokens: int) -> list[dict]:
    llm = LLM(model_dir, max_model_len=prompt_len + max_tokens + 16, max_num_seqs=max(concurrency),
              max_num_batched_tokens=512)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    hf_paged = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", attn_implementation="paged|sdpa").eval()
    vocab = llm.engine.runner.vocab_size
    warm = prompts_for(1, prompt_len, vocab, seed=999)
    run_engine(llm, warm, 4), run_hf_sequential(hf, warm, 4), run_hf_batch(hf_paged, warm, 4)
    rows = []
    for c in concurrency:
        prompts = prompts_for(c, prompt_len, vocab, seed=c)
        row = {
            "concurrency": c,
            "engine": timed(lambda: run_engine(llm, prompts, max_tokens)),
            "hf_sequential": timed(lambda: run_hf_sequential(hf, prompts, max_tokens)),
            "hf_generate_batch": timed(lambda: run_hf_batch(hf_paged, prompts, max_tokens)),
        }
        for baseline in ("hf_sequential", "hf_generate_batch"):
            row[f"engine_over_{baseline}"] = round(row["engine"]["tok_per_s"] / row[baseline]["tok_per_s"], 3)
        logger.info("c=%d engine %.1f tok/s, hf sequential %.1f, hf generate_batch %.1f", c,
                    row["engine"]["tok_per_s"], row["hf_sequential"]["tok_per_s"], row["hf_generate_batch"]["tok_per_s"])
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configure_logging("info")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        write_mixtral(model_dir, MODEL_SHAPE, getattr(torch, args.dtype))
        rows = measure(model_dir, args.concurrency, args.prompt_len, args.max_tokens)
    write_result(args.out, "engine_throughput", load_before, {
        "model": {"arch": "mixtral", "dtype": args.dtype, **MODEL_SHAPE},
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "results": rows,
    })


if __name__ == "__main__":
    main()
