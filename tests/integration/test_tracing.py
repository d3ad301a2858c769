"""Request-level activation traces from the engine: the routing transformers computes, one request at a time.

A request's trace (merged prefill line with counts, one line per decode step) equals the top-k routing of
transformers' own forward over the same tokens; batching, chunked prefill and preemption (recompute) leave each
request's trace exactly as if it had run alone; dense layers are ``[]``; ``trace_dump_dir`` files parse.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import SamplingParams
from engine.config import load_config
from engine.engine import LLMEngine
from engine.offload.layout import ensure_store
from engine.trace.format import read_traces

pytestmark = pytest.mark.slow

PROMPTS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n",
    "import os\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "x = [i * i for i in range(10)]",
]
MAX_TOKENS = [24, 30, 20, 28]


def run(model_dir: Path, dump: Path, prompts: list[str], max_tokens: list[int], **limits) -> LLMEngine:
    """Greedy completions of ``prompts`` with traces dumped to ``dump``; the engine keeps ``outputs`` by id."""
    engine = LLMEngine(load_config(overrides=dict(model=str(model_dir), trace_dump_dir=str(dump),
                                                  enable_prefix_caching=False, max_model_len=96, **limits)))
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(f"req-{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    engine.outputs = {}
    while engine.has_unfinished_requests():
        engine.outputs.update({o.request_id: o for o in engine.step() if o.finished})
    return engine


def as_sets(trace) -> list:
    """Each step's experts per layer as sets (order within a layer is the router's, not part of the contract)."""
    return [(step.phase, [frozenset(ids) for ids in step.experts],
             None if step.counts is None else [dict(zip(ids, c)) for ids, c in zip(step.experts, step.counts)])
            for step in trace.steps]


def test_trace_equals_transformers_routing(demo_model: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = demo_model("mixtral")
    engine = run(model_dir, tmp_path, PROMPTS[:1], MAX_TOKENS[:1])
    (trace,) = read_traces(tmp_path / "req-0.jsonl")
    header = trace.header
    assert (header.trace, header.num_layers, header.num_experts, header.top_k) == ("req-0", 4, 8, 2)
    prompt = engine.tokenizer(PROMPTS[0]).input_ids
    generated = [step for step in trace.steps if step.phase == "decode"]
    assert len(generated) == MAX_TOKENS[0] - 1, "one line per token fed back; the last sampled one is never fed"

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # The tokens the engine ran: the prompt and every generated token but the last.
    tokens = prompt + engine.outputs["req-0"].outputs[0].token_ids[:-1]
    with torch.inference_mode():
        router_logits = model(torch.tensor([tokens]), output_router_logits=True).router_logits  # L x [T, E]
    top = [logits.topk(2, dim=-1).indices for logits in router_logits]  # L x [T, 2]
    prefill = trace.steps[0]
    assert prefill.phase == "prefill"
    for layer in range(4):
        expected = Counter(top[layer][: len(prompt)].flatten().tolist())
        assert dict(zip(prefill.experts[layer], prefill.counts[layer])) == expected
        for step, position in zip(generated, range(len(prompt), len(tokens))):
            assert set(step.experts[layer]) == set(top[layer][position].tolist())
            assert len(step.weights[layer]) == 2 and abs(sum(step.weights[layer]) - 1.0) < 1e-5


def test_batching_chunking_and_preemption_leave_each_trace_as_alone(
    demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = demo_model("deepseek_v3")
    alone = {}
    for i, (prompt, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        run(model_dir, tmp_path / f"alone-{i}", [prompt], [n])
        (alone[i],) = read_traces(tmp_path / f"alone-{i}" / "req-0.jsonl")
    engine = run(model_dir, tmp_path / "batch", PROMPTS, MAX_TOKENS, max_num_seqs=4, max_num_batched_tokens=16,
                 num_kv_blocks=6)
    assert engine.scheduler.num_preemptions > 0, "the set-up must force recompute"
    for i, n in enumerate(MAX_TOKENS):
        (batched,) = read_traces(tmp_path / "batch" / f"req-{i}.jsonl")
        assert batched.num_decode_steps == n - 1
        assert as_sets(batched) == as_sets(alone[i]), f"request {i}: trace differs from the request alone"
        assert all(ids == () for step in batched.steps for ids in step.experts[:1]), "layer 0 is dense: []"
        prompt_len = len(engine.tokenizer(PROMPTS[i]).input_ids)
        assert all(sum(counts) == prompt_len * 4 for counts in batched.steps[0].counts[1:])
    assert engine.tracer.get("req-0") is None, "finished requests leave the tracer"


def test_matrices_count_prefill_and_decode_apart(demo_model: Callable[..., Path], tmp_path: Path) -> None:
    engine = LLMEngine(load_config(overrides=dict(model=str(demo_model("olmoe")), max_model_len=96,
                                                  enable_prefix_caching=False)))
    engine.add_request("r", PROMPTS[2], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    engine.step()
    activations = engine.tracer.get("r")
    prompt_len = len(engine.tokenizer(PROMPTS[2]).input_ids)
    prefill, decode = activations.matrix("prefill", 16), activations.matrix("decode", 16)
    assert prefill.sum(dim=1).tolist() == [prompt_len * 4] * 4 and decode.sum() == 0
    engine.step()
    engine.step()
    assert engine.tracer.get("r").matrix("decode", 16).sum(dim=1).tolist() == [2 * 4] * 4
    assert engine.abort("r") and engine.tracer.get("r") is None


def test_trace_store_grows_across_requests_and_survives_a_restart(
    demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    from engine import LLM

    path = tmp_path / "traces.safetensors"
    llm = LLM(demo_model("mixtral"), max_model_len=96, trace_store_path=str(path))
    assert llm.stats()["trace_store_entries"] == 0 and not path.exists()
    llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    entries = llm.stats()["trace_store_entries"]
    assert 1 <= entries <= len(PROMPTS) and path.exists(), "finished requests enter the store, which is saved"
    assert llm.engine.trace_store.requests_seen == len(PROMPTS)
    restarted = LLM(demo_model("mixtral"), max_model_len=96, trace_store_path=str(path))
    assert restarted.stats()["trace_store_entries"] == entries
    assert restarted.engine.trace_store.requests_seen == len(PROMPTS)
    path.write_bytes(b"not a trace store")
    fresh = LLM(demo_model("mixtral"), max_model_len=96, trace_store_path=str(path))
    assert fresh.stats()["trace_store_entries"] == 0 and not path.exists()
    assert len(list(tmp_path.glob("traces.safetensors.corrupt-*"))) == 1


def test_transition_statistics_survive_a_restart_with_the_store(
    demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    """Offload mode's trace predictor learns transition statistics; they are saved in the store's file and a
    restarted engine's predictor starts from them; an engine without the predictor keeps them as they were."""
    from engine import LLM

    model_dir = demo_model("mixtral")
    store = ensure_store(model_dir, tmp_path / "offload")
    path = tmp_path / "traces.safetensors"
    half = sum(store.num_experts.values()) // 2 * store.max_blob_bytes
    options = dict(max_model_len=96, trace_store_path=str(path), offload_dir=str(tmp_path / "offload"),
                   expert_cache_bytes=half)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    decode_tokens = len(PROMPTS) * (greedy.max_tokens - 1)

    def restart(**overrides) -> LLM:
        llm = LLM(model_dir, **{**options, **overrides})
        if llm.engine.prefetcher is not None:
            assert llm.engine.prefetcher.predictor.transitions is llm.engine.transitions
        return llm

    first = restart()
    first.generate(PROMPTS, greedy)
    learned = first.engine.transitions.state_tensors()
    assert int(learned["transition_tokens"]) == decode_tokens and learned["transition_counts"].any()
    first.engine.close()

    without_predictor = restart(expert_prefetch="none")
    assert without_predictor.engine.prefetcher is None
    assert_statistics_equal(without_predictor.engine.transitions, learned)
    without_predictor.generate(PROMPTS[:1], greedy)  # changes the store, which is saved with the statistics
    without_predictor.engine.close()
    assert without_predictor.engine.trace_store.requests_seen == len(PROMPTS) + 1

    again = restart()
    assert_statistics_equal(again.engine.transitions, learned)
    assert again.engine.trace_store.requests_seen == len(PROMPTS) + 1
    again.generate(PROMPTS, greedy)  # learning goes on from the loaded counts
    assert again.engine.transitions.tokens == 2 * decode_tokens
    assert again.engine.transitions.state_tensors()["frequency_counts"].sum() == 2 * learned["frequency_counts"].sum()
    again.engine.close()


def assert_statistics_equal(transitions, tensors: dict[str, torch.Tensor]) -> None:
    """``transitions`` hold exactly the counts of ``tensors`` (a `TransitionStatistics.state_tensors`)."""
    restored = transitions.state_tensors()
    assert restored.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(restored[name], tensor), name


def test_a_routing_override_is_what_the_forward_computes_and_the_trace_records(
    demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    """The benchmark-only ``routing_override`` replaces the router's choice before the tracer sees it."""
    engine = LLMEngine(load_config(overrides=dict(model=str(demo_model("mixtral")), max_model_len=96)))

    def first_two(layer, index, weights):
        forced = torch.tensor([[0, 1]] * index.shape[0], dtype=index.dtype)  # [T, 2]
        return forced, torch.full(forced.shape, 0.5, dtype=weights.dtype)

    engine.runner.experts_forward.routing_override = first_two
    engine.add_request("r", PROMPTS[1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    activations = None  # the tracer forgets a finished request: keep its last activations
    while engine.has_unfinished_requests():
        engine.step()
        activations = engine.tracer.get("r") or activations
    matrix = activations.matrix("decode", 8) + activations.matrix("prefill", 8)
    assert matrix[:, 2:].sum() == 0 and (matrix[:, :2] > 0).all()


def test_the_predictor_learns_each_prompt_once_with_its_own_routing_through_chunks_and_preemption(
    demo_model: Callable[..., Path], tmp_path: Path
) -> None:
    """Offload mode's predictor learns each request's prompt token by token (engine.trace.batch.PROMPT_TOKENS, more
    than these prompts): in a batch with chunked prefill and recompute after preemption, the prompt tokens a
    request learned are its own prompt's routing, each once — their experts per layer are the trace's prefill
    counts — and its decode tokens follow them."""
    model_dir = demo_model("mixtral")
    store = ensure_store(model_dir, tmp_path / "offload")
    half = sum(store.num_experts.values()) // 2 * store.max_blob_bytes
    engine = LLMEngine(load_config(overrides=dict(
        model=str(model_dir), trace_dump_dir=str(tmp_path / "traces"), enable_prefix_caching=False, max_model_len=96,
        offload_dir=str(tmp_path / "offload"), expert_cache_bytes=half, expert_prefetch_gate=False,
        max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=6)))
    assert engine.prefetcher is not None
    for i, (prompt, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        engine.add_request(f"req-{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    learned: dict[str, tuple[list, int]] = {}  # the last view of each request's learned tokens
    while engine.has_unfinished_requests():
        engine.step()
        for sequence_id, state in engine.prefetcher._states.items():
            learned[sequence_id] = (list(state.recent), state.statistics.tokens)
    assert engine.scheduler.num_preemptions > 0, "the set-up must force recompute"
    for i, prompt in enumerate(PROMPTS):
        (trace,) = read_traces(tmp_path / "traces" / f"req-{i}.jsonl")
        prompt_len = len(engine.tokenizer(prompt).input_ids)
        tokens, counted = learned[f"req-{i}"]
        decoded = [step.experts for step in trace.steps[1:]]
        assert len(tokens) == counted > prompt_len
        prefill = trace.steps[0]
        for layer, (ids, counts) in enumerate(zip(prefill.experts, prefill.counts)):
            from_prompt = Counter(expert for token in tokens[:prompt_len] for expert in token[layer])
            assert from_prompt == Counter(dict(zip(ids, counts))), f"request {i}, layer {layer}"
        # Then its decode tokens, in order; the one a recompute computes (a decode step in the trace) and the last
        # one (learned as the request finishes) are not among them.
        steps = iter([[set(ids) for ids in step] for step in decoded])
        assert all(any(step == [set(ids) for ids in token] for step in steps) for token in tokens[prompt_len:])
        assert counted - prompt_len >= len(decoded) - 3
