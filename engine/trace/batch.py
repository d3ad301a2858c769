"""The running batch as the predictor sees it: trace-driven priorities and prefetch inside the engine's forward.

`BatchPrefetcher` connects three things the engine already has: the routing the experts forward computes at
every MoE layer (``ExpertsForward.routing_observer``), a `Predictor` per running sequence (the engine's shared
`TransitionStatistics` and `TraceStore`, persisted together in ``trace_store_path``), and the offload cache
with its prefetch queue (`OffloadedExperts`). Per engine step:

- `begin_step(sequences)`: the step's sequences in batch order, with their token counts and whether the step is
  one decode token (chunks of a prompt, and the recompute of a preempted sequence, are not);
- `observe(layer, top_k_index)` — the routing observer — splits the batch's [T, k] routing rows by sequence and
  advances each sequence's predictor to this layer (dense layers in between are observed empty);
- `plan(layer)` — called by the experts forward once the layer's first group of experts is pinned, so nothing it
  computes with can be evicted — hands the decode sequences' predictions to the `PrefetchPlanner` (priorities
  on the cache's policy, prefetches into its queue) and starts the reads the queue allows;
- `end_step()` teaches the transition statistics; a prompt's last PROMPT_TOKENS tokens, each with its own routing
  (the [T, k] rows of every layer, kept by `observe`), teach the request's predictor (`Predictor.observe_prompt`),
  so its first decode tokens are not predicted cold; `forget(sequence)` drops a finished or aborted sequence (its
  trace enters the store through the engine's tracer, not here).

A step with no decode sequence changes neither priorities nor prefetches: prompt chunks route to many experts at
once and their next step is a decode whose first layers the transition statistics cannot see yet.

The plan's horizon and threshold follow `PrefetchSettings.for_read_time`, as in the replay: every ADAPT_EVERY
steps, ``read_layers`` = the reader's busy seconds per blob over the measured compute of a layer (the time from
one layer's plan to the next's, less the time the forward waited on reads in between).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.offload.offloaded import PRECISION, OffloadedExperts
from engine.trace.planner import PrefetchPlanner, PrefetchSettings
from engine.trace.predictor import Predictor, RequestState, TransitionStatistics
from engine.trace.store import TraceStore

logger = logging.getLogger(__name__)

ADAPT_EVERY = 16
"""Steps between two updates of the plan's settings from the measured read and layer times."""


PROMPT_TOKENS = 64
"""How many of a prompt's last tokens teach the request's predictor their routing (`Predictor.observe_prompt`).

More is better and costs in proportion (27 ms per request at 64 at Mixtral-8x7B's shape, 1.2 s at DeepSeek-V3's:
benchmarks/prompt_learning.py). By hand, on h39s (the tuning trace), its first 128 decode steps standing in for the end of
a prompt and the last 16 / 32 / 64 / 128 of them learned, next-layer recall over the rest was 0.844 / 0.845 / 0.850
/ 0.853 (the default policy's sources; none learned: 0.837); cut into 80-step requests with 40 stand-ins each, 8 /
16 / 32 / 40 learned gave 0.783 / 0.788 / 0.799 / 0.806."""


@dataclass(frozen=True)
class StepSequence:
    """One scheduled sequence of a step: its id, its rows in the flattened batch, whether it decodes, and where
    its rows sit in the request (the position of the first, and the prompt's length)."""

    sequence_id: str
    num_tokens: int
    decode: bool
    start_position: int = 0
    prompt_tokens: int = 0

    def learned_prompt_rows(self, learned: int) -> range:
        """The rows (indices into this step's rows) that are among the prompt's last PROMPT_TOKENS tokens and at or
        after position ``learned`` (the prompt's tokens already learned end there: a recompute after preemption
        runs them again)."""
        if self.decode:
            return range(0)
        first = max(self.start_position, self.prompt_tokens - PROMPT_TOKENS, learned)
        end = min(self.start_position + self.num_tokens, self.prompt_tokens)
        return range(first - self.start_position, max(first, end) - self.start_position)


@dataclass
class _Scheduled:
    """A sequence of the running step; ``prompt``: its rows among the prompt tokens to learn (found once per step,
    `StepSequence.learned_prompt_rows`); ``prompt_rows``: their expert ids by MoE layer, as `BatchPrefetcher.observe`
    keeps them."""

    sequence: StepSequence
    state: RequestState
    prompt: range
    prompt_rows: dict[int, list[list[int]]] = field(default_factory=dict)


class BatchPrefetcher:
    """Per-layer predictions of the running sequences driving the offload cache (module docstring)."""

    def __init__(
        self,
        offload: OffloadedExperts,
        top_k: int,
        store: TraceStore,
        transitions: TransitionStatistics,
        settings: PrefetchSettings | None = None,
    ) -> None:
        """``transitions`` (the statistics the predictor learns into and starts from) must look back
        ``settings.max_offset`` layers and cover the cache's layers; ValueError otherwise."""
        self.offload = offload
        self.settings = settings or PrefetchSettings()
        num_layers = offload.num_layers
        if (transitions.num_layers, transitions.max_offset) != (num_layers, self.settings.max_offset):
            raise ValueError(f"transition statistics of {transitions.num_layers} layers and max_offset "
                             f"{transitions.max_offset}, expected {num_layers} and {self.settings.max_offset}")
        self.predictor = Predictor(num_layers, transitions.num_experts, top_k, self.settings.sources, store=store,
                                   transitions=transitions)
        self.planner = PrefetchPlanner(offload.cache, offload.queue, num_layers, self.settings, PRECISION,
                                       layers=offload.store.moe_layers, gate=offload.gate)
        self._states: dict[str, RequestState] = {}
        self._step: list[_Scheduled] = []
        self._prompt_learned: dict[str, int] = {}  # the prompt position up to which each sequence has learned
        self._predicting = True  # this step predicts and plans (the gate has something acting)
        self.prefetches_planned = 0
        self.read_layers: float | None = None  # the last measured read time in layers of compute
        self._steps = 0
        self._layer_seconds = 0.0
        self._layers_timed = 0
        self._last_plan: tuple[int, float, float] | None = None  # (layer, time, stall seconds) of the last plan

    def begin_step(self, sequences: Sequence[StepSequence]) -> None:
        """The step about to run: ``sequences`` in batch order (their rows are consecutive in that order).

        While the offload cache's gate has both prefetch and priorities off, the step's routing is only recorded
        (the statistics and histories still learn) and nothing is predicted or planned."""
        self._step = []
        gate = self.offload.gate
        self._predicting = gate is None or gate.acting
        for sequence in sequences:
            state = self._states.get(sequence.sequence_id)
            if state is None:
                state = self._states[sequence.sequence_id] = self.predictor.new_request()
            self.predictor.begin_step(state, sequence.decode, predict=self._predicting)
            learned = self._prompt_learned.get(sequence.sequence_id, 0)
            self._step.append(_Scheduled(sequence, state, sequence.learned_prompt_rows(learned)))

    def observe(self, layer: int | None, top_k_index: torch.Tensor) -> None:
        """The routing of MoE layer ``layer``, [T, k] over the flattened batch: advance every sequence to it."""
        if layer is None or not self._step:
            return
        rows = top_k_index.tolist()
        begin = 0
        for scheduled in self._step:
            sequence, state, prompt = scheduled.sequence, scheduled.state, scheduled.prompt
            experts = sorted({expert for row in rows[begin:begin + sequence.num_tokens] for expert in row})
            if prompt:
                scheduled.prompt_rows[layer] = rows[begin + prompt.start:begin + prompt.stop]
            begin += sequence.num_tokens
            for dense in range(state.layers_seen, layer):
                self.predictor.observe_layer(state, dense, ())
            self.predictor.observe_layer(state, layer, experts)

    def plan(self, layer: int | None) -> None:
        """Priorities and prefetches after ``layer``'s routing, from the decode sequences' predictions."""
        if layer is None or not self._predicting:
            return
        self._time_layers(layer)
        predictions = [self.predictor.predict(scheduled.state) for scheduled in self._step if scheduled.sequence.decode]
        if predictions:
            self.prefetches_planned += self.planner.plan(predictions, layer + 1, self.offload.position(layer))
            self.offload.pump()

    def end_step(self) -> None:
        """Close the step for every sequence that ran in it (teaches the statistics from decode tokens)."""
        for scheduled in self._step:
            state = scheduled.state
            for dense in range(state.layers_seen, self.predictor.num_layers):
                self.predictor.observe_layer(state, dense, ())
            previous = state.previous
            self.predictor.end_step(state)
            if scheduled.prompt_rows:
                self._learn_prompt(scheduled, previous)
        self._step = []
        self._last_plan = None
        self._steps += 1
        if self._steps % ADAPT_EVERY == 0:
            self._adapt()

    def _learn_prompt(self, scheduled: _Scheduled, previous: list[tuple[int, ...]] | None) -> None:
        """Teach the sequence the prompt tokens of this step whose rows `observe` kept, each token's experts per
        layer (dense layers empty); the token before them, when it was the last one learned, stays their
        previous."""
        sequence_id, by_layer, learned = scheduled.sequence.sequence_id, scheduled.prompt_rows, scheduled.prompt
        num_layers = self.predictor.num_layers
        tokens = [[tuple(sorted(by_layer[layer][row])) if layer in by_layer else () for layer in range(num_layers)]
                  for row in range(len(learned))]
        first_position = scheduled.sequence.start_position + learned.start
        if self._prompt_learned.get(sequence_id) == first_position:
            scheduled.state.previous = previous  # the prompt's previous chunk ended right before this one
        self.predictor.observe_prompt(scheduled.state, tokens)
        self._prompt_learned[sequence_id] = first_position + len(learned)

    def _time_layers(self, layer: int) -> None:
        """Add the compute since the previous plan of this step (stall excluded) to the layer timing."""
        now, stall = time.perf_counter(), self.offload.stats.stall_seconds
        if self._last_plan is not None and layer > self._last_plan[0]:
            last_layer, last_time, last_stall = self._last_plan
            self._layer_seconds += max(0.0, (now - last_time) - (stall - last_stall))
            self._layers_timed += layer - last_layer
        self._last_plan = (layer, now, stall)

    def _adapt(self) -> None:
        """Settings for the measured read time (`PrefetchSettings.for_read_time`), other fields kept."""
        reader = self.offload.reader
        if not reader.reads or not self._layers_timed or self._layer_seconds <= 0:
            return
        self.read_layers = (reader.busy_seconds / reader.reads) / (self._layer_seconds / self._layers_timed)
        tuned = PrefetchSettings.for_read_time(self.read_layers)
        self.settings = self.planner.settings = dataclasses.replace(
            self.settings, horizon=tuned.horizon, min_probability=tuned.min_probability)
        logger.debug("prefetch plan: a read takes %.2f layers; horizon %d, threshold %.2f", self.read_layers,
                     tuned.horizon, tuned.min_probability)

    def forget(self, sequence_id: str) -> None:
        """Drop a sequence that finished or was aborted."""
        self._states.pop(sequence_id, None)
        self._prompt_learned.pop(sequence_id, None)

    def __len__(self) -> int:
        """Sequences tracked."""
        return len(self._states)
