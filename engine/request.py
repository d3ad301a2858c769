"""Request and output dataclasses: the only engine types that cross the server <-> engine seam.

One `Request` is one sequence the scheduler runs: a prompt and ONE completion. A user request asking for
n > 1 completions becomes n child Requests (`make_requests`) that share the prompt; prefix caching lets them
share the prompt's full KV blocks, so the prompt is computed once (the scheduler holds a child back a step
while its prompt blocks are being computed by a sibling). Child i of a seeded request gets seed + i, so the
completions differ yet each is reproducible (vLLM's convention). The engine gathers the children's
`CompletionOutput`s into one `RequestOutput` whose `outputs[i]` is child i.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Literal

from engine.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


class RequestStatus(enum.Enum):
    """Where a request is in its life. PREEMPTED requests wait (at the front of the queue) to be recomputed."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}
FINISHED_STATUS: dict[FinishReason, RequestStatus] = {reason: status for status, reason in _FINISH_REASONS.items()}


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one generated token and, if asked for, its most likely alternatives (descending)."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Request:
    """One sequence: prompt + one completion, with the scheduler's bookkeeping.

    Invariants kept by the scheduler and the KV cache manager:
    - `all_token_ids == prompt_token_ids + output_token_ids`;
    - the first `num_computed_tokens` of `all_token_ids` have their KV in the blocks of `block_table`;
    - `block_hashes[i]` is the chained hash of the full block i of `all_token_ids` (filled lazily).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    parent_id: str = ""
    """The user-visible request id this sequence belongs to; equal to request_id when n == 1."""
    index: int = 0
    """This sequence's completion index within its parent (RequestOutput.outputs[index])."""
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Tokens served from the prefix cache at the last admission (prompt tokens not recomputed)."""
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    stop_reason: int | str | None = None
    """The stop token id or stop string that finished the request, if one did."""
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids
        self.parent_id = self.parent_id or self.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.status.finish_reason

    @property
    def terminal_token_ids(self) -> frozenset[int]:
        """Tokens that end this sequence: stop_token_ids, plus EOS unless ignore_eos (masked until min_tokens)."""
        stop_ids = frozenset(self.sampling_params.stop_token_ids)
        return stop_ids if self.sampling_params.ignore_eos else stop_ids | self.eos_token_ids

    def append_output_token(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        """Record one sampled token (and its logprobs, when the request asked for them)."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)


def make_requests(
    parent_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    eos_token_ids: frozenset[int] = frozenset(),
    arrival_time: float | None = None,
) -> list[Request]:
    """The params.n sequences of one user request: ids `parent_id` (n == 1) or `f"{parent_id}#{i}"`.

    Each child has n = 1 and, for a seeded request, seed + i (wrapping within int64).
    """
    arrival = time.monotonic() if arrival_time is None else arrival_time
    return [
        Request(
            request_id=parent_id if params.n == 1 else f"{parent_id}#{i}",
            prompt_token_ids=prompt_token_ids,
            sampling_params=_child_params(params, i),
            eos_token_ids=eos_token_ids,
            arrival_time=arrival,
            parent_id=parent_id,
            index=i,
        )
        for i in range(params.n)
    ]


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    if params.seed is None:
        return dataclasses.replace(params, n=1)
    seed = (params.seed + index + 2**63) % 2**64 - 2**63
    return dataclasses.replace(params, n=1, seed=seed)


@dataclass
class CompletionOutput:
    """One completion of a request, as returned to users. `text` never contains a stop string."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A user request's state: `outputs[i]` is completion i (cumulative, not a delta)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


@dataclass
class RequestTimes:
    """Monotonic timestamps of one request, for latency metrics: arrival, first scheduled, first token."""

    arrival: float = field(default_factory=time.monotonic)
    scheduled: float | None = None
    first_token: float | None = None
