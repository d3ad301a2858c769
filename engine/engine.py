"""The engine: scheduler + model runner + sampler + detokenizers, one step at a time; and `LLM`, its batch API.

`LLMEngine` is the step-level API the async server loop drives (`add_request`, `step`, `abort`); `LLM` is the
offline API of the contract: ``LLM(model, **overrides).generate(prompts, sampling_params)``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig

from engine.config import Config, load_config, resolve_device
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import DEFAULT_BLOCK_SIZE, KVCacheManager
from engine.model_runner import ModelRunner
from engine.offload.layout import ensure_store
from engine.offload.offloaded import OffloadedExperts
from engine.request import CompletionOutput, Request, RequestOutput, make_requests
from engine.sampler import Sampler
from engine.sampling import SamplingParams
from engine.scheduler import ModelOutput, Scheduler, SchedulerConfig
from engine.trace.batch import BatchPrefetcher, StepSequence
from engine.trace.eam import ActivationTracer, TracedRequest
from engine.trace.format import TraceHeader
from engine.trace.planner import PrefetchSettings
from engine.trace.predictor import TransitionStatistics
from engine.trace.store import TraceStore

logger = logging.getLogger(__name__)


def _log_thread_waiting() -> None:
    """Say how torch's OpenMP threads wait; where they spin, say what that costs on the CPU (see engine/__init__)."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    if policy is not None and policy.upper() == "PASSIVE":
        logger.debug("torch: %d threads, OpenMP threads wait passively", torch.get_num_threads())
        return
    logger.info("torch: %d threads, OpenMP wait policy %s: on the CPU, spinning OpenMP threads compete with the "
                "experts kernel's own (17-28 %% slower decode in benchmarks/busy_core.py); set "
                "OMP_WAIT_POLICY=PASSIVE before Python starts, or import engine before torch",
                torch.get_num_threads(), policy or "unset (threads spin)")

Prompt = str | Sequence[int]
# Default KV pool: room for every running sequence at this many tokens, and always for one max_model_len one.
DEFAULT_KV_TOKENS_PER_SEQ = 1024
# Prepared expert stores, one subdirectory per source fingerprint, when offload_dir is not set.
DEFAULT_OFFLOAD_DIR = Path.home() / ".cache" / "moeserve"
# The trace store (and the transition statistics with it) is written to trace_store_path after this many
# finished sequences changed it, after LLM.generate and at close.
TRACE_SAVE_EVERY = 32


@dataclass
class _UserRequest:
    """A user request: its n sequences (scheduler Requests) and their detokenizers."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[Request]
    detokenizers: list[IncrementalDetokenizer] = field(default_factory=list)

    def output(self) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=seq.index,
                text=detok.text(seq.is_finished),
                token_ids=list(seq.output_token_ids),
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                logprobs=list(seq.output_logprobs) if seq.sampling_params.logprobs else None,
            )
            for seq, detok in zip(self.sequences, self.detokenizers)
        ]
        cached = max(seq.num_cached_tokens for seq in self.sequences)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions, cached)


class LLMEngine:
    """One model, continuously batched. Not thread-safe: one thread calls every method (the step loop).

    The model computes on ``config.device``; in offload mode on a GPU the expert cache has two levels (device
    slots over pinned host slots). ``expert_tier_device`` builds the two-level cache with its fast tier on that
    device instead, whatever the model's device (tests run the two-level path on a CPU machine with ``cpu``).
    """

    def __init__(self, config: Config, expert_tier_device: torch.device | None = None) -> None:
        if config.model is None:
            raise ValueError("model is required: a Hugging Face model directory")
        self.config = config
        self.device = resolve_device(config.device)
        _log_thread_waiting()
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        model_limit = _model_max_len(config.model)
        self.max_model_len = config.max_model_len or model_limit
        if self.max_model_len > model_limit:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's limit of {model_limit} positions")
        num_blocks = config.num_kv_blocks or default_num_kv_blocks(self.max_model_len, config.max_num_seqs)
        tier_device = expert_tier_device or (self.device if self.device.type != "cpu" else None)
        self.offload = _offloaded_experts(config, tier_device) if config.expert_cache_bytes is not None else None
        self.runner = ModelRunner(config.model, num_blocks, dtype=config.dtype, offload=self.offload,
                                  lookahead=config.expert_prefetch in ("lookahead", "all"), device=self.device)
        self.kv_cache = KVCacheManager(num_blocks, DEFAULT_BLOCK_SIZE, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len), self.kv_cache
        )
        self.sampler = Sampler()
        self.tracer = ActivationTracer(self._trace_header(), config.trace_dump_dir)
        self.transitions = self._new_transition_statistics()
        self.trace_store = self._open_trace_store()
        self.prefetcher = self._batch_prefetcher()
        self.runner.experts_forward.routing_observer = self._observe_routing
        self._unsaved_traces = 0
        self._saved_tokens = self.transitions.tokens if self.transitions is not None else 0
        self.eos_token_ids = _eos_token_ids(config.model, self.tokenizer)
        self._requests: dict[str, _UserRequest] = {}
        self._sequence_owner: dict[str, _UserRequest] = {}

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        """Queue a request; raises ValueError for a duplicate id, an empty or too long prompt, bad token ids."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = (prompt, self.tokenizer(prompt).input_ids) if isinstance(prompt, str) else (None, list(prompt))
        params.verify_token_ids(self.runner.vocab_size)
        if any(not 0 <= t < self.runner.vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.runner.vocab_size})")
        sequences = make_requests(request_id, token_ids, params, self.eos_token_ids)
        user = _UserRequest(request_id, text, token_ids, sequences,
                            [IncrementalDetokenizer(self.tokenizer, seq.sampling_params) for seq in sequences])
        for seq in sequences:
            self.scheduler.add_request(seq)
        self._requests[request_id] = user
        self._sequence_owner.update({seq.request_id: user for seq in sequences})

    def abort(self, request_id: str) -> bool:
        """Abort a user request (all its sequences), freeing their KV blocks. False if unknown or finished."""
        user = self._requests.pop(request_id, None)
        if user is None:
            return False
        for seq in user.sequences:
            self.scheduler.abort(seq.request_id)
            self.tracer.finish(seq.request_id, dump=False)
            if self.prefetcher is not None:
                self.prefetcher.forget(seq.request_id)
            self._sequence_owner.pop(seq.request_id, None)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of the user requests that advanced (finished ones last seen)."""
        plan = self.scheduler.schedule()
        self.sampler.release(plan.finished_ids)
        if plan.is_empty:
            return []
        if self.prefetcher is not None:
            self.prefetcher.begin_step([StepSequence(s.request_id, s.num_tokens, s.is_decode, s.start_position,
                                                     s.request.num_prompt_tokens) for s in plan.scheduled])
        logits = self.runner.execute(plan.scheduled)
        if self.prefetcher is not None:
            self.prefetcher.end_step()
        self.tracer.record_step([TracedRequest(s.request_id, s.request.num_prompt_tokens, s.start_position, s.num_tokens)
                                 for s in plan.scheduled])
        to_sample = plan.sample_requests
        sampled = self.sampler(logits, to_sample) if to_sample else None
        model_output = ModelOutput(
            {seq.request_id: token for seq, token in zip(to_sample, sampled.token_ids)} if sampled else {},
            {seq.request_id: lp for seq, lp in zip(to_sample, sampled.logprobs) if lp is not None} if sampled else {},
        )
        touched: dict[str, _UserRequest] = {}
        for seq in self.scheduler.update(plan, model_output):
            user = self._sequence_owner[seq.request_id]
            stop = user.detokenizers[seq.index].update(seq.output_token_ids)
            if stop is not None and not seq.is_finished:
                self.scheduler.finish(seq.request_id, "stop", stop)
            if seq.is_finished:
                self._store_trace(seq.request_id)
            touched[user.request_id] = user
        outputs = [user.output() for user in touched.values()]
        for output in outputs:
            if output.finished:
                self._retire(output.request_id)
        return outputs

    def _observe_routing(self, layer: int | None, top_k_index, top_k_weights) -> None:
        """The experts forward's routing tap: the tracer records it; the batch prefetcher predicts from it."""
        self.tracer.routing.observe(layer, top_k_index, top_k_weights)
        if self.prefetcher is not None:
            self.prefetcher.observe(layer, top_k_index)

    def _batch_prefetcher(self) -> BatchPrefetcher | None:
        """Trace-driven priorities and prefetch (offload mode with expert_prefetch 'trace' or 'all')."""
        if self.offload is None or self.config.expert_prefetch not in ("trace", "all") or not self.runner.num_experts:
            return None
        if self.offload.prefetch_limit < 1:
            logger.info("trace prefetch off: the expert cache has no slot to spare for reads in flight")
            return None
        if self.offload.num_slots >= sum(self.offload.store.num_experts.values()):
            logger.info("trace prefetch off: every expert fits in the cache (nothing to predict for)")
            return None
        top_k = int(getattr(self.runner.config, "num_experts_per_tok"))
        prefetcher = BatchPrefetcher(self.offload, top_k, self.trace_store, self.transitions)
        self.runner.experts_forward.on_layer_held = prefetcher.plan
        return prefetcher

    def _retire(self, request_id: str) -> None:
        user = self._requests.pop(request_id)
        for seq in user.sequences:
            self._sequence_owner.pop(seq.request_id, None)

    def _trace_header(self) -> TraceHeader:
        """The routing shape every request's trace is written with."""
        text = self.runner.config
        return TraceHeader(
            trace="", model=self.config.served_model_name or Path(self.config.model).name,
            num_layers=text.num_hidden_layers, num_experts=self.runner.num_experts,
            top_k=getattr(text, "num_experts_per_tok", None), source="moeserve",
        )

    def stats(self) -> dict[str, Any]:
        """Flat counters of the engine (the contract's keys that exist in this build).

        Expert-cache keys appear in offload mode (``expert_cache_bytes`` set); with every expert resident there
        is no cache to report on.
        """
        stats: dict[str, Any] = {
            "kv_blocks_used": self.kv_cache.num_total_blocks - self.kv_cache.num_free_blocks,
            "kv_blocks_total": self.kv_cache.num_total_blocks,
            "kv_cache_usage": self.kv_cache.usage,
            "requests_running": self.scheduler.num_running,
            "requests_waiting": self.scheduler.num_waiting,
            "num_preemptions": self.scheduler.num_preemptions,
            "trace_store_entries": len(self.trace_store),
        }
        if self.offload is not None:
            counters = self.offload.stats
            stats.update({
                "expert_hits": counters.hits,
                "expert_misses": counters.misses,
                "expert_bytes_read": self.offload.bytes_read(),
                "expert_stall_seconds": counters.stall_seconds,
                "expert_stall_histogram": counters.stalls.snapshot(),
                "expert_prefetch_issued": counters.prefetch_issued,
                "expert_prefetch_used": counters.prefetch_used,
                "expert_prefetch_wasted": counters.prefetch_wasted,
                "expert_prediction_recall": self.runner.experts_forward.lookahead_stats.recall,
                "expert_prefetch_gate": None if self.offload.gate is None else self.offload.gate.snapshot(),
                "expert_cache_bytes": self.offload.cache_bytes(),
                "expert_cache_slots": self.offload.num_slots,
                "per_layer": {"hits": list(counters.per_layer_hits), "misses": list(counters.per_layer_misses)},
            })
        return stats

    def close(self) -> None:
        """Persist the trace store and the transition statistics (when ``trace_store_path`` is set) and release
        the expert reader's files and threads (offload mode); the engine is unusable afterwards."""
        self.save_trace_store()
        if self.offload is not None:
            self.offload.close()

    def save_trace_store(self) -> None:
        """Write the trace store with the transition statistics to ``trace_store_path`` (atomically, one file)
        if either has changed since the last save."""
        tokens = self.transitions.tokens if self.transitions is not None else 0
        if self.config.trace_store_path is not None and (self._unsaved_traces or tokens != self._saved_tokens):
            self.trace_store.save(self.config.trace_store_path, self.transitions)
            self._unsaved_traces = 0
            self._saved_tokens = tokens

    def _new_transition_statistics(self) -> TransitionStatistics | None:
        """Empty statistics for the trace predictor (None for a model without experts). They exist whether or
        not a prefetcher learns into them, so a restart without one keeps what the file holds."""
        if not self.runner.num_experts:
            return None
        top_k = int(getattr(self.runner.config, "num_experts_per_tok"))
        return TransitionStatistics(self.runner.config.num_hidden_layers, self.runner.num_experts,
                                    max_offset=PrefetchSettings().max_offset, top_k=top_k)

    def _open_trace_store(self) -> TraceStore:
        """The shared trace store: loaded from ``trace_store_path`` when set, with the transition statistics
        restored from the same file (a corrupt or foreign file is moved aside; both then start empty)."""
        shape = (self.runner.config.num_hidden_layers, max(self.runner.num_experts, 1))
        if self.config.trace_store_path is None:
            return TraceStore(*shape)
        return TraceStore.load(self.config.trace_store_path, *shape, transitions=self.transitions)

    def _store_trace(self, request_id: str) -> None:
        """A finished sequence's trace: dumped (trace_dump_dir) and its decode matrix entered into the store,
        which is saved every TRACE_SAVE_EVERY finished sequences."""
        activations = self.tracer.finish(request_id)
        if self.prefetcher is not None:
            self.prefetcher.forget(request_id)
        if activations is None or not self.runner.num_experts:
            return
        if self.trace_store.add(activations.matrix("decode", self.runner.num_experts)) >= 0:
            self._unsaved_traces += 1
        if self._unsaved_traces >= TRACE_SAVE_EVERY:
            self.save_trace_store()


def default_num_kv_blocks(max_model_len: int, max_num_seqs: int) -> int:
    """Blocks for max_num_seqs sequences of min(max_model_len, 1024) tokens, and at least one full-length one."""
    per_seq = min(max_model_len, DEFAULT_KV_TOKENS_PER_SEQ)
    tokens = max(max_model_len, max_num_seqs * per_seq)
    return math.ceil(tokens / DEFAULT_BLOCK_SIZE)


def _offloaded_experts(config: Config, tier_device: torch.device | None) -> OffloadedExperts:
    """The expert cache of ``config``: its store (prepared under offload_dir when needed) behind the budget.

    ``tier_device`` None: one host tier of ``expert_cache_bytes`` (``host_cache_bytes`` is ignored, with a
    warning); a device: ``expert_cache_bytes`` there over ``host_cache_bytes`` of host slots (unset: the
    default of engine.offload.offloaded.default_host_budget)."""
    from transformers import AutoConfig

    offload_dir = config.offload_dir or DEFAULT_OFFLOAD_DIR
    store = ensure_store(config.model, offload_dir)
    top_k = int(AutoConfig.from_pretrained(config.model).get_text_config().num_experts_per_tok)
    host_budget = None if config.host_cache_bytes is None else int(config.host_cache_bytes)
    gate = config.expert_prefetch_gate and config.expert_prefetch != "none"
    if tier_device is None:
        if host_budget is not None:
            logger.warning("host_cache_bytes is ignored without a GPU: expert_cache_bytes sizes the host tier")
        return OffloadedExperts(store, int(config.expert_cache_bytes), top_k, gate=gate)
    return OffloadedExperts(store, int(config.expert_cache_bytes), top_k, device=tier_device,
                            host_budget_bytes=host_budget, gate=gate)


def _model_max_len(model_dir: str | Path) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    return int(config.max_position_embeddings)


def _eos_token_ids(model_dir: str | Path, tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json (an int or a list), else the tokenizer's."""
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class LLM:
    """Offline batch generation: ``LLM(model, **overrides).generate(prompts, sampling_params)``.

    ``overrides`` are configuration keys (engine.config), applied above ``MOESERVE_*`` variables.
    """

    def __init__(self, model: str | Path, **overrides: Any) -> None:
        self.config = load_config(overrides={**overrides, "model": str(model)})
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt (a string or a list of token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        for request_id, prompt, param in zip(ids, prompts, params):
            self.engine.add_request(request_id, prompt, param)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        self.engine.save_trace_store()
        return [finished[request_id] for request_id in ids]

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()
