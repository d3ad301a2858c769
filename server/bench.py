"""``moeserve bench``: throughput and latency of the engine in this process, or of a running server over HTTP.

- ``moeserve bench throughput MODEL``: the engine itself (engine.LLMEngine's step loop, every request added at
  once, the configuration tree as for ``serve``), no HTTP in between: what the model, the cache budget and the
  batch size give.
- ``moeserve bench serve --base-url URL``: a running server, as its clients see it: streaming
  ``/v1/completions`` requests, at most ``--concurrency`` in flight.

Each of ``--num-prompts`` requests sends ``--input-len`` token ids and asks for exactly ``--output-len`` tokens
(``ignore_eos``, greedy). Offline the ids are drawn (``--seed``) from the model's vocabulary less its special
tokens; against a server they are windows of a random text tokenized by the server (``/tokenize``), so they are
its tokenizer's own. One short request first warms the engine or server up, uncounted.

Reported (``--json``: one JSON object): requests, failures, elapsed seconds, requests, output and total tokens per
second, and per request the time to first token (TTFT), the time per output token after the first (TPOT: (E2E -
TTFT) / (tokens - 1)), the gaps between token arrivals (ITL; over a stream, between chunks) and end to end (E2E),
each as mean, median and 99th percentile in milliseconds; offline also the engine's expert-cache counters
(``LLM.stats``) in offload mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.config import Config

DEFAULT_NUM_PROMPTS = 16
DEFAULT_INPUT_LEN = 32
DEFAULT_OUTPUT_LEN = 64
DEFAULT_CONCURRENCY = 4
WARM_UP_TOKENS = 2
STATS_KEYS = ("expert_hits", "expert_misses", "expert_bytes_read", "expert_stall_seconds", "expert_prefetch_issued",
              "expert_prefetch_used", "expert_prefetch_wasted", "num_preemptions")
"""Engine counters the offline report carries where the engine has them (``LLM.stats``)."""


class BenchError(Exception):
    """The benchmark could not run (a server that does not answer, a model too small for the prompts)."""


@dataclass
class RequestRecord:
    """One request's timeline: when it was sent and when each output token (or stream chunk) arrived."""

    prompt_tokens: int
    start: float
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """Mean, median and 99th percentile (linear interpolation between ranks) in milliseconds; None if empty."""
    if not values:
        return None
    ordered = sorted(values)

    def at(fraction: float) -> float:
        rank = fraction * (len(ordered) - 1)
        low = int(rank)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)

    return {"mean": round(1000 * sum(ordered) / len(ordered), 3), "median": round(1000 * at(0.5), 3),
            "p99": round(1000 * at(0.99), 3)}


def summarize(records: Sequence[RequestRecord], elapsed: float) -> dict[str, Any]:
    """The report's figures (module docstring) over the requests that succeeded."""
    done = [r for r in records if r.error is None and r.token_times]
    ttft = [r.token_times[0] - r.start for r in done]
    e2e = [r.token_times[-1] - r.start for r in done]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [later - earlier for r in done for earlier, later in zip(r.token_times, r.token_times[1:])]
    prompt_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    failures = [r.error for r in records if r.error is not None]
    return {
        "requests": len(done),
        "failed": len(failures),
        "first_error": failures[0] if failures else None,
        "elapsed_s": round(elapsed, 6),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": round(len(done) / elapsed, 3) if elapsed > 0 else None,
        "output_throughput": round(output_tokens / elapsed, 3) if elapsed > 0 else None,
        "total_throughput": round((prompt_tokens + output_tokens) / elapsed, 3) if elapsed > 0 else None,
        "ttft_ms": percentiles(ttft),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles(itl),
        "e2e_ms": percentiles(e2e),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned text lines."""
    lines = [
        f"{'requests':<24}{report['requests']} ({report['failed']} failed)",
        f"{'elapsed':<24}{report['elapsed_s']:.2f} s",
        f"{'prompt tokens':<24}{report['prompt_tokens']}",
        f"{'output tokens':<24}{report['output_tokens']}",
    ]
    for key, label, unit in (("request_throughput", "request", "req/s"), ("output_throughput", "output", "tok/s"),
                             ("total_throughput", "total", "tok/s")):
        if report[key] is not None:
            lines.append(f"{label + ' throughput':<24}{report[key]:.2f} {unit}")
    lines.append(f"{'':<24}{'mean':>10}{'median':>10}{'p99':>10}")
    for key, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                       ("e2e_ms", "E2E (ms)")):
        values = report[key]
        lines.append(f"{label:<24}" + ("".join(f"{values[k]:>10.2f}" for k in ("mean", "median", "p99"))
                                       if values else f"{'-':>10}{'-':>10}{'-':>10}"))
    for key, value in report.get("engine", {}).items():
        lines.append(f"{key:<24}{round(value, 4) if isinstance(value, float) else value}")
    if report["first_error"]:
        lines.append(f"{'first error':<24}{report['first_error']}")
    return "\n".join(lines)


def random_prompts(vocabulary: Sequence[int], count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``length`` ids drawn uniformly from ``vocabulary``."""
    rng = random.Random(seed)
    return [[rng.choice(vocabulary) for _ in range(length)] for _ in range(count)]


def bench_throughput(config: Config, num_prompts: int, input_len: int, output_len: int,
                     seed: int) -> dict[str, Any]:
    """Run the requests through an engine built from ``config`` in this process; the report."""
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams

    if input_len < 1 or output_len < 1 or num_prompts < 1:
        raise BenchError("--num-prompts, --input-len and --output-len must be at least 1")
    engine = LLMEngine(config)
    if input_len + output_len > engine.max_model_len:
        raise BenchError(f"--input-len + --output-len = {input_len + output_len} exceeds the model's "
                         f"max_model_len {engine.max_model_len}")
    special = set(engine.tokenizer.all_special_ids)
    vocabulary = [i for i in range(min(len(engine.tokenizer), engine.runner.vocab_size)) if i not in special]
    prompts = random_prompts(vocabulary, num_prompts + 1, input_len, seed)
    warm_up = SamplingParams(max_tokens=WARM_UP_TOKENS, temperature=0.0, ignore_eos=True)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    _run_offline(engine, [prompts[0]], warm_up, "warm-up")
    records, elapsed = _run_offline(engine, prompts[1:], params, "bench")
    report = summarize(records, elapsed)
    stats = engine.stats()
    report["engine"] = {key: stats[key] for key in STATS_KEYS if key in stats}
    return report


def _run_offline(engine, prompts: Sequence[list[int]], params, prefix: str) -> tuple[list[RequestRecord], float]:
    """Add every prompt at once and step until all finish, stamping each request's new tokens as they come."""
    start = time.perf_counter()
    records = {}
    for index, prompt in enumerate(prompts):
        request_id = f"{prefix}-{index}"
        engine.add_request(request_id, prompt, params)
        records[request_id] = RequestRecord(len(prompt), start)
    now = start
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            record = records[output.request_id]
            produced = len(output.outputs[0].token_ids)
            record.token_times.extend([now] * (produced - record.output_tokens))
            record.output_tokens = produced
    return list(records.values()), now - start


def bench_serve(base_url: str, model: str | None, api_key: str | None, num_prompts: int, input_len: int,
                output_len: int, concurrency: int, seed: int) -> dict[str, Any]:
    """Send the requests to the server at ``base_url``; the report."""
    if input_len < 1 or output_len < 1 or num_prompts < 1 or concurrency < 1:
        raise BenchError("--num-prompts, --input-len, --output-len and --concurrency must be at least 1")
    return asyncio.run(_serve(base_url.rstrip("/"), model, api_key, num_prompts, input_len, output_len,
                              concurrency, seed))


async def _serve(base_url: str, model: str | None, api_key: str | None, num_prompts: int, input_len: int,
                 output_len: int, concurrency: int, seed: int) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(600.0)) as client:
        try:
            model = model or await _first_model(client)
            prompts = await _server_prompts(client, num_prompts + 1, input_len, seed)
        except httpx.HTTPError as exc:
            raise BenchError(f"server at {base_url} did not answer: {exc}") from exc
        await _stream_completion(client, model, prompts[0], WARM_UP_TOKENS)
        gate = asyncio.Semaphore(concurrency)

        async def limited(prompt: list[int]) -> RequestRecord:
            async with gate:
                return await _stream_completion(client, model, prompt, output_len)

        start = time.perf_counter()
        records = await asyncio.gather(*(limited(prompt) for prompt in prompts[1:]))
        elapsed = time.perf_counter() - start
    report = summarize(records, elapsed)
    report["concurrency"] = concurrency
    report["model"] = model
    return report


async def _first_model(client) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    models = response.json()["data"]
    if not models:
        raise BenchError("the server lists no model")
    return models[0]["id"]


async def _server_prompts(client, count: int, length: int, seed: int) -> list[list[int]]:
    """Windows of ``length`` ids of a random text as the server tokenizes it (its /tokenize)."""
    rng = random.Random(seed)
    words = ["the", "model", "expert", "layer", "cache", "token", "stream", "server", "memory", "request", "data",
             "import", "def", "return", "value", "for", "while", "class", "self", "print", "list", "of", "in", "x"]
    text = " ".join(rng.choice(words) for _ in range(2 * length + 64))
    response = await client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    response.raise_for_status()
    tokens = response.json()["tokens"]
    if len(tokens) <= length:
        raise BenchError(f"the server's tokenizer gave {len(tokens)} tokens for the prompt text; need > {length}")
    starts = [rng.randrange(len(tokens) - length) for _ in range(count)]
    return [tokens[begin : begin + length] for begin in starts]


async def _stream_completion(client, model: str, prompt: list[int], max_tokens: int) -> RequestRecord:
    """One streaming completion; every chunk carrying a choice stamps an arrival, the usage gives the tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    record = RequestRecord(len(prompt), time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("choices"):
                    record.token_times.append(time.perf_counter())
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - a failed request is counted and reported, not fatal
        record.error = f"{type(exc).__name__}: {exc}"
    return record


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload flags both modes share."""
    parser.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS,
                        help=f"requests (default {DEFAULT_NUM_PROMPTS})")
    parser.add_argument("--input-len", type=int, default=DEFAULT_INPUT_LEN,
                        help=f"prompt tokens per request (default {DEFAULT_INPUT_LEN})")
    parser.add_argument("--output-len", type=int, default=DEFAULT_OUTPUT_LEN,
                        help=f"generated tokens per request (default {DEFAULT_OUTPUT_LEN})")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def print_report(report: dict[str, Any], as_json: bool) -> int:
    """Write the report to stdout; exit status 1 if any request failed."""
    sys.stdout.write((json.dumps(report) if as_json else format_report(report)) + "\n")
    return 1 if report["failed"] else 0
