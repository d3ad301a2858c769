"""Per-request sampling parameters (vLLM / OpenAI conventions) and stop-string matching.

`SamplingParams` is validated on construction: an invalid value raises `ValueError` naming the parameter and its
allowed range, so the server can turn it into a 400 as is. Defaults and ranges:

==================  ===========  =====================================================================
parameter           default      allowed / meaning
==================  ===========  =====================================================================
n                   1            >= 1 completions per request (see `engine.request.make_requests`)
max_tokens          16           >= 1, or None = until the model's context length (max_model_len)
min_tokens          0            >= 0 and <= max_tokens; EOS / stop_token_ids are masked until reached
temperature         1.0          >= 0; below `GREEDY_EPSILON` (i.e. 0) means greedy (argmax)
top_p               1.0          (0, 1]; 1 = off
top_k               0            -1 or 0 = off (-1 is stored as 0), else >= 1
min_p               0.0          [0, 1]; 0 = off
seed                None         an int64; a seeded request samples the same tokens in any batch
presence_penalty    0.0          [-2, 2], over generated tokens (OpenAI)
frequency_penalty   0.0          [-2, 2], over generated tokens, times their count (OpenAI)
repetition_penalty  1.0          > 0, over prompt + generated tokens (HF: divides positive logits)
logit_bias          {}           token id (int or numeric string) -> bias in [-100, 100], added to logits
stop                ()           non-empty strings; generation ends when the text contains one; the
                                 returned text ends before it (the stop string never leaks)
stop_token_ids      ()           token ids >= 0 that end generation (the token stays in token_ids)
ignore_eos          False        keep generating past the model's EOS token(s)
logprobs            False        return the chosen token's log-probability
top_logprobs        0            [0, 20] most likely alternatives per token; > 0 requires logprobs
==================  ===========  =====================================================================

Token ids can only be range-checked against a vocabulary: the engine calls `verify_token_ids(vocab_size)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

GREEDY_EPSILON = 1e-5
"""Temperatures below this sample greedily."""
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _invalid(name: str, allowed: str, value: object) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value: object, low: int, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _invalid(name, allowed, value)


def _check_float(name: str, value: object, low: float, high: float, allowed: str, *, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(name, allowed, value)
    if value < low or (open_low and value == low) or value > high:
        raise _invalid(name, allowed, value)


def _normalize_logit_bias(bias: Mapping[int | str, float] | None) -> dict[int, float]:
    """Keys as ints (JSON sends numeric strings), values checked against [-100, 100]."""
    result: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise _invalid("logit_bias keys", "token ids (non-negative integers)", key) from None
        if token_id < 0 or isinstance(key, bool):
            raise _invalid("logit_bias keys", "token ids (non-negative integers)", key)
        _check_float(f"logit_bias[{token_id}]", value, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, "in [-100, 100]")
        result[token_id] = float(value)
    return result


def _normalize_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    for s in stops:
        if not isinstance(s, str) or not s:
            raise _invalid("stop", "non-empty strings", s)
    return stops


def _normalize_stop_token_ids(ids: Sequence[int] | None) -> tuple[int, ...]:
    for token_id in ids or ():
        _check_int("stop_token_ids", token_id, 0, "token ids (non-negative integers)")
    return tuple(dict.fromkeys(ids or ()))


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one request's completions. See the module docstring for defaults and ranges."""

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        self._validate_lengths()
        self._validate_sampling()
        self._validate_penalties()
        self._validate_logprobs()
        object.__setattr__(self, "top_k", 0 if self.top_k == -1 else self.top_k)
        object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))
        object.__setattr__(self, "stop", _normalize_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalize_stop_token_ids(self.stop_token_ids))

    def _validate_lengths(self) -> None:
        _check_int("n", self.n, 1, "an integer >= 1")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, "an integer >= 1 or None")
        _check_int("min_tokens", self.min_tokens, 0, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _invalid("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)

    def _validate_sampling(self) -> None:
        _check_float("temperature", self.temperature, 0.0, math.inf, ">= 0 (0 = greedy)")
        _check_float("top_p", self.top_p, 0.0, 1.0, "in (0, 1]", open_low=True)
        _check_int("top_k", self.top_k, -1, "-1 or 0 (off) or an integer >= 1")
        _check_float("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        if self.seed is not None:
            is_int = isinstance(self.seed, int) and not isinstance(self.seed, bool)
            if not is_int or not INT64_MIN <= self.seed <= INT64_MAX:
                raise _invalid("seed", "a 64-bit integer or None", self.seed)

    def _validate_penalties(self) -> None:
        _check_float("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY, "in [-2, 2]")
        _check_float("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY, "in [-2, 2]")
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf, "> 0", open_low=True)

    def _validate_logprobs(self) -> None:
        if not isinstance(self.logprobs, bool):
            raise _invalid("logprobs", "a boolean", self.logprobs)
        _check_int("top_logprobs", self.top_logprobs, 0, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise _invalid("top_logprobs", f"an integer in [0, {MAX_TOP_LOGPROBS}]", self.top_logprobs)
        if self.top_logprobs and not self.logprobs:
            raise _invalid("top_logprobs", "0 unless logprobs is true", self.top_logprobs)

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax of the (biased, penalized) logits."""
        return self.temperature < GREEDY_EPSILON

    @property
    def has_penalties(self) -> bool:
        """True when any of presence / frequency / repetition penalty changes logits."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def stop_holdback(self) -> int:
        """Characters a streaming detokenizer must hold back: a tail this long may still grow into a stop string."""
        return max((len(s) for s in self.stop), default=1) - 1

    def verify_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError if a logit_bias key or stop token id is outside [0, vocab_size)."""
        for token_id in (*self.logit_bias, *self.stop_token_ids):
            if token_id >= vocab_size:
                raise _invalid("token ids in logit_bias and stop_token_ids", f"< vocab size {vocab_size}", token_id)


def find_stop(text: str, stops: Sequence[str], num_new_chars: int) -> tuple[int, str] | None:
    """Earliest stop string that ends within the last `num_new_chars` characters of `text`.

    Returns (index where the stop string starts, the stop string), or None. Call it after each detokenized
    step with the number of characters that step added; the caller then truncates the text to
    `text[:index]`, so the stop string never appears in the returned text.
    """
    longest = max((len(s) for s in stops), default=0)
    search_from = max(0, len(text) - num_new_chars - longest + 1)
    hits = [(i, s) for s in stops if (i := text.find(s, search_from)) != -1]
    return min(hits, default=None)
