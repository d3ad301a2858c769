"""Which experts a running request will use next, and one priority per (layer, expert) for the whole batch.

A step runs the layers 0..L-1 in order; after layer ``s - 1`` the request's *frontier* is ``layers_seen = s``.
`Predictor.predict` answers, for every layer, the probability that each expert is used at that layer's next
visit: this step for layers ``>= s``, the next step for layers ``< s``. It scores experts by naive Bayes: the
log of the per-layer frequency of each expert (alone, the *frequency* baseline) plus, for each enabled source,
the log-ratio of the source's evidence over that frequency (terms that are equal for every expert of a layer
are left out: they cancel in the softmax). The transition log-ratios are tempered by ``evidence_weight``: the
layers before a target say much the same thing, and counting each in full makes the probabilities
overconfident (on h39s 0.5 kept recall and raised prefetch precision).

Frequency and transitions are counted twice, from every finished decode step: into the shared
`TransitionStatistics` (all requests; persisted with the store) and into the request's own `RequestStatistics`,
which are the ones it predicts from. A request's own begin as the shared ones when it starts, scaled to
``request_prior_tokens`` pseudo-tokens (`TransitionStatistics.scaled`), and add its own tokens at full weight: a new
request starts from what all past requests taught and soon follows its own kind, where another kind of
request's many tokens would otherwise outweigh its own few.

- (c) ``"transitions"`` (EdgeMoE): counts of expert ``b`` at layer ``l`` given expert ``a`` at layer ``l - d``
  of the same token, for ``d = 1..max_offset`` (used only where layer ``l - d`` has already run in this step),
  and given ``a`` at layer ``l`` of the previous token (``d = 0``, the temporal transition; for a next-step
  target the current token is that previous token). The shared statistics' smoothing is a prior of
  ``smoothing`` pseudo-tokens in which every source expert is active with probability ``top_k / num_experts``
  whatever the target, so a target seen rarely gets a log-ratio near 0 instead of a large one (on h39s at
  ``max_offset`` 4: recall 0.799 -> 0.802, over its first 160 tokens 0.738 -> 0.760, with ``smoothing`` 4
  instead of the former 1 pseudo-token at rate 1).
- ``"history"``: the token match over the request's own recent decode tokens (`HistorySettings`): tokens repeat
  routing patterns within a request, so the recent tokens whose routing over the layers run so far is most
  like this token's predict the layers ahead (a nearest-neighbour vote; unlike the transitions, it sees
  patterns of several layers together). Its log-ratio is added to the rows ``reach`` layers ahead, and their
  next tokens' vote to the row of the layer just run (its next visit is the next token's).
- ``"recent"``: the request's recent use of each layer's experts (decaying over its last tokens,
  `HistorySettings`), its log-ratio added to every row. It raises recall but not the cache: the default policy
  leaves it out (engine.trace.planner.POLICY_SOURCES).
- (a) ``"store"`` (MoE-Infinity): the `TraceStore` match of the request's decode activation matrix (cosine over
  layer-normalized matrices, `TraceStore.match`), taken at the start of each step, times ``store_weight``.

Scores become a distribution per layer (softmax) and the probability of use is ``min(1, top_k * share)``.
`any_request` and `batch_priorities` turn the predictions of all running requests (in lockstep through the
layers) into one keep/prefetch priority per key from the probability that at least one request uses it at its
next visit and how soon that visit comes: Belady's "farthest next use goes first", with expectations.

The hot path is pure Python on purpose: it reads and updates only the rows a layer changes (``E`` values each),
where per-call tensor overhead would dominate; the shared tables are tensors and a request copies only the rows it
reads (`RequestStatistics`), so start-up and memory do not grow with ``E x E`` per request. The per-token work
still grows with ``max_offset x top_k x E`` (benchmarks/predictor_cost.py). Each request keeps every layer's
scores: `begin_step` computes them all (frequency, temporal evidence, store), `observe_layer` adds the new
layer's evidence to the ``max_offset`` rows after it, replaces the token match's terms of the ``reach`` rows after
it and rebuilds the observed layer's own row for the next step; only those rows go through the softmax again. The
statistics change only in `end_step`, so within a step the incremental scores equal a recomputation.
"""

from __future__ import annotations

import heapq
import logging
import math
import weakref
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from engine.offload.cache import Key
from engine.trace.store import TraceStore

logger = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("store", "transitions", "history", "recent")
DEFAULT_MAX_OFFSET = 8
"""Layers back the transition statistics look (tuned on h39s: recall 0.802 at 4, 0.811 at 8, 0.812 at 12)."""
DEFAULT_SMOOTHING = 4.0
"""Pseudo-tokens of the statistics' prior (tuned on h39s; 1 to 16 within 0.001 of recall)."""
DEFAULT_TOP_K = 2
"""Experts per token assumed by a `TransitionStatistics` built without ``top_k`` (its prior's rate)."""
DEFAULT_REQUEST_PRIOR_TOKENS = 8.0
"""Pseudo-tokens the shared statistics weigh in a request's own (`TransitionStatistics.scaled`)."""
DEFAULT_STORE_WEIGHT = 1.0
DEFAULT_EVIDENCE_WEIGHT = 0.5
DEFAULT_MISS_STEPS = 3.0
"""`batch_priorities`: steps until a key's next use when its next visit does not use it (tuned on h39s: with free
reads, hit rate 0.7289 at 2 and 0.7316 at 3 for ~40 more blobs in 22,700; 1 / p instead, the geometric wait,
loads ~3,000 blobs more)."""
_SHARE_FLOOR = 1e-3
"""Shares below this count as this in the store's log-ratio (an expert the store never saw is unlikely, not
impossible)."""


class TransitionStatistics:
    """Source (c), shared by all requests: co-activation counts over every finished decode token, on a prior of
    ``smoothing`` pseudo-tokens in which every source expert is active at the average rate ``top_k /
    num_experts`` whatever the target (each pair count starts at ``smoothing * top_k / num_experts``, each
    frequency at ``smoothing``).

    ``counts[d, l, a, b]`` (float64 [max_offset + 1, L, E, E]): the (pseudo-)tokens with expert ``a`` at layer
    ``l - d`` and ``b`` at layer ``l`` (``d >= 1``), or ``a`` at layer ``l`` of the previous token and ``b`` at
    layer ``l`` (``d = 0``); ``frequency[l, b]`` (float64 [L, E]): the (pseudo-)tokens using ``b`` at ``l``. So
    ``counts[d, l, a, b] / frequency[l, b]`` estimates P(a | b). One tensor each, not Python lists: at
    DeepSeek-V3's 61 layers x 256 experts the tables hold 36 M counts (288 MB; benchmarks/predictor_cost.py).

    Requests predict from their own `RequestStatistics` (`scaled`), which read these rows as they were when the
    request started: before `observe` changes a row, every live request that has not yet read it takes its copy.

    What was learned persists with the trace store (engine.trace.store): `state_tensors` gives the observed
    counts without the prior, `restore` puts them back into statistics of the same shape (layers, experts,
    ``max_offset``) under that object's own prior.
    """

    def __init__(self, num_layers: int, num_experts: int, max_offset: int = DEFAULT_MAX_OFFSET,
                 smoothing: float = DEFAULT_SMOOTHING, top_k: int = DEFAULT_TOP_K) -> None:
        if max_offset < 0 or smoothing <= 0 or not 0 < top_k <= num_experts:
            raise ValueError("max_offset must be >= 0, smoothing > 0 and top_k in 1..num_experts")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.max_offset = max_offset
        self.smoothing = smoothing
        self.prior_tokens = smoothing
        self.prior = smoothing * top_k / num_experts
        self.tokens = 0
        self.counts = torch.full((max_offset + 1, num_layers, num_experts, num_experts), self.prior,
                                 dtype=torch.float64)
        self.frequency = torch.full((num_layers, num_experts), smoothing, dtype=torch.float64)
        self._rows = self.counts.numpy().reshape(-1, num_experts)  # the same memory, by row
        self._views: weakref.WeakSet[RequestStatistics] = weakref.WeakSet()

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(num_layers, num_experts, max_offset)``: statistics of another shape cannot be restored here."""
        return self.num_layers, self.num_experts, self.max_offset

    def scaled(self, prior_tokens: float) -> RequestStatistics:
        """A request's own statistics: these (observed tokens and prior together) scaled to ``prior_tokens``
        tokens, as they are now; its own tokens, which `RequestStatistics.observe` adds at full weight, soon
        dominate."""
        return RequestStatistics(self, prior_tokens)

    def row(self, index: int, scale: float = 1.0) -> list[float]:
        """The counts of row ``index`` = ``(d * L + l) * E + a`` (all targets ``b``) as they are now, times
        ``scale``."""
        return (self._rows[index] * scale).tolist()  # numpy: a tensor's indexing costs more than the row here

    def observe(self, token: Sequence[Sequence[int]], previous: Sequence[Sequence[int]] | None) -> None:
        """Learn from one decode token's expert ids per layer ``token``, after ``previous`` (or None)."""
        num_experts = self.num_experts
        used = [layer * num_experts + expert for layer, experts in enumerate(token) for expert in experts]
        rows, cells = [], []
        for index, targets in _transition_rows(token, previous, self.max_offset, self.num_layers, num_experts):
            rows.append(index)
            cells.extend(index * num_experts + target for target in targets)
        for view in self._views:
            view.keep(rows)
        self.tokens += 1
        self.counts.view(-1).index_put_((torch.tensor(cells, dtype=torch.int64),),
                                        torch.ones(len(cells), dtype=torch.float64), accumulate=True)
        self.frequency.view(-1).index_put_((torch.tensor(used, dtype=torch.int64),),
                                           torch.ones(len(used), dtype=torch.float64), accumulate=True)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The observed counts, prior left out (int64): ``transition_counts`` [max_offset + 1, L, E, E] (index
        ``[d][l][a][b]`` as ``counts``), ``frequency_counts`` [L, E] and ``transition_tokens`` [] (decode
        tokens observed)."""
        return {"transition_counts": (self.counts - self.prior).round().long(),
                "frequency_counts": (self.frequency - self.smoothing).round().long(),
                "transition_tokens": torch.tensor(self.tokens, dtype=torch.int64)}

    def restore(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace what was learned with the `state_tensors` of statistics of this shape (plus this prior).

        KeyError for a missing tensor, ValueError for another shape or dtype or a negative count; either way
        nothing changes. Requests already running keep the rows they started with.
        """
        counts, frequency, tokens = (tensors["transition_counts"], tensors["frequency_counts"],
                                     tensors["transition_tokens"])
        layers, experts, offsets = self.num_layers, self.num_experts, self.max_offset + 1
        if (tuple(counts.shape) != (offsets, layers, experts, experts) or tuple(frequency.shape) != (layers, experts)
                or tokens.dim() != 0):
            raise ValueError(f"transition statistics of shape {tuple(counts.shape)} / {tuple(frequency.shape)} do "
                             f"not fit {layers} layers, {experts} experts and max_offset {self.max_offset}")
        if any(tensor.dtype != torch.int64 for tensor in (counts, frequency, tokens)):
            raise ValueError("transition statistics must be int64 counts")
        if (counts < 0).any() or (frequency < 0).any() or tokens < 0:
            raise ValueError("transition statistics hold negative counts")
        every_row = range(offsets * layers * experts)
        for view in self._views:
            view.keep(every_row)
        self.counts = counts.double() + self.prior
        self._rows = self.counts.numpy().reshape(-1, self.num_experts)
        self.frequency = frequency.double() + self.smoothing
        self.tokens = int(tokens)


def _transition_rows(token: Sequence[Sequence[int]], previous: Sequence[Sequence[int]] | None, max_offset: int,
                     num_layers: int, num_experts: int) -> Iterator[tuple[int, Sequence[int]]]:
    """The rows one decode token adds to, each with its targets: ``(index, experts)`` for every source expert ``a``
    at layer ``l - d`` (``d = 1..max_offset``) or at layer ``l`` of ``previous`` (``d = 0``, when given), row
    ``index = (d * L + l) * E + a`` (`TransitionStatistics.row`), and the token's ``experts`` at ``l``."""
    for layer, experts in enumerate(token):
        if not experts:
            continue
        for offset in range(0 if previous is not None else 1, min(max_offset, layer) + 1):
            base = (offset * num_layers + layer) * num_experts
            for source in previous[layer] if offset == 0 else token[layer - offset]:
                yield base + source, experts


class RequestStatistics:
    """One request's own transition statistics: the shared `TransitionStatistics` as they were when it started,
    scaled to ``prior_tokens`` pseudo-tokens, plus its own decode tokens at full weight (`observe`).

    The request's rows are read lazily: a row (``offset``, ``layer``, source expert) is copied from the shared
    counts, scaled, the first time the request reads it or the shared statistics are about to change it
    (`TransitionStatistics.observe` calls `keep`), whichever comes first. So a request starts in O(L x E) and
    holds only the rows it touched, where a full copy would cost O(max_offset x L x E x E) per request (23 s and
    2.4 GB at DeepSeek-V3's shape; benchmarks/predictor_cost.py), with the same values.

    ``log_row(d, l, a)[b]``: log of the (pseudo-)tokens with ``a`` at layer ``l - d`` (``d >= 1``; ``d = 0``: at
    ``l`` one token earlier) and ``b`` at ``l``; ``log_frequency[l][b]``: log of those using ``b`` at ``l``. So
    ``exp(log_row(d, l, a)[b] - log_frequency[l][b])`` estimates P(a | b).
    """

    def __init__(self, shared: TransitionStatistics, prior_tokens: float) -> None:
        self.shared = shared
        self.num_layers = shared.num_layers
        self.num_experts = shared.num_experts
        self.max_offset = shared.max_offset
        self.prior_tokens = prior_tokens
        self.tokens = 0
        self.scale = prior_tokens / (shared.tokens + shared.prior_tokens)
        scale, log = self.scale, math.log
        self._frequency = [[count * scale for count in row] for row in shared.frequency.tolist()]
        self.log_frequency = [[log(count) for count in row] for row in self._frequency]
        self._rows: dict[int, tuple[list[float], list[float]]] = {}  # row index -> (counts, their logs)
        shared._views.add(self)

    def log_row(self, offset: int, layer: int, source: int) -> list[float]:
        """The logs of row (``offset``, ``layer``, ``source``) over every target expert (read, do not change)."""
        index = (offset * self.num_layers + layer) * self.num_experts + source
        row = self._rows.get(index)
        return (row if row is not None else self._copy(index))[1]

    def keep(self, rows: Iterable[int]) -> None:
        """Copy the shared rows ``rows`` (indices as `TransitionStatistics.row`) not yet copied: they are about
        to change."""
        copied = self._rows
        for index in rows:
            if index not in copied:
                self._copy(index)

    def observe(self, token: Sequence[Sequence[int]], previous: Sequence[Sequence[int]] | None) -> None:
        """Learn from one decode token's expert ids per layer ``token``, after ``previous`` (or None)."""
        self.tokens += 1
        log = math.log
        for layer, experts in enumerate(token):
            frequency, log_frequency = self._frequency[layer], self.log_frequency[layer]
            for expert in experts:
                frequency[expert] += 1.0
                log_frequency[expert] = log(frequency[expert])
        copied = self._rows
        for index, targets in _transition_rows(token, previous, self.max_offset, self.num_layers, self.num_experts):
            counts, logs = copied.get(index) or self._copy(index)
            for target in targets:
                counts[target] += 1.0
                logs[target] = log(counts[target])

    def _copy(self, index: int) -> tuple[list[float], list[float]]:
        log = math.log
        counts = self.shared.row(index, self.scale)
        row = self._rows[index] = (counts, [log(count) for count in counts])
        return row


@dataclass(frozen=True)
class HistorySettings:
    """Settings of the sources from the request's own recent decode tokens: ``"history"`` and ``"recent"``.

    The token match (``"history"``; with store and transitions, 14.8 ms of Python per decode token on h39s on a
    loaded development machine, 5.6 ms without it; 4.4 ms on a quiet Zen 4 machine with its prior votes computed
    once per step, 5.5 before). ``tokens``: how many of the request's last decode tokens are
    matched (bounds the hot path's work: on h39s recall 0.833 at 128, 0.840 at 256, 0.843 at 512, 0.845 at 1024);
    ``neighbours``: how many of them, the most similar, vote (0.832 at 8, 0.840 at 16, 0.839 at 32); ``decay``: a
    layer ``j`` layers behind the frontier counts ``decay ** j`` in the similarity (0.838 at 0.8, 0.840 at 0.9 and
    0.95); ``sharpness``: a neighbour ``x`` less similar than the most similar one votes ``exp(-sharpness * x)``
    (0.837 at 0.5, 0.840 at 1 and 2; votes in proportion to the similarity: 0.832); ``prior``: pseudo-votes of the
    request's own per-layer frequency (0.841 at 0.1, 0.840 at 0.3, 0.837 at 1); ``weight``: the evidence's weight in
    the scores (0.839 at 0.7, 0.840 at 1, 0.841 at 1.5); ``reach``: how many layers ahead of the frontier the
    neighbours predict. All chosen on h39s with the transitions on (recalls above: transitions + history), values
    within ~0.001 of the best taken at round numbers.

    Recent use (``"recent"``): each layer's experts over the request's recent tokens, a token ``t`` tokens back
    counting ``recent_decay ** t`` — the temporal transition of several previous tokens at once, as a frequency — is
    evidence at ``recent_weight`` (with one pseudo-token spread as the request's per-layer frequency). On h39s:
    recall 0.840 without, 0.846 at decay 0.6 and weight 0.5 (0.845 at 0.4 / 0.6 and 0.6 / 0.4, 0.843 at 0.6 / 0.8,
    0.844 at 0.8 / 0.6, 0.841 at 0.8 / 1; all with transitions and history); on h39s cut into 80-token requests
    0.794 -> 0.797. The default policy with free reads, at 4 slots per layer on h39s, hits less with it at the same
    blobs (0.738 at 22,487 blobs with it applied to this step's rows only, threshold 0.6; 0.711 at 22,721 with it on
    every row, threshold 0.7; 0.740 at 22,384 without, threshold 0.7; all before the successor votes below).

    Successors (part of ``"history"``): when a layer has run, its row turns to the next token's visit, and the same
    neighbours but the latest (whose successor is the running token) vote, at ``successor_weight``, for the experts
    their own next tokens used at that layer. Recall (this token's layers ahead) does not change; the default
    policy at 4 slots per layer on h39s, ``successor_weight`` 0.5 against none: free reads 0.741 at 21,711 blobs
    against 0.740 at 22,384 (1.0: 0.738 at 21,871; 1.5: 0.739 at 22,136), nvme 0.719 at 22,200 against 0.716 at
    22,903, disk 0.697 at 21,845 against 0.695 at 22,522 (stall 4,739 s against 4,894); cut into 80-token
    requests, free reads 0.706 at 23,277 against 0.702 at 23,698 (1.0: 0.707 at 23,401). Every row behind the
    frontier voted again after each layer instead of the one row (weight 1): +0.002-0.008 hit rate for ~L rows
    more work per layer, not taken.
    """

    tokens: int = 256
    neighbours: int = 16
    decay: float = 0.9
    sharpness: float = 1.0
    prior: float = 0.3
    weight: float = 1.0
    reach: int = 8
    recent_decay: float = 0.6
    recent_weight: float = 0.5
    successor_weight: float = 0.5


@dataclass
class RequestState:
    """One running request as the predictor sees it (create with `Predictor.new_request`)."""

    statistics: RequestStatistics  # the request's own: the shared statistics as prior, then its tokens
    current: list[tuple[int, ...]]  # expert ids of this step's layers run so far (others empty)
    history: list[list[float]]  # [L][E] decode activation counts of the finished steps
    layers_seen: int = 0
    previous: list[tuple[int, ...]] | None = None  # the last decode step's ids, None after a prefill
    decode: bool = True
    predicting: bool = True  # this step computes predictions (False: `begin_step(predict=False)`, only recorded)
    probabilities: list[list[float]] = field(default_factory=list)  # cached [L][E] answer of `predict`
    store_match: list[list[float]] | None = None  # this step's store prediction [L][E]
    scores: list[list[float]] = field(default_factory=list)  # [L][E] log scores behind ``probabilities``
    store_terms: list[list[float]] | None = None  # [L][E] this step's store log-ratios (weighted)
    recent: deque[list[tuple[int, ...]]] = field(default_factory=deque)  # last decode tokens' ids per layer
    recent_masks: deque[list[int]] = field(default_factory=deque)  # the same as bit masks per layer
    similarity: list[float] = field(default_factory=list)  # this step's token's similarity to each recent one
    history_prior: dict[int, tuple[list[float], float]] = field(default_factory=dict)  # this step's, per layer
    recent_use: list[list[float]] = field(default_factory=list)  # [L][E] decayed use over the recent tokens


class Predictor:
    """Per-layer expert probabilities of running requests from the enabled ``sources`` (module docstring).

    The transition statistics and the store are shared by all requests; `end_step` teaches the statistics (and
    the request's own copy, which it predicts from), `finish` enters the request into the store. Call per
    request: `new_request`, then per step `begin_step`, `observe_layer` for each layer in order (`predict` at any
    point), `end_step`; finally `finish`. A step begun with ``predict=False`` only records its routing (the
    statistics and the history learn from it as from any other) and cannot be asked to `predict`.
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
        request_prior_tokens: float = DEFAULT_REQUEST_PRIOR_TOKENS,
        history_settings: HistorySettings = HistorySettings(),
    ) -> None:
        unknown = set(sources) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown prediction source(s) {sorted(unknown)}; choose from {SOURCES}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.sources = frozenset(sources)
        self.store = store if store is not None else TraceStore(num_layers, num_experts)
        self.transitions = (transitions if transitions is not None
                            else TransitionStatistics(num_layers, num_experts, top_k=top_k))
        self.store_weight = store_weight
        self.evidence_weight = evidence_weight
        self.request_prior_tokens = request_prior_tokens
        self.history_settings = history_settings

    def new_request(self) -> RequestState:
        """Tracking state for a request about to run its first step."""
        return RequestState(statistics=self.transitions.scaled(self.request_prior_tokens),
                            current=[()] * self.num_layers,
                            recent_use=[[0.0] * self.num_experts for _ in range(self.num_layers)],
                            history=[[0.0] * self.num_experts for _ in range(self.num_layers)])

    def begin_step(self, state: RequestState, decode: bool, predict: bool = True) -> None:
        """``state`` starts a step (a decode token, or a prefill whose experts are not one token's); with
        ``predict`` False the step's layers are only recorded, none of the scores is computed."""
        state.decode = decode
        state.layers_seen = 0
        state.predicting = predict
        if not predict:
            return
        state.similarity = [0.0] * len(state.recent)
        state.history_prior = {}
        state.store_match = self._match(state) if "store" in self.sources else None
        state.store_terms = self._store_terms(state.store_match, state.statistics.log_frequency)
        previous = state.previous or [()] * self.num_layers
        state.scores = [self._base_scores(state, layer, previous[layer]) for layer in range(self.num_layers)]
        state.probabilities = [_use_probabilities(scores, self.top_k) for scores in state.scores]

    def observe_layer(self, state: RequestState, layer: int, experts: Sequence[int]) -> None:
        """``state`` ran ``layer`` (the frontier) with ``experts``; the rows this changes are recomputed: the
        ``max_offset`` layers after it gain its evidence, the token match's ``reach`` layers after it take its
        new vote, its own row turns to the next step's visit."""
        if layer != state.layers_seen:
            raise ValueError(f"layer {layer} observed at frontier {state.layers_seen}: layers run in order")
        experts = tuple(experts)
        state.current[layer] = experts
        state.layers_seen = layer + 1
        if not state.predicting:
            return
        state.scores[layer] = self._base_scores(state, layer, experts)
        changed = {layer}
        stats = state.statistics
        if "transitions" in self.sources and experts:
            for target in range(layer + 1, min(self.num_layers, layer + stats.max_offset + 1)):
                rows = [stats.log_row(target - layer, target, expert) for expert in experts]
                state.scores[target] = _with_evidence(state.scores[target], rows, stats.log_frequency[target],
                                                      self.evidence_weight)
                changed.add(target)
        history = self._history_terms(state, layer, experts) if "history" in self.sources else {}
        changed.update(history)
        for row in changed:
            scores = state.scores[row]
            if row in history:
                scores = [score + term for score, term in zip(scores, history[row])]
            state.probabilities[row] = _use_probabilities(scores, self.top_k)

    def end_step(self, state: RequestState) -> None:
        """Close ``state``'s step: a decode step teaches the transition statistics and joins the history."""
        if state.decode:
            self.transitions.observe(state.current, state.previous)
            state.statistics.observe(state.current, state.previous)
            self._remember(state)
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
        `begin_step`. RuntimeError in a step begun with ``predict=False``.
        """
        if not state.predicting:
            raise RuntimeError("predict in a step begun with predict=False")
        return state.probabilities

    def _remember(self, state: RequestState) -> None:
        """Keep the finished decode token among the request's ``history_settings.tokens`` most recent ones, and add it
        to the recent use."""
        state.recent.append(state.current)
        state.recent_masks.append([sum(1 << expert for expert in experts) for experts in state.current])
        if len(state.recent) > self.history_settings.tokens:
            state.recent.popleft()
            state.recent_masks.popleft()
        decay = self.history_settings.recent_decay
        for use, experts in zip(state.recent_use, state.current):
            use[:] = [count * decay for count in use]
            for expert in experts:
                use[expert] += 1.0

    def _history_terms(self, state: RequestState, layer: int, experts: Sequence[int]) -> dict[int, list[float]]:
        """Source ``"history"``: after ``layer`` ran with ``experts``, the log-ratios of the recent tokens most
        like this one for the ``history_settings.reach`` layers ahead, {target layer: [E] weighted terms}.

        Similarity to a recent token (kept in ``state.similarity``, updated here layer by layer): the experts
        it shares with this token at each layer run so far, a layer ``j`` behind the frontier counting ``decay
        ** j``. The ``neighbours`` most similar (ties: the latest) vote for the experts they used at the target,
        each ``exp(-sharpness * x)`` if ``x`` less similar than the most similar one; the votes, with ``prior``
        pseudo-votes spread as the request's per-layer frequency, estimate P(expert used), and ``weight`` times
        its log-ratio over the frequency's is the term. The same neighbours but the latest vote, at
        ``successor_weight``, for the experts their next tokens used at ``layer`` itself: its row is now the next
        token's visit. No terms in a prefill step or before a similar token exists."""
        if not state.decode or not state.recent:
            return {}
        match = self.history_settings
        mask = sum(1 << expert for expert in experts)
        state.similarity = [similarity * match.decay + (masks[layer] & mask).bit_count()
                            for similarity, masks in zip(state.similarity, state.recent_masks)]
        latest_first = range(len(state.similarity) - 1, -1, -1)
        neighbours = [index for index in heapq.nlargest(match.neighbours, latest_first,
                                                        key=state.similarity.__getitem__)
                      if state.similarity[index] > 0]
        if not neighbours:
            return {}
        top = state.similarity[neighbours[0]]
        weights = {index: math.exp(match.sharpness * (state.similarity[index] - top)) for index in neighbours}
        terms = {}
        for target in range(layer + 1, min(self.num_layers, layer + match.reach + 1)):
            terms[target] = self._votes(state, target, neighbours, weights, 0, match.weight)
        latest = len(state.recent) - 1
        with_successor = [index for index in neighbours if index != latest]
        if match.successor_weight and with_successor:
            terms[layer] = self._votes(state, layer, with_successor, weights, 1, match.successor_weight)
        return terms

    def _votes(self, state: RequestState, target: int, voters: Sequence[int], weights: Mapping[int, float],
               ahead: int, weight: float) -> list[float]:
        """``weight`` times the log-ratio over the frequency of the ``voters``' use of layer ``target`` (recent
        token ``index + ahead`` for each voter ``index``), with the ``prior`` pseudo-votes: one row of
        `_history_terms`."""
        log = math.log
        prior_votes, log_rate = self._history_prior(state, target)
        used = list(prior_votes)
        for index in voters:
            for expert in state.recent[index + ahead][target]:
                used[expert] += weights[index]
        votes = sum(weights[index] for index in voters) + self.history_settings.prior
        return [weight * (log(count / votes) - value - log_rate)
                for count, value in zip(used, state.statistics.log_frequency[target])]

    def _history_prior(self, state: RequestState, target: int) -> tuple[list[float], float]:
        """The token match's ``prior`` pseudo-votes at ``target``, spread as the request's per-layer frequency,
        and the log of the rate they are spread at: fixed within a step (the statistics change only in
        `end_step`), so computed once per step and layer."""
        cached = state.history_prior.get(target)
        if cached is None:
            frequency = [math.exp(value) for value in state.statistics.log_frequency[target]]
            rate = self.top_k / sum(frequency)
            cached = state.history_prior[target] = ([self.history_settings.prior * count * rate
                                                     for count in frequency], math.log(rate))
        return cached

    def _base_scores(self, state: RequestState, layer: int, temporal: Sequence[int]) -> list[float]:
        """``layer``'s log scores before this step's evidence: frequency, the temporal transition from the
        ``temporal`` experts (those of ``layer`` one token before its next visit), the store."""
        stats = state.statistics
        scores = list(stats.log_frequency[layer])
        if "transitions" in self.sources and temporal:
            scores = _with_evidence(scores, [stats.log_row(0, layer, expert) for expert in temporal],
                                    stats.log_frequency[layer], self.evidence_weight)
        if "recent" in self.sources:
            scores = _with_recent_use(scores, state.recent_use[layer], stats.log_frequency[layer],
                                      self.history_settings.recent_weight)
        if state.store_terms is not None:
            scores = [score + term for score, term in zip(scores, state.store_terms[layer])]
        return scores

    def _store_terms(self, match: list[list[float]] | None,
                     frequencies: list[list[float]]) -> list[list[float]] | None:
        """``store_weight`` * (log share - log frequency) per layer and expert, or None without a match."""
        if match is None:
            return None
        weight = self.store_weight
        return [[weight * (math.log(max(share, _SHARE_FLOOR)) - frequency)
                 for share, frequency in zip(row, log_row)] for row, log_row in zip(match, frequencies)]

    def _match(self, state: RequestState) -> list[list[float]] | None:
        match = self.store.match(torch.tensor(state.history), 0)
        return match.tolist() if match is not None else None


def _with_evidence(scores: list[float], rows: Sequence[list[float]], log_frequency: list[float],
                   weight: float) -> list[float]:
    """``scores`` plus, for each active source expert's row of log counts in ``rows``, ``weight`` * (log P(b |
    source) - log P(b)) up to a per-row constant (a new list, or ``scores`` itself without rows). One or two
    sources (a decode token at top-2) take a path of their own; more are summed per target in one pass."""
    if not rows:
        return scores
    if len(rows) == 1:
        counts = rows[0]
        return [score + weight * (count - frequency) for score, count, frequency in zip(scores, counts, log_frequency)]
    if len(rows) == 2:
        first, second = rows
        return [score + weight * (one + two - frequency - frequency)
                for score, one, two, frequency in zip(scores, first, second, log_frequency)]
    count = len(rows)
    return [score + weight * (sum(counts) - count * frequency)
            for score, frequency, counts in zip(scores, log_frequency, zip(*rows))]


def _with_recent_use(scores: list[float], use: list[float], log_frequency: list[float],
                     weight: float) -> list[float]:
    """``scores`` plus ``weight`` * (log recent share - log frequency share): the recent ``use`` counts with one
    pseudo-token spread as the frequency (a new list)."""
    frequency = [math.exp(value) for value in log_frequency]
    total = sum(frequency)
    scale = 1.0 / (sum(use) + 1.0)
    log = math.log
    return [score + weight * log((count + share / total) * scale * total / share)
            for score, count, share in zip(scores, use, frequency)]


def _use_probabilities(scores: list[float], top_k: int) -> list[float]:
    """``min(1, top_k * softmax(scores))``."""
    top = max(scores)
    exp = math.exp
    weights = [exp(score - top) for score in scores]
    scale = top_k / sum(weights)
    return [min(1.0, weight * scale) for weight in weights]


def any_request(predictions: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """[L][E] probability that at least one of the running requests uses each key: ``1 - prod(1 - p)``."""
    if len(predictions) == 1:  # the same values, faster
        return [[1.0 - (1.0 - p) for p in row] for row in predictions[0]]
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
