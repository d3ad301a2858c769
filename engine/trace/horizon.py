"""How far ahead a request's routing can be predicted: the next visit of a layer, and the one after it.

The cache's priorities rank keys by their expected next use (engine.trace.predictor.batch_priorities). A key
the batch will use at its layer's next visit is ranked by the predictor; every other key waits a fixed
``miss_steps``. Replaying with an oracle that also knows the visit after the next one cut the blobs loaded and
the stall at reads of 3 layers by a fifth (README, "Replay and prediction"), so the question is whether that
visit can be predicted from what a request has run so far. `horizon_figures` measures it on recorded traces.

For every decode token ``t`` of a request (with two tokens after it) and every key ``(layer, expert)``:

- ``next_visit``: how well each estimator, from the request's tokens up to ``t``, ranks the keys that token
  ``t + 1`` uses above those it does not (all keys of all layers together);
- ``after_next``: among the keys token ``t + 1`` does *not* use — the ones `batch_priorities` cannot tell apart —
  how well each estimator ranks those token ``t + 2`` uses above the others.

The figure is the ranking AUC (`ranking_auc`: the chance that a used key scores above an unused one, ties
counting half; 0.5 is a coin, 1 a perfect ranking), averaged over tokens. Estimators, each from the request's
own tokens only (no shared statistics, no store), causal:

- ``frequency``: the request's use of each key so far (with a uniform pseudo-token);
- ``recency``: its use decayed by RECENCY_DECAY per token (the predictor's ``recent`` source);
- ``transitions``: counts of ``b`` at layer ``l`` of token ``s + h`` after ``a`` at ``l`` of token ``s``
  (``h`` = 1 for the next visit, 2 for the one after), summed over the experts of token ``t``;
- ``match``: the NEIGHBOURS earlier tokens that share the most keys with token ``t`` (the predictor's token
  match, over every layer) vote, ``exp(similarity - best)`` each, for the keys of their own token ``+ h``;
- ``match_once_next_ran`` (``after_next`` only): the same vote from the neighbours of token ``t + 1`` for their
  next tokens — what the predictor could know one step later, once token ``t + 1`` has run.

Pure numpy over the traces; no cache, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.trace.format import RequestTrace

NEIGHBOURS = 16
RECENCY_DECAY = 0.6
MATCH_PRIOR = 0.3
"""Pseudo-votes of the token match, spread as the request's frequency (as `HistorySettings.prior`)."""


@dataclass(frozen=True)
class HorizonFigures:
    """Mean ranking AUC per estimator for the next visit and for the visit after it (module docstring), the
    share of keys used in each case, and how many tokens were scored."""

    next_visit: dict[str, float]
    after_next: dict[str, float]
    next_visit_used: float
    after_next_used: float
    tokens: int


def ranking_auc(scores: np.ndarray, used: np.ndarray) -> float | None:
    """The chance that a key with ``used`` True scores above one with ``used`` False (ties count half): the
    Mann-Whitney statistic over their counts. None when either group is empty."""
    scores, used = np.asarray(scores, dtype=np.float64), np.asarray(used, dtype=bool)
    positives, negatives = int(used.sum()), int((~used).sum())
    if not positives or not negatives:
        return None
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average rank (1-based) of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts.tolist(), ends.tolist()):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[used].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def decode_use(request: RequestTrace) -> np.ndarray:
    """The request's decode tokens as one-hot use, bool [tokens, L, E]."""
    header = request.header
    steps = [step for step in request.steps if step.phase == "decode"]
    use = np.zeros((len(steps), header.num_layers, header.num_experts), dtype=bool)
    for token, step in enumerate(steps):
        for layer, experts in enumerate(step.experts):
            use[token, layer, list(experts)] = True
    return use


def horizon_figures(requests: Sequence[RequestTrace]) -> HorizonFigures:
    """Ranking AUCs of the next visit and of the visit after it on ``requests`` (module docstring), every
    request on its own. ValueError if no request has a decode token with two after it."""
    scores: dict[str, dict[str, list[float]]] = {"next": {}, "after": {}}
    used_shares: dict[str, list[float]] = {"next": [], "after": []}
    for request in requests:
        use = decode_use(request)
        for token in range(1, len(use) - 2):
            _score_token(use, token, scores, used_shares)
    if not used_shares["next"]:
        raise ValueError("no decode token with two tokens after it: nothing to score")
    return HorizonFigures(
        next_visit={name: float(np.mean(values)) for name, values in scores["next"].items()},
        after_next={name: float(np.mean(values)) for name, values in scores["after"].items()},
        next_visit_used=float(np.mean(used_shares["next"])),
        after_next_used=float(np.mean(used_shares["after"])),
        tokens=len(used_shares["next"]),
    )


def _score_token(use: np.ndarray, token: int, scores: dict[str, dict[str, list[float]]],
                 used_shares: dict[str, list[float]]) -> None:
    """Score token ``token``'s estimators for tokens ``token + 1`` and ``token + 2`` (``use``: the request's)."""
    past = use[:token + 1].astype(np.float64)  # tokens 0..t, known at t
    frequency = past.sum(axis=0) + use.shape[2] ** -1.0  # [L, E]
    share = frequency / frequency.sum(axis=1, keepdims=True)
    decays = RECENCY_DECAY ** np.arange(token, -1, -1, dtype=np.float64)
    recency = np.tensordot(decays, past, axes=1) + 1e-6 * share
    estimates = {
        "next": {"frequency": share, "recency": recency, "transitions": _transitions(use, token, 1),
                 "match": _match(use, token, token, 1, share)},
        "after": {"frequency": share, "recency": recency, "transitions": _transitions(use, token, 2),
                  "match": _match(use, token, token, 2, share),
                  "match_once_next_ran": _match(use, token + 1, token + 1, 1, share)},
    }
    unused_next = ~use[token + 1]
    targets = {"next": (np.ones_like(unused_next), use[token + 1]), "after": (unused_next, use[token + 2])}
    for horizon, (keys, used) in targets.items():
        used_shares[horizon].append(float(used[keys].mean()))
        for name, estimate in estimates[horizon].items():
            auc = ranking_auc(estimate[keys], used[keys])
            if auc is not None:
                scores[horizon].setdefault(name, []).append(auc)


def _transitions(use: np.ndarray, token: int, ahead: int) -> np.ndarray:
    """Per key, the sum over token ``token``'s experts ``a`` of P(key at its layer ``ahead`` tokens after ``a``),
    from the pairs of tokens ``ahead`` apart that end at or before ``token`` (one pseudo-count each), [L, E]."""
    sources = use[:token + 1 - ahead].astype(np.float64)  # [S, L, E]
    successors = use[ahead:token + 1].astype(np.float64)
    counts = np.einsum("sla,slb->lab", sources, successors) + 1.0 / use.shape[2]  # [L, E, E]
    totals = sources.sum(axis=0) + 1.0  # [L, E]
    conditional = counts / totals[:, :, None]
    return np.einsum("la,lab->lb", use[token].astype(np.float64), conditional)


def _match(use: np.ndarray, query: int, known: int, ahead: int, share: np.ndarray) -> np.ndarray:
    """The vote of the NEIGHBOURS tokens before ``query`` most like it (shared keys; ties: the latest) whose token
    ``+ ahead`` is at or before ``known``, for the keys of that token, with MATCH_PRIOR pseudo-votes spread as
    ``share``, [L, E]."""
    candidates = known - ahead + 1  # tokens j with j + ahead <= known (and j < query)
    candidates = min(candidates, query)
    if candidates <= 0:
        return share.copy()
    similarity = (use[:candidates] & use[query]).sum(axis=(1, 2)).astype(np.float64)
    latest_first = -np.arange(candidates)
    order = np.lexsort((latest_first, -similarity))[:NEIGHBOURS]
    weights = np.exp(similarity[order] - similarity[order[0]])
    votes = np.tensordot(weights, use[order + ahead].astype(np.float64), axes=1)  # [L, E]
    return (votes + MATCH_PRIOR * share) / (weights.sum() + MATCH_PRIOR)
