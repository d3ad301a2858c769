"""Which experts a running request will use next, and one priority per (layer, expert) for the whole batch.

A step runs the layers 0..L-1 in order; after layer ``s - 1`` the request's *frontier* is ``layers_seen = s``.
`Predictor.predict` answers, for every layer, the probability that each expert is used at that layer's next
visit: this step for layers ``>= s``, the next step for layers ``< s``. It scores experts by naive Bayes: the
log of the per-layer frequency of each expert (learned online over all decode tokens; alone, the *frequency*
baseline) plus, for each enabled source, the log-ratio of the source's evidence over that frequency (terms that
are equal for every expert of a layer are left out: they cancel in the softmax). The transition log-ratios are
tempered by ``evidence_weight``: the layers before a target say much the same thing, and counting each in
full makes the probabilities overconfident (on h39s 0.5 kept recall and raised prefetch precision):

- (c) ``"transitions"`` (EdgeMoE): `TransitionStatistics`, counts of expert ``b`` at layer ``l`` given expert
  ``a`` at layer ``l - d`` of the same token, for ``d = 1..max_offset`` (used only where layer ``l - d`` has
  already run in this step), and given ``a`` at layer ``l`` of the previous token (``d = 0``, the temporal
  transition; for a next-step target the current token is that previous token). Learned online from every
  finished decode step.
- (a) ``"store"`` (MoE-Infinity): the `TraceStore` match of the request's decode activation matrix (cosine over
  layer-normalized matrices, `TraceStore.match`), taken at the start of each step, times ``store_weight``.

Scores become a distribution per layer (softmax) and the probability of use is ``min(1, top_k * share)``.
`any_request` and `batch_priorities` turn the predictions of all running requests (in lockstep through the
layers) into one keep/prefetch priority per key from the probability that at least one request uses it at its
next visit and how soon that visit comes: Belady's "farthest next use goes first", with expectations.

Pure Python on purpose: the tables are tiny (layers x experts x experts) and the hot path updates only the rows
a layer changes; per-call tensor overhead would dominate. Each request's rows are cached and recomputed when
their inputs change (the frontier reaching them, a new step).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from engine.offload.cache import Key
from engine.trace.store import TraceStore

logger = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("store", "transitions")
DEFAULT_MAX_OFFSET = 4
DEFAULT_SMOOTHING = 1.0
DEFAULT_STORE_WEIGHT = 1.0
DEFAULT_EVIDENCE_WEIGHT = 0.5
DEFAULT_MISS_STEPS = 2.0
"""`batch_priorities`: steps until a key's next use when its next visit does not use it (tuned on h39s)."""
_SHARE_FLOOR = 1e-3
"""Shares below this count as this in the store's log-ratio (an expert the store never saw is unlikely, not
impossible)."""


class TransitionStatistics:
    """Source (c): smoothed co-activation counts between layers and between consecutive tokens, and the prior.

    ``log_counts[d][l][a][b]``: log of (decode tokens with expert ``a`` at layer ``l - d`` and ``b`` at layer
    ``l`` (``d >= 1``), or ``a`` at layer ``l`` of the previous token and ``b`` at layer ``l`` (``d = 0``), plus
    ``smoothing``). ``log_frequency[l][b]``: log of (decode tokens using ``b`` at ``l``, plus ``smoothing``).
    """

    def __init__(self, num_layers: int, num_experts: int, max_offset: int = DEFAULT_MAX_OFFSET,
                 smoothing: float = DEFAULT_SMOOTHING) -> None:
        if max_offset < 0 or smoothing <= 0:
            raise ValueError("max_offset must be >= 0 and smoothing > 0")
        self.num_layers = num_layers
        self.max_offset = max_offset
        self.tokens = 0
        self._counts = [[[[smoothing] * num_experts for _ in range(num_experts)] for _ in range(num_layers)]
                        for _ in range(max_offset + 1)]
        self._frequency = [[smoothing] * num_experts for _ in range(num_layers)]
        log_smoothing = math.log(smoothing)
        self.log_counts = [[[[log_smoothing] * num_experts for _ in range(num_experts)] for _ in range(num_layers)]
                           for _ in range(max_offset + 1)]
        self.log_frequency = [[log_smoothing] * num_experts for _ in range(num_layers)]

    def observe(self, token: Sequence[Sequence[int]], previous: Sequence[Sequence[int]] | None) -> None:
        """Learn from one decode token's expert ids per layer ``token``, after ``previous`` (or None)."""
        self.tokens += 1
        for layer, experts in enumerate(token):
            for expert in experts:
                self._frequency[layer][expert] += 1.0
                self.log_frequency[layer][expert] = math.log(self._frequency[layer][expert])
            for offset in range(1, min(self.max_offset, layer) + 1):
                self._count(offset, layer, token[layer - offset], experts)
            if previous is not None:
                self._count(0, layer, previous[layer], experts)

    def _count(self, offset: int, layer: int, sources: Sequence[int], targets: Sequence[int]) -> None:
        counts, logs = self._counts[offset][layer], self.log_counts[offset][layer]
        for source in sources:
            for target in targets:
                counts[source][target] += 1.0
                logs[source][target] = math.log(counts[source][target])


@dataclass
class RequestState:
    """One running request as the predictor sees it (create with `Predictor.new_request`)."""

    current: list[tuple[int, ...]]  # expert ids of this step's layers run so far (others empty)
    history: list[list[float]]  # [L][E] decode activation counts of the finished steps
    layers_seen: int = 0
    previous: list[tuple[int, ...]] | None = None  # the last decode step's ids, None after a prefill
    decode: bool = True
    probabilities: list[list[float]] = field(default_factory=list)  # cached [L][E] answer of `predict`
    store_match: list[list[float]] | None = None  # this step's store prediction [L][E]


class Predictor:
    """Per-layer expert probabilities of running requests from the enabled ``sources`` (module docstring).

    The transition statistics and the store are shared by all requests; `end_step` teaches the statistics,
    `finish` enters the request into the store. Call per request: `new_request`, then per step `begin_step`,
    `observe_layer` for each layer in order (`predict` at any point), `end_step`; finally `finish`.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        sources: Collection[str] = SOURCES,
        store: TraceStore | None = None,
        transitions: TransitionStatistics | None = None,
        store_weight: float = DEFAULT_STORE_WEIGHT,
        evidence_weight: float = DEFAULT_EVIDENCE_WEIGHT,
    ) -> None:
        unknown = set(sources) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown prediction source(s) {sorted(unknown)}; choose from {SOURCES}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.sources = frozenset(sources)
        self.store = store if store is not None else TraceStore(num_layers, num_experts)
        self.transitions = transitions if transitions is not None else TransitionStatistics(num_layers, num_experts)
        self.store_weight = store_weight
        self.evidence_weight = evidence_weight

    def new_request(self) -> RequestState:
        """Tracking state for a request about to run its first step."""
        return RequestState(current=[()] * self.num_layers,
                            history=[[0.0] * self.num_experts for _ in range(self.num_layers)])

    def begin_step(self, state: RequestState, decode: bool) -> None:
        """``state`` starts a step (a decode token, or a prefill whose experts are not one token's)."""
        state.decode = decode
        state.layers_seen = 0
        state.store_match = self._match(state) if "store" in self.sources else None
        state.probabilities = [self._row(state, layer) for layer in range(self.num_layers)]

    def observe_layer(self, state: RequestState, layer: int, experts: Sequence[int]) -> None:
        """``state`` ran ``layer`` (the frontier) with ``experts``; the rows this changes are recomputed."""
        if layer != state.layers_seen:
            raise ValueError(f"layer {layer} observed at frontier {state.layers_seen}: layers run in order")
        state.current[layer] = tuple(experts)
        state.layers_seen = layer + 1
        reach = self.transitions.max_offset if "transitions" in self.sources else 0
        for target in range(layer, min(self.num_layers, layer + reach + 1)):
            state.probabilities[target] = self._row(state, target)

    def end_step(self, state: RequestState) -> None:
        """Close ``state``'s step: a decode step teaches the transition statistics and joins the history."""
        if state.decode:
            self.transitions.observe(state.current, state.previous)
            for layer, experts in enumerate(state.current):
                for expert in experts:
                    state.history[layer][expert] += 1.0
            state.previous = state.current
        else:
            state.previous = None
        state.current = [()] * self.num_layers

    def finish(self, state: RequestState) -> None:
        """The request ended: its decode activation matrix enters the store."""
        self.store.add(torch.tensor(state.history))

    def predict(self, state: RequestState) -> list[list[float]]:
        """Probability of use of every expert at every layer's next visit, [L][E] (module docstring).

        The returned rows are the state's cache: read them, do not change them. Empty before the first
        `begin_step`.
        """
        return state.probabilities

    def _row(self, state: RequestState, layer: int) -> list[float]:
        """The probabilities of ``layer``'s experts at its next visit from the current frontier."""
        stats = self.transitions
        scores = list(stats.log_frequency[layer])
        this_step = layer >= state.layers_seen
        if "transitions" in self.sources:
            if this_step:
                for offset in range(1, min(stats.max_offset, layer) + 1):
                    if layer - offset < state.layers_seen:
                        _add_evidence(scores, stats.log_counts[offset][layer], state.current[layer - offset],
                                      stats.log_frequency[layer], self.evidence_weight)
            temporal = state.current[layer] if not this_step else (state.previous or [()] * self.num_layers)[layer]
            _add_evidence(scores, stats.log_counts[0][layer], temporal, stats.log_frequency[layer],
                          self.evidence_weight)
        if state.store_match is not None:
            frequency = stats.log_frequency[layer]
            for expert, share in enumerate(state.store_match[layer]):
                scores[expert] += self.store_weight * (math.log(max(share, _SHARE_FLOOR)) - frequency[expert])
        return _use_probabilities(scores, self.top_k)

    def _match(self, state: RequestState) -> list[list[float]] | None:
        match = self.store.match(torch.tensor(state.history), 0)
        return match.tolist() if match is not None else None


def _add_evidence(scores: list[float], log_counts: list[list[float]], sources: Sequence[int],
                  log_frequency: list[float], weight: float) -> None:
    """Add, for each active source expert, ``weight`` * (log P(b | source) - log P(b)) up to a per-row constant."""
    for source in sources:
        row = log_counts[source]
        for expert in range(len(scores)):
            scores[expert] += weight * (row[expert] - log_frequency[expert])


def _use_probabilities(scores: list[float], top_k: int) -> list[float]:
    """``min(1, top_k * softmax(scores))``."""
    top = max(scores)
    weights = [math.exp(score - top) for score in scores]
    total = sum(weights)
    return [min(1.0, top_k * weight / total) for weight in weights]


def any_request(predictions: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """[L][E] probability that at least one of the running requests uses each key: ``1 - prod(1 - p)``."""
    combined = [[0.0] * len(row) for row in predictions[0]] if predictions else []
    for layer, row in enumerate(combined):
        for expert in range(len(row)):
            unused = 1.0
            for prediction in predictions:
                unused *= 1.0 - prediction[layer][expert]
            row[expert] = 1.0 - unused
    return combined


def batch_priorities(
    next_visit: Sequence[Sequence[float]], layers_seen: int, miss_steps: float = DEFAULT_MISS_STEPS,
    precision: str = "native",
) -> dict[Key, float]:
    """One keep-priority per ``(layer, expert, precision)`` key for the batch: ``1 / (1 + expected distance)``.

    ``next_visit`` [L][E]: probability that some running request uses the key at its layer's next visit
    (`any_request` of the `Predictor.predict` answers). The expected distance in layers to the key's next use —
    Belady's eviction criterion, made online — is ``distance + (1 - p) * miss_steps * L``: ``distance`` from the
    frontier ``layers_seen`` to the layer's next visit (0 = the next layer to run), and, if the key is not used
    then, ``miss_steps`` more steps. An empty batch gives an empty map (the policy's own rule decides alone).
    """
    num_layers = len(next_visit)
    priorities = {}
    for layer, row in enumerate(next_visit):
        distance = (layer - layers_seen) % num_layers
        for expert, probability in enumerate(row):
            expected = distance + (1.0 - probability) * miss_steps * num_layers
            priorities[(layer, expert, precision)] = 1.0 / (1.0 + expected)
    return priorities
