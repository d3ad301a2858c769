"""Continuous-batching scheduler. Pure: requests and block ids in, a plan out; no tensors, no I/O, no clock.

One engine step:

    out = scheduler.schedule()                 # which tokens of which requests to compute now
    sampler/runner: forward `out.scheduled` -> for each s with s.sample: a token (and logprobs)
    updated = scheduler.update(out, ModelOutput(sampled_token_ids={...}, logprobs={...}))
    caller: detokenize `updated`; on a stop string call scheduler.finish(id, "stop", stop_string)

Policy (vLLM v1's, simplified): every step first serves running requests in admission order (a decode token,
or the next chunk of a prompt), then admits waiting requests first-come-first-served while the token budget
(`max_num_batched_tokens`), `max_num_seqs` and free KV blocks allow. A prompt longer than the remaining budget
is split into chunks over several steps (chunked prefill); only the chunk that reaches the last token
samples. When a running request needs a block and none is free, the newest running request is preempted:
its blocks are freed and it goes back to the front of the waiting queue, to be recomputed (prompt and the
tokens generated so far, mostly from the prefix cache) when blocks free up; being at the head of the queue,
it is readmitted before any newer request.

All methods must be called from one thread (the engine's step loop); abort() from another thread must be
queued by the caller and applied between steps.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.kv_cache import BlockHash, KVCacheManager, slot_mapping
from engine.request import FINISHED_STATUS, FinishReason, Request, RequestStatus, TokenLogprob

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits: sequences per step, tokens per step (prefill chunks + decode tokens), context length."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's work in a step: compute KV (and logits) for `token_ids` at positions
    `start_position ..`, attending to all earlier positions of the request through `block_table`."""

    request: Request
    token_ids: tuple[int, ...]
    start_position: int
    """Tokens of this request already in the KV cache (prefix-cache hits included)."""
    block_table: tuple[int, ...]
    """Covers every position up to start_position + len(token_ids) - 1."""
    sample: bool
    """Whether the last position's logits are sampled (False for a prefill chunk short of the prompt end)."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def positions(self) -> range:
        return range(self.start_position, self.start_position + self.num_tokens)

    @property
    def is_decode(self) -> bool:
        """One token at a generated position (not a prompt chunk, not the recompute of a preempted request)."""
        return self.num_tokens == 1 and self.start_position >= self.request.num_prompt_tokens

    @property
    def context_len(self) -> int:
        """Positions attended to by the last token of this step (the sequence length after the step)."""
        return self.start_position + self.num_tokens

    def slot_mapping(self, block_size: int) -> list[int]:
        """Flat KV slots where this step's tokens' K/V are written, one per token."""
        return slot_mapping(self.block_table, self.start_position, self.num_tokens, block_size)


@dataclass(frozen=True)
class SchedulerOutput:
    """The plan of one step, in batch order."""

    scheduled: list[ScheduledRequest]
    preempted_ids: list[str]
    """Preempted in this step: drop their per-request runner state (but keep a seeded sampler generator)."""
    finished_ids: list[str]
    """Finished or aborted since the previous schedule(): release all their per-request state."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def sample_requests(self) -> list[Request]:
        """Requests to sample this step, in batch order: row i of the sampler's logits belongs to the i-th."""
        return [s.request for s in self.scheduled if s.sample]


@dataclass
class ModelOutput:
    """What the runner returns: a token for every scheduled request with `sample=True`, keyed by request id,
    and the logprobs of those whose sampling params asked for them."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)


@dataclass
class _Step:
    """Scratch state of one schedule() call."""

    budget: int
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    pending: set[BlockHash] = field(default_factory=set)


class Scheduler:
    """Waiting and running queues over a KV block manager; see the module docstring for the policy."""

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        capacity = kv_cache.num_total_blocks * kv_cache.block_size
        if config.max_model_len > capacity:
            raise ValueError(
                f"max_model_len ({config.max_model_len}) exceeds the KV cache capacity ({capacity} tokens): "
                "raise num_kv_blocks or lower max_model_len"
            )
        self.config = config
        self.kv_cache = kv_cache
        self.num_preemptions = 0
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []

    @property
    def running(self) -> Sequence[Request]:
        """Running requests, oldest first (read-only view for expert-aware policies and metrics)."""
        return tuple(self._running)

    @property
    def waiting(self) -> Sequence[Request]:
        """Waiting requests in the order they will be admitted."""
        return tuple(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ValueError on a duplicate id or a prompt that leaves no room to generate."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_prompt_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {request.num_prompt_tokens} tokens; the context length (max_model_len "
                f"{self.config.max_model_len}) leaves no room to generate"
            )
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Finish a waiting or running request with reason "abort", freeing its blocks. False if unknown/finished."""
        return self.finish(request_id, "abort")

    def finish(self, request_id: str, reason: FinishReason = "stop", stop_reason: int | str | None = None) -> bool:
        """Finish a request from outside (a stop string matched, a client went away): frees all its blocks.

        Returns False if the request is unknown or already finished.
        """
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._finish(request, FINISHED_STATUS[reason], stop_reason)
        return True

    def schedule(self) -> SchedulerOutput:
        """Plan the next step (see the module docstring). Allocates the blocks the planned tokens need."""
        step = _Step(budget=self.config.max_num_batched_tokens)
        self._schedule_running(step)
        self._schedule_waiting(step)
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(step.scheduled, step.preempted_ids, finished)

    def update(self, output: SchedulerOutput, model_output: ModelOutput) -> list[Request]:
        """Account a finished step: advance computed tokens, publish full blocks to the prefix cache, append
        sampled tokens and finish requests on EOS, stop_token_ids (after min_tokens), max_tokens or
        max_model_len. Returns the requests that received a token, in batch order (finished ones included).
        Requests finished or aborted since `schedule()` are skipped.
        """
        updated = []
        for scheduled in output.scheduled:
            request = scheduled.request
            if request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += scheduled.num_tokens
            self.kv_cache.cache_computed_blocks(request)
            if scheduled.sample:
                self._append_sampled(request, model_output)
                updated.append(request)
        return updated

    def _schedule_running(self, step: _Step) -> None:
        index = 0
        while index < len(self._running) and step.budget > 0:
            request = self._running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, step.budget)
            if not self._allocate_or_preempt(request, num_new, step):
                break
            self._add_scheduled(step, request, num_new)
            index += 1

    def _allocate_or_preempt(self, request: Request, num_new: int, step: _Step) -> bool:
        """Allocate blocks for `request`, preempting the newest running requests until they fit.
        Returns False when `request` itself had to be preempted."""
        while not self.kv_cache.allocate(request, num_new):
            victim = self._running.pop()
            self._preempt(victim)
            step.preempted_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, step: _Step) -> None:
        while self._waiting and step.budget > 0 and len(self._running) < self.config.max_num_seqs:
            request = self._waiting[0]
            hit = self.kv_cache.lookup_prefix(request)
            if hit.next_hash in step.pending:
                break
            num_new = min(request.num_tokens - hit.num_tokens, step.budget)
            if not self.kv_cache.allocate(request, num_new, hit):
                break
            self._waiting.popleft()
            request.num_computed_tokens = request.num_cached_tokens = hit.num_tokens
            request.status = RequestStatus.RUNNING
            self._running.append(request)
            self._add_scheduled(step, request, num_new)

    def _add_scheduled(self, step: _Step, request: Request, num_new: int) -> None:
        start = request.num_computed_tokens
        end = start + num_new
        step.pending.update(self.kv_cache.pending_hashes(request, num_new))
        step.scheduled.append(
            ScheduledRequest(
                request=request,
                token_ids=tuple(request.all_token_ids[start:end]),
                start_position=start,
                block_table=tuple(request.block_table),
                sample=end == request.num_tokens,
            )
        )
        step.budget -= num_new

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(request)
        logger.debug("preempted %s (%d tokens) for lack of KV blocks", request.request_id, request.num_tokens)

    def _append_sampled(self, request: Request, model_output: ModelOutput) -> None:
        token_id = model_output.sampled_token_ids.get(request.request_id)
        if token_id is None:
            raise ValueError(f"model output has no sampled token for request {request.request_id!r}")
        request.append_output_token(token_id, model_output.logprobs.get(request.request_id))
        stop = self._stop_condition(request, token_id)
        if stop is not None:
            self._finish(request, *stop)

    def _stop_condition(self, request: Request, token_id: int) -> tuple[RequestStatus, int | None] | None:
        """Stop checks that need no text. The first min_tokens tokens never stop on EOS / stop_token_ids."""
        params = request.sampling_params
        if request.num_output_tokens > params.min_tokens:
            if token_id in request.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED, None
            if token_id in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token_id
        reached_max_tokens = params.max_tokens is not None and request.num_output_tokens >= params.max_tokens
        if reached_max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None

    def _finish(self, request: Request, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self.kv_cache.free(request)
        request.status = status
        request.stop_reason = stop_reason
        del self._requests[request.request_id]
        self._finished_ids.append(request.request_id)
