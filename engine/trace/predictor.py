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
request's many tokens would otherwise outweigh its own few. Its prompt's tokens, each with its own routing, teach
it too (`observe_prompt`, after the prompt has run), so its decode does not start cold.

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

The hot path is numpy over float64 arrays, a few calls per layer whatever the expert count: scores and
probabilities are [L, E] arrays, a layer's evidence is one gather of its ``max_offset x top_k`` log rows, the token
match one product of the neighbours' weights with their one-hot routing, the softmax one call over the rows that
changed. The shared tables are tensors with their logs kept beside them, and a request copies only the rows it reads
or that are about to change (`RequestStatistics`, into one growing array), so start-up and memory do not grow with
``E x E`` per request (benchmarks/predictor_cost.py measures all of it per shape). Each request keeps every
layer's scores: `begin_step` computes them all (frequency, temporal evidence, store), `observe_layer` adds the new
layer's evidence to the ``max_offset`` rows after it, replaces the token match's terms of the ``reach`` rows after
it and rebuilds the observed layer's own row for the next step; only those rows go through the softmax again. The
statistics change only in `end_step`, so within a step the incremental scores equal a recomputation.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.offload.cache import PriorityTable
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
_FIRST_ROW_SLOTS = 64
"""Rows a request's own statistics make room for at first (then twice as many each time they are full)."""
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
    ``counts[d, l, a, b] / frequency[l, b]`` estimates P(a | b). One tensor each, not Python lists, and beside
    the counts their logs, each row's computed the first time a request copies it and kept up to date from then
    on (a request's copy of a row is the row's logs plus the log of its scale): at DeepSeek-V3's 61 layers x 256
    experts the tables hold 36 M counts (288 MB, and up to as much again for the logs of the rows requests read;
    benchmarks/predictor_cost.py).

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
        self._set_counts(torch.full((max_offset + 1, num_layers, num_experts, num_experts), self.prior,
                                    dtype=torch.float64))
        self.frequency = torch.full((num_layers, num_experts), smoothing, dtype=torch.float64)
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

    def rows(self, indices: Sequence[int], scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """The counts of rows ``indices``, each ``(d * L + l) * E + a`` (all targets ``b``), as they are now, times
        ``scale``, and their logs (new float64 [len(indices), E] each)."""
        stale = [index for index, valid in zip(indices, self._log_valid[indices].tolist()) if not valid]
        if stale:
            self._log_rows[stale] = np.log(self._rows[stale])
            self._log_valid[stale] = True
        return self._rows[indices] * scale, self._log_rows[indices] + math.log(scale)

    def observe(self, token: Sequence[Sequence[int]], previous: Sequence[Sequence[int]] | None,
                cells: TokenCells | None = None) -> None:
        """Learn from one decode token's expert ids per layer ``token``, after ``previous`` (or None); ``cells``:
        their `TokenCells`, if already built."""
        if cells is None:
            cells = TokenCells(token, previous, self.max_offset, self.num_layers, self.num_experts)
        for view in self._views:
            view.keep(cells.rows)
        self.tokens += 1
        self._rows[cells.cell_rows, cells.targets] += 1.0  # each (row, target) at most once per token
        rows, targets = np.asarray(cells.cell_rows, dtype=np.int64), np.asarray(cells.targets, dtype=np.int64)
        valid = self._log_valid[rows]  # keep the logs computed so far up to date
        rows, targets = rows[valid], targets[valid]
        self._log_rows[rows, targets] = np.log(self._rows[rows, targets])
        self.frequency.numpy()[cells.layers, cells.experts] += 1.0

    def _set_counts(self, counts: torch.Tensor) -> None:
        """Take ``counts`` [max_offset + 1, L, E, E] (float64), their rows' logs to be computed when asked."""
        self.counts = counts
        self._rows = counts.numpy().reshape(-1, self.num_experts)  # the same memory, by row
        self._log_rows = np.empty_like(self._rows)  # [rows, E] their logs, where _log_valid (computed when asked)
        self._log_valid = np.zeros(len(self._rows), dtype=bool)  # [rows] which rows of _log_rows are up to date

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
        self._set_counts(counts.double() + self.prior)
        self.frequency = frequency.double() + self.smoothing
        self.tokens = int(tokens)


class TokenCells:
    """The cells one decode token adds 1 to, as index lists: every row (``offset``, layer ``l``, source ``a``) —
    ``a`` at layer ``l - d`` (``d = 1..max_offset``), or at layer ``l`` of ``previous`` (``d = 0``, when given) —
    and in it every expert the token used at ``l``. ``rows``: the row indices ``(d * L + l) * E + a``
    (`TransitionStatistics.rows`), each once; ``cell_rows`` / ``targets``: one entry per cell (no cell twice);
    ``layers`` / ``experts``: the token's own (layer, expert) pairs, for the frequency."""

    __slots__ = ("rows", "cell_rows", "targets", "layers", "experts")

    def __init__(self, token: Sequence[Sequence[int]], previous: Sequence[Sequence[int]] | None, max_offset: int,
                 num_layers: int, num_experts: int) -> None:
        self.rows: list[int] = []
        self.cell_rows: list[int] = []
        self.targets: list[int] = []
        self.layers: list[int] = []
        self.experts: list[int] = []
        for layer, experts in enumerate(token):
            if not experts:
                continue
            self.layers.extend([layer] * len(experts))
            self.experts.extend(experts)
            for offset in range(0 if previous is not None else 1, min(max_offset, layer) + 1):
                base = (offset * num_layers + layer) * num_experts
                for source in previous[layer] if offset == 0 else token[layer - offset]:
                    self.rows.append(base + source)
                    self.cell_rows.extend([base + source] * len(experts))
                    self.targets.extend(experts)


class RequestStatistics:
    """One request's own transition statistics: the shared `TransitionStatistics` as they were when it started,
    scaled to ``prior_tokens`` pseudo-tokens, plus its own decode tokens at full weight (`observe`).

    The request's rows are read lazily: a row (``offset``, ``layer``, source expert) is copied from the shared
    counts, scaled, the first time the request reads it or the shared statistics are about to change it
    (`TransitionStatistics.observe` calls `keep`), whichever comes first. So a request starts in O(L x E) and
    holds only the rows it touched, where a full copy would cost O(max_offset x L x E x E) per request (23 s and
    2.4 GB at DeepSeek-V3's shape; benchmarks/predictor_cost.py), with the same values. The copies go into one
    [slots, E] array of counts and one of their logs (twice as many slots, in place, each time they are full; no
    view of them leaves this object), so a token's updates and a layer's reads are one numpy call each.

    ``log_row(d, l, a)[b]``: log of the (pseudo-)tokens with ``a`` at layer ``l - d`` (``d >= 1``; ``d = 0``: at
    ``l`` one token earlier) and ``b`` at ``l``; ``log_frequency[l, b]``: log of those using ``b`` at ``l``. So
    ``exp(log_row(d, l, a)[b] - log_frequency[l, b])`` estimates P(a | b).
    """

    def __init__(self, shared: TransitionStatistics, prior_tokens: float) -> None:
        self.shared = shared
        self.num_layers = shared.num_layers
        self.num_experts = shared.num_experts
        self.max_offset = shared.max_offset
        self.prior_tokens = prior_tokens
        self.tokens = 0
        self.scale = prior_tokens / (shared.tokens + shared.prior_tokens)
        self._frequency = shared.frequency.numpy() * self.scale  # [L, E]
        self.log_frequency = np.log(self._frequency)  # [L, E]
        self._slots: dict[int, int] = {}  # row index -> its slot in _counts / _logs
        self._counts = np.empty((_FIRST_ROW_SLOTS, shared.num_experts))  # [slots, E] the rows copied so far
        self._logs = np.empty_like(self._counts)  # [slots, E] their logs
        shared._views.add(self)

    @property
    def copied_rows(self) -> int:
        """How many rows this request has copied from the shared statistics."""
        return len(self._slots)

    def log_row(self, offset: int, layer: int, source: int) -> np.ndarray:
        """The logs of row (``offset``, ``layer``, ``source``) over every target expert, [E] (a copy)."""
        return self.log_rows([(offset * self.num_layers + layer) * self.num_experts + source])[0]

    def log_rows(self, indices: Sequence[int]) -> np.ndarray:
        """The logs of the rows ``indices`` (as `TransitionStatistics.rows`), [len(indices), E] (a copy)."""
        self.keep(indices)
        return self._logs[[self._slots[index] for index in indices]]

    def keep(self, rows: Iterable[int]) -> None:
        """Copy the shared rows ``rows`` (indices as `TransitionStatistics.rows`) not yet copied: they are read, or
        about to change."""
        slots = self._slots
        missing = [index for index in rows if index not in slots]
        if missing:
            self._copy(missing)

    def observe(self, token: Sequence[Sequence[int]], previous: Sequence[Sequence[int]] | None,
                cells: TokenCells | None = None) -> None:
        """Learn from one decode token's expert ids per layer ``token``, after ``previous`` (or None); ``cells``:
        their `TokenCells`, if already built."""
        self.tokens += 1
        if cells is None:
            cells = TokenCells(token, previous, self.max_offset, self.num_layers, self.num_experts)
        self._frequency[cells.layers, cells.experts] += 1.0
        self.log_frequency[cells.layers, cells.experts] = np.log(self._frequency[cells.layers, cells.experts])
        self.keep(cells.rows)
        slots = [self._slots[index] for index in cells.cell_rows]
        self._counts[slots, cells.targets] += 1.0  # each (row, target) at most once per token
        self._logs[slots, cells.targets] = np.log(self._counts[slots, cells.targets])

    def _copy(self, indices: list[int]) -> None:
        """Copy the shared rows ``indices`` (none copied yet, each once), scaled, into new slots."""
        first = len(self._slots)
        end = first + len(indices)
        if end > len(self._counts):  # grow in place (realloc: no copy of large arrays), nothing views them
            size = max(end, 2 * len(self._counts))
            self._counts.resize((size, self.num_experts), refcheck=False)
            self._logs.resize((size, self.num_experts), refcheck=False)
        self._counts[first:end], self._logs[first:end] = self.shared.rows(indices, self.scale)
        self._slots.update(zip(indices, range(first, end)))


@dataclass(frozen=True)
class HistorySettings:
    """Settings of the sources from the request's own recent decode tokens: ``"history"`` and ``"recent"``.

    The token match (``"history"``; in the pure-Python predictor before the numpy hot path, with store and
    transitions, 14.8 ms per decode token on h39s on a loaded development machine, 5.6 ms without it; 4.4 ms on a
    quiet Zen 4 machine with its prior votes computed once per step, 5.5 before). ``tokens``: how many of the
    request's last decode tokens are matched (bounds the hot path's work: on h39s recall 0.833 at 128, 0.840 at
    256, 0.843 at 512, 0.845 at 1024);
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
    history: np.ndarray  # [L, E] decode activation counts of the finished steps
    layers_seen: int = 0
    previous: list[tuple[int, ...]] | None = None  # the last decode step's ids, None after a prefill
    decode: bool = True
    predicting: bool = True  # this step computes predictions (False: `begin_step(predict=False)`, only recorded)
    probabilities: np.ndarray | list = field(default_factory=list)  # cached [L, E] answer of `predict`
    store_match: np.ndarray | None = None  # this step's store prediction [L, E]
    scores: np.ndarray | list = field(default_factory=list)  # [L, E] log scores behind ``probabilities``
    store_terms: np.ndarray | None = None  # [L, E] this step's store log-ratios (weighted)
    recent: deque[list[tuple[int, ...]]] = field(default_factory=deque)  # last decode tokens' ids per layer
    recent_used: np.ndarray | None = None  # [tokens, L, E] bool: the same, one-hot, in a ring (`recent_slots`)
    remembered: int = 0  # decode tokens ever added to ``recent``
    recent_slots: np.ndarray | None = None  # [len(recent)] this step's ring slot of each recent token
    similarity: np.ndarray | None = None  # [len(recent)] this step's token's similarity to each recent one
    history_prior: tuple[np.ndarray, np.ndarray] | None = None  # this step's `Predictor._history_prior`
    recent_use: np.ndarray | None = None  # [L, E] decayed use over the recent tokens


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
        shape = (self.num_layers, self.num_experts)
        return RequestState(statistics=self.transitions.scaled(self.request_prior_tokens),
                            current=[()] * self.num_layers, recent_use=np.zeros(shape), history=np.zeros(shape))

    def begin_step(self, state: RequestState, decode: bool, predict: bool = True) -> None:
        """``state`` starts a step (a decode token, or a prefill whose experts are not one token's); with
        ``predict`` False the step's layers are only recorded, none of the scores is computed."""
        state.decode = decode
        state.layers_seen = 0
        state.predicting = predict
        if not predict:
            return
        count = len(state.recent)
        state.similarity = np.zeros(count)
        state.recent_slots = (state.remembered - count + np.arange(count)) % self.history_settings.tokens
        state.history_prior = None
        state.store_match = self._match(state) if "store" in self.sources else None
        state.store_terms = self._store_terms(state.store_match, state.statistics.log_frequency)
        previous = state.previous or [()] * self.num_layers
        state.scores = np.stack([self._base_scores(state, layer, previous[layer]) for layer in range(self.num_layers)])
        state.probabilities = _use_probabilities(state.scores, self.top_k)

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
        targets = range(layer + 1, min(self.num_layers, layer + stats.max_offset + 1))
        if "transitions" in self.sources and experts and targets:
            num_layers, num_experts = self.num_layers, self.num_experts
            rows = stats.log_rows([((target - layer) * num_layers + target) * num_experts + expert
                                   for target in targets for expert in experts])
            evidence = rows.reshape(len(targets), len(experts), num_experts).sum(axis=1)  # [targets, E]
            frequency = stats.log_frequency[targets.start:targets.stop]
            state.scores[targets.start:targets.stop] += self.evidence_weight * (evidence - len(experts) * frequency)
            changed.update(targets)
        history = self._history_terms(state, layer, experts) if "history" in self.sources else {}
        changed.update(history)
        rows = sorted(changed)
        scores = state.scores[rows]  # [changed, E], a copy
        for index, row in enumerate(rows):
            if row in history:
                scores[index] += history[row]
        state.probabilities[rows] = _use_probabilities(scores, self.top_k)

    def end_step(self, state: RequestState) -> None:
        """Close ``state``'s step: a decode step teaches the transition statistics and joins the history."""
        if state.decode:
            cells = TokenCells(state.current, state.previous, self.transitions.max_offset, self.num_layers,
                               self.num_experts)
            self.transitions.observe(state.current, state.previous, cells)
            self._learn_own(state, state.current, cells)
            state.history[cells.layers, cells.experts] += 1.0
        else:
            state.previous = None
        state.current = [()] * self.num_layers

    def observe_prompt(self, state: RequestState, tokens: Sequence[Sequence[Sequence[int]]]) -> None:
        """Learn from prompt tokens of ``state``'s request, in order: each token's expert ids per layer (all
        layers, ``()`` for dense ones), as the forward computed them while it ran the prompt. Call between steps
        (after the prefill step's `end_step`).

        The request's own statistics learn them as decode tokens, and they join its token match and recent use;
        the last one is the previous token of the next step (the first decode token's temporal evidence). The
        shared statistics do not (they count decode tokens, and a prompt's routing may differ from a
        generation's; by hand, on h39s in 80-token requests, teaching them too changed recall by 0.0003), nor does the store
        (its matrices are the decode ones). Without this a request's decode starts cold: its first tokens are
        predicted from the shared statistics alone (benchmarks/prompt_learning.py)."""
        for token in tokens:
            token = [tuple(experts) for experts in token]
            if len(token) != self.num_layers:
                raise ValueError(f"a prompt token routes {len(token)} layers, expected {self.num_layers}")
            cells = TokenCells(token, state.previous, self.transitions.max_offset, self.num_layers,
                               self.num_experts)
            self._learn_own(state, token, cells)
        state.current = [()] * self.num_layers

    def _learn_own(self, state: RequestState, token: list[tuple[int, ...]], cells: TokenCells) -> None:
        """``state``'s own statistics, token match and recent use learn ``token`` (``cells``: its `TokenCells`),
        which becomes the previous token."""
        state.statistics.observe(token, state.previous, cells)
        state.current = token
        self._remember(state, cells)
        state.previous = token

    def finish(self, state: RequestState) -> None:
        """The request ended: its decode activation matrix enters the store."""
        self.store.add(torch.tensor(state.history))  # a copy

    def predict(self, state: RequestState) -> np.ndarray:
        """Probability of use of every expert at every layer's next visit, float64 [L, E] (module docstring).

        The returned array is the state's cache: read it, do not change it. Empty before the first
        `begin_step`. RuntimeError in a step begun with ``predict=False``.
        """
        if not state.predicting:
            raise RuntimeError("predict in a step begun with predict=False")
        return state.probabilities

    def _remember(self, state: RequestState, cells: TokenCells) -> None:
        """Keep the finished decode token (``cells``: its `TokenCells`) among the request's
        ``history_settings.tokens`` most recent ones, and add it to the recent use."""
        capacity = self.history_settings.tokens
        if state.recent_used is None:
            state.recent_used = np.zeros((capacity, self.num_layers, self.num_experts), dtype=bool)
        used = state.recent_used[state.remembered % capacity]
        used[:] = False
        used[cells.layers, cells.experts] = True
        state.remembered += 1
        state.recent.append(state.current)
        if len(state.recent) > capacity:
            state.recent.popleft()
        state.recent_use *= self.history_settings.recent_decay
        state.recent_use[cells.layers, cells.experts] += 1.0

    def _history_terms(self, state: RequestState, layer: int, experts: Sequence[int]) -> dict[int, np.ndarray]:
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
        shared = state.recent_used[state.recent_slots, layer][:, list(experts)].sum(axis=1)  # [recent]
        state.similarity = state.similarity * match.decay + shared
        similarity = state.similarity
        latest_first = -np.arange(len(similarity))
        order = np.lexsort((latest_first, -similarity))[:match.neighbours]  # most similar first; ties: the latest
        neighbours = order[similarity[order] > 0]
        if not len(neighbours):
            return {}
        weights = np.exp(match.sharpness * (similarity[neighbours] - similarity[neighbours[0]]))
        terms = {}
        targets = range(layer + 1, min(self.num_layers, layer + match.reach + 1))
        if targets:
            votes = self._votes(state, targets, neighbours, weights, 0, match.weight)
            terms.update(zip(targets, votes))
        successors = neighbours != len(state.recent) - 1  # the latest's successor is the running token
        if match.successor_weight and successors.any():
            terms[layer] = self._votes(state, range(layer, layer + 1), neighbours[successors], weights[successors], 1,
                                       match.successor_weight)[0]
        return terms

    def _votes(self, state: RequestState, targets: range, voters: np.ndarray, weights: np.ndarray, ahead: int,
               weight: float) -> np.ndarray:
        """``weight`` times the log-ratio over the frequency of the ``voters``' use (recent token ``index +
        ahead`` for each voter ``index``, voting ``weights``) of the layers ``targets``, with the ``prior``
        pseudo-votes: [len(targets), E] rows of `_history_terms`."""
        if state.history_prior is None:
            state.history_prior = self._history_prior(state)
        prior_votes, base = (values[targets.start:targets.stop] for values in state.history_prior)
        used = state.recent_used[state.recent_slots[voters + ahead], targets.start:targets.stop]  # [voters, T, E]
        cast = (weights @ used.reshape(len(voters), -1)).reshape(len(targets), -1)  # [T, E]
        votes = weights.sum() + self.history_settings.prior
        return weight * (np.log((prior_votes + cast) / votes) - base)

    def _history_prior(self, state: RequestState) -> tuple[np.ndarray, np.ndarray]:
        """The token match's ``prior`` pseudo-votes [L, E], spread as the request's per-layer frequency at the rate
        ``top_k / sum(frequency)``, and the log of the frequency at that rate [L, E], which a vote's log-ratio is
        over: fixed within a step (the statistics change only in `end_step`), so computed once per step."""
        log_frequency = state.statistics.log_frequency
        frequency = np.exp(log_frequency)  # [L, E]
        rate = self.top_k / frequency.sum(axis=1, keepdims=True)  # [L, 1]
        return self.history_settings.prior * frequency * rate, log_frequency + np.log(rate)

    def _base_scores(self, state: RequestState, layer: int, temporal: Sequence[int]) -> np.ndarray:
        """``layer``'s log scores [E] before this step's evidence: frequency, the temporal transition from the
        ``temporal`` experts (those of ``layer`` one token before its next visit), the request's recent use
        (source ``"recent"``), the store."""
        stats = state.statistics
        frequency = stats.log_frequency[layer]
        if "transitions" in self.sources and temporal:
            rows = stats.log_rows([layer * self.num_experts + expert for expert in temporal])  # offset-0 rows
            scores = frequency + self.evidence_weight * (rows.sum(axis=0) - len(temporal) * frequency)
        else:
            scores = frequency.copy()
        if "recent" in self.sources:
            scores = _with_recent_use(scores, state.recent_use[layer], frequency, self.history_settings.recent_weight)
        if state.store_terms is not None:
            scores += state.store_terms[layer]
        return scores

    def _store_terms(self, match: np.ndarray | None, frequencies: np.ndarray) -> np.ndarray | None:
        """``store_weight`` * (log share - log frequency) [L, E], or None without a match."""
        if match is None:
            return None
        return self.store_weight * (np.log(np.maximum(match, _SHARE_FLOOR)) - frequencies)

    def _match(self, state: RequestState) -> np.ndarray | None:
        match = self.store.match(torch.from_numpy(state.history), 0)
        return match.numpy() if match is not None else None


def _with_recent_use(scores: np.ndarray, use: np.ndarray, log_frequency: np.ndarray, weight: float) -> np.ndarray:
    """``scores`` [..., E] plus ``weight`` * (log recent share - log frequency share): the recent ``use`` counts with
    one pseudo-token spread as the frequency (a new array)."""
    frequency = np.exp(log_frequency)
    total = frequency.sum(axis=-1, keepdims=True)
    scale = 1.0 / (use.sum(axis=-1, keepdims=True) + 1.0)
    return scores + weight * np.log((use + frequency / total) * scale * total / frequency)


def _use_probabilities(scores: np.ndarray, top_k: int) -> np.ndarray:
    """``min(1, top_k * softmax(scores))`` over the last axis ([E] or [rows, E])."""
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return np.minimum(1.0, weights * (top_k / weights.sum(axis=-1, keepdims=True)))


def any_request(predictions: Sequence[np.ndarray | Sequence[Sequence[float]]]) -> np.ndarray:
    """[L, E] probability that at least one of the running requests uses each key: ``1 - prod(1 - p)`` (an empty
    array for no request)."""
    if not predictions:
        return np.zeros((0, 0))
    unused = 1.0 - np.asarray(predictions[0], dtype=np.float64)
    for prediction in predictions[1:]:
        unused *= 1.0 - np.asarray(prediction, dtype=np.float64)
    return 1.0 - unused


def batch_priorities(
    next_visit: np.ndarray | Sequence[Sequence[float]], layers_seen: int,
    miss_steps: float | np.ndarray = DEFAULT_MISS_STEPS, precision: str = "native",
) -> PriorityTable:
    """One keep-priority per ``(layer, expert, precision)`` key for the batch: ``1 / (1 + expected distance)``.

    ``next_visit`` [L, E]: probability that some running request uses the key at its layer's next visit
    (`any_request` of the `Predictor.predict` answers). The expected distance in layers to the key's next use —
    Belady's eviction criterion, made online — is ``distance + (1 - p) * miss_steps * L``: ``distance`` from the
    frontier ``layers_seen`` to the layer's next visit (0 = the next layer to run), and, if the key is not used
    then, ``miss_steps`` more steps (one number for every key, or an [L, E] array of each key's: the replay's
    oracles that know visits beyond the next). An empty batch gives an empty table (the policy's own rule decides
    alone).
    """
    next_visit = np.asarray(next_visit, dtype=np.float64)
    if not next_visit.size:
        return PriorityTable(np.zeros((0, 0)), precision)
    num_layers = next_visit.shape[0]
    distance = ((np.arange(num_layers) - layers_seen) % num_layers)[:, None]  # [L, 1]
    return PriorityTable(1.0 / (1.0 + (distance + (1.0 - next_visit) * miss_steps * num_layers)), precision)
