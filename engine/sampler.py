"""Next-token sampling for a batch of sequences: logits in, token ids (and logprobs) out. No model.

Per row, in this order (vLLM's order; each step is skipped when no row in the batch uses it):
  1. logit_bias is added;
  2. while fewer than min_tokens tokens were generated, the row's terminal tokens (EOS unless ignore_eos,
     stop_token_ids) are masked to -inf;
  3. repetition penalty over prompt + generated tokens (HF: negative logits * p, others / p), then
     frequency (x count) and presence penalties over generated tokens (OpenAI);
  4. greedy rows (temperature 0) take the argmax of these logits; with none of 1-3 set that is exactly the
     argmax of the raw logits, first index on ties, as `transformers.generate(do_sample=False)`;
  5. other rows: divide by temperature, mask by min_p, then top_k (ties with the k-th logit kept), then
     top_p over what remains (the smallest prefix of the sorted distribution with mass >= top_p), and draw
     with the exponential-race trick argmax(p / q), q ~ Exp(1). A seeded row draws q from its own
     torch.Generator, which lives across steps until `release()`, so it samples the same tokens alone or in
     any batch; unseeded rows draw from torch's default generator.
Logprobs are the log_softmax of the RAW logits (before 1-5; vLLM's default "raw logprobs").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from engine.request import Request, TokenLogprob


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    """One sampled token per row."""
    logprobs: list[TokenLogprob | None]
    """Per row: the chosen token's logprob and top alternatives, or None if the request did not ask."""


class Sampler:
    """Samples next tokens; owns the torch.Generator of each seeded request, keyed by request id.

    Call `release(ids)` with `SchedulerOutput.finished_ids` every step so generators do not pile up; keep a
    preempted request's generator (it resumes where it stopped).
    """

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    @property
    def num_generators(self) -> int:
        return len(self._generators)

    def release(self, request_ids: Iterable[str]) -> None:
        """Forget the generators of finished requests (unknown ids are ignored)."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SamplerOutput:
        """logits: [num_seqs, vocab], row i belongs to requests[i] (its last position this step)."""
        raw = logits.float()  # [B, V]
        processed = apply_logit_bias(raw, requests)
        processed = apply_min_tokens(processed, requests)
        processed = apply_penalties(processed, requests)
        token_ids = processed.argmax(dim=-1)  # [B]
        random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=raw.device)  # [R]
            sampled = self._sample(processed[rows], [requests[i] for i in random_rows])  # [R]
            token_ids = token_ids.index_copy(0, rows, sampled)
        return SamplerOutput(token_ids.tolist(), compute_logprobs(raw, token_ids, requests))

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """logits: [R, V] of non-greedy rows -> sampled token ids [R]."""
        params = [r.sampling_params for r in requests]
        temperature = torch.tensor([p.temperature for p in params], device=logits.device)  # [R]
        logits = logits / temperature.unsqueeze(1)
        if any(p.min_p > 0 for p in params):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=logits.device))
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            top_k = torch.tensor([p.top_k or logits.shape[1] for p in params], device=logits.device)
            top_p = torch.tensor([p.top_p if p.top_p < 1 else torch.inf for p in params], device=logits.device)
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)  # [R, V]
        race = torch.empty_like(probs).exponential_()  # [R, V]
        for row, request in enumerate(requests):
            if request.sampling_params.seed is not None:
                race[row].exponential_(generator=self._generator(request, logits.device))
        return probs.div(race).argmax(dim=-1)

    def _generator(self, request: Request, device: torch.device) -> torch.Generator:
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(request.sampling_params.seed % 2**64)
            self._generators[request.request_id] = generator
        return generator


def apply_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """logits [B, V] + each row's logit_bias (a new tensor when any row has a bias)."""
    entries = [
        (row, token, bias) for row, r in enumerate(requests) for token, bias in r.sampling_params.logit_bias.items()
    ]
    if not entries:
        return logits
    rows, tokens, biases = zip(*entries, strict=True)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
    return logits.index_put(index, torch.tensor(biases, device=logits.device), accumulate=True)


def apply_min_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Mask terminal tokens (-inf) of rows that have generated fewer than min_tokens tokens."""
    entries = [
        (row, token)
        for row, r in enumerate(requests)
        if r.num_output_tokens < r.sampling_params.min_tokens
        for token in r.terminal_token_ids
    ]
    if not entries:
        return logits
    rows, tokens = zip(*entries, strict=True)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
    return logits.index_put(index, torch.tensor(-torch.inf, device=logits.device))


def apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Repetition (prompt + output, HF), then frequency and presence (output, OpenAI) penalties. [B, V]."""
    params = [r.sampling_params for r in requests]
    if not any(p.has_penalties for p in params):
        return logits
    device, vocab = logits.device, logits.shape[1]
    output_counts = token_counts([r.output_token_ids for r in requests], vocab, device)  # [B, V]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = token_counts([r.prompt_token_ids for r in requests], vocab, device).gt(0) | output_counts.gt(0)
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)  # [B, 1]
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalized, logits)
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)  # [B, 1]
    presence = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)  # [B, 1]
    return logits - frequency * output_counts - presence * output_counts.gt(0).float()


def token_counts(histories: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token id occurs in each history: [B, V] float32."""
    width = max((len(h) for h in histories), default=0)
    padded = torch.full((len(histories), width), vocab, dtype=torch.long)  # [B, L], pad id = vocab
    for row, history in enumerate(histories):
        padded[row, : len(history)] = torch.tensor(history, dtype=torch.long)
    counts = torch.zeros(len(histories), vocab + 1, device=device)  # [B, V + 1], last column takes the padding
    counts.scatter_add_(1, padded.to(device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p [B] times the row's top probability. [B, V]."""
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # [B, 1]
    return logits.masked_fill(probs < threshold, -torch.inf)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k [B] logits (ties with the k-th kept; k = V is off), then the smallest
    highest-probability set with mass >= top_p [B] (inf is off); mask the rest to -inf. [B, V]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, V] each
    kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))  # [B, 1]
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -torch.inf)
    probs = sorted_logits.softmax(dim=-1)  # [B, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V], probability of strictly more likely tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), -torch.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def compute_logprobs(
    raw: torch.Tensor, token_ids: torch.Tensor, requests: Sequence[Request]
) -> list[TokenLogprob | None]:
    """Per row: log_softmax(raw [B, V]) at the chosen token [B] and the top_logprobs best, if asked for."""
    rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs]
    result: list[TokenLogprob | None] = [None] * len(requests)
    if not rows:
        return result
    index = torch.tensor(rows, device=raw.device)
    logprobs = raw[index].log_softmax(dim=-1)  # [L, V]
    chosen = logprobs.gather(1, token_ids[index].unsqueeze(1)).squeeze(1).tolist()  # [L]
    k = max(requests[i].sampling_params.top_logprobs for i in rows)
    top_values, top_ids = logprobs.topk(k, dim=-1)  # [L, k] each
    for j, row in enumerate(rows):
        n = requests[row].sampling_params.top_logprobs
        top = tuple(zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist(), strict=True))
        result[row] = TokenLogprob(token_ids[row].item(), chosen[j], top)
    return result
