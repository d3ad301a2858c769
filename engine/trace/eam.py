"""Request-level activation traces: which experts each layer used for each request, prefill and decode apart.

The registered experts forward already computes every MoE layer's routing; ``StepRouting`` keeps a reference to
it (``observe(layer, top_k_index, top_k_weights)``, no extra forward, no copy). After the step,
``ActivationTracer.record_step`` splits the flattened batch's rows by request (rows are in batch order, each
scheduled request contributing its ``num_tokens`` rows) and adds them to each request's ``RequestActivations``:

- rows at prompt positions count into the prefill matrix (chunks of a chunked prefill merge into one);
- a row at a generated position is one decode step (its experts and gate weights per layer);
- rows at positions already traced — the recompute of a preempted request — are skipped, as are prompt positions
  served from the prefix cache, which no forward computes.

``RequestActivations.matrix(phase)`` is MoE-Infinity's expert activation matrix ([layers, experts] counts);
``to_trace`` renders the request in the routing-trace format (engine.trace.format: one merged prefill line with
counts, then decode lines; ``[]`` for dense layers). With ``trace_dump_dir`` set, every finished request is
written there as ``<request id>.jsonl``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.trace.format import Phase, RequestTrace, TraceHeader, TraceStep, write_traces

logger = logging.getLogger(__name__)

_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._#-]")


class StepRouting:
    """The routing of one forward, per MoE layer: [T, k] expert ids and gate weights of the flattened batch."""

    def __init__(self) -> None:
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(self, layer: int | None, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """Called by the experts forward for every MoE layer it runs."""
        if layer is not None:
            self._layers[layer] = (top_k_index, top_k_weights)

    def take(self) -> dict[int, tuple[list[list[int]], list[list[float]]]]:
        """This step's routing as Python lists, {layer: (ids [T][k], weights [T][k])}; clears it for the next."""
        if not self._layers:
            return {}
        order = list(self._layers)
        # One stack and one host copy per step for all layers (not two per layer): the step's layers share [T, k].
        ids = torch.stack([self._layers[layer][0] for layer in order]).tolist()
        weights = torch.stack([self._layers[layer][1] for layer in order]).float().tolist()
        self._layers.clear()
        return {layer: (ids[i], weights[i]) for i, layer in enumerate(order)}


@dataclass
class RequestActivations:
    """One request's trace so far. ``traced_positions``: positions 0.. whose routing was recorded or skipped."""

    num_layers: int
    num_prompt_tokens: int
    traced_positions: int = 0
    prefill_counts: list[Counter[int]] = field(default_factory=list)
    decode_steps: list[tuple[list[list[int]], list[list[float]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prefill_counts = [Counter() for _ in range(self.num_layers)]

    def record(self, first_position: int, rows: dict[int, tuple[list[list[int]], list[list[float]]]]) -> None:
        """Add this request's rows of a step (``rows[layer]`` = its ids and weights, one row per position from
        ``first_position``); positions below ``traced_positions`` are a recompute and are skipped."""
        num_rows = len(next(iter(rows.values()))[0]) if rows else 0
        for row in range(max(0, self.traced_positions - first_position), num_rows):
            position = first_position + row
            if position < self.num_prompt_tokens:
                for layer, (ids, _) in rows.items():
                    self.prefill_counts[layer].update(ids[row])
            else:
                experts = [[] for _ in range(self.num_layers)]
                weights = [[] for _ in range(self.num_layers)]
                for layer, (ids, gate_weights) in rows.items():
                    experts[layer], weights[layer] = ids[row], gate_weights[row]
                self.decode_steps.append((experts, weights))
        self.traced_positions = max(self.traced_positions, first_position + num_rows)

    def matrix(self, phase: Phase, num_experts: int) -> torch.Tensor:
        """The expert activation matrix of ``phase``: [num_layers, num_experts] int64 counts."""
        if phase == "prefill":
            counts = torch.zeros(self.num_layers, num_experts, dtype=torch.int64)
            for layer, counter in enumerate(self.prefill_counts):
                for expert, count in counter.items():
                    counts[layer, expert] = count
            return counts
        # One count of all the decode steps' (layer, expert) cells, not a tensor op per step and layer (1,000 steps
        # of 32 layers took 0.42 s that way, 9 ms so, at the request's end, in the engine's loop).
        cells = [layer * num_experts + expert for experts, _ in self.decode_steps
                 for layer, ids in enumerate(experts) for expert in ids]
        return torch.bincount(torch.tensor(cells, dtype=torch.int64),
                              minlength=self.num_layers * num_experts).view(self.num_layers, num_experts)

    def to_trace(self, header: TraceHeader) -> RequestTrace:
        """The request in the routing-trace format: a merged prefill line (if any prompt token ran), decode lines."""
        steps = []
        if any(self.prefill_counts):
            ordered = [sorted(counter) for counter in self.prefill_counts]
            counts = [[counter[e] for e in ids] for counter, ids in zip(self.prefill_counts, ordered)]
            steps.append(TraceStep(0, "prefill", _tuples(ordered), counts=_tuples(counts)))
        for experts, weights in self.decode_steps:
            steps.append(TraceStep(len(steps), "decode", _tuples(experts), weights=_tuples(weights)))
        return RequestTrace(header, tuple(steps))


def _tuples(rows: Sequence[Sequence]) -> tuple[tuple, ...]:
    return tuple(tuple(row) for row in rows)


@dataclass(frozen=True)
class TracedRequest:
    """What the tracer needs of one scheduled request: its id, prompt length, first position and row count."""

    request_id: str
    num_prompt_tokens: int
    first_position: int
    num_tokens: int


class ActivationTracer:
    """The activation traces of the engine's unfinished requests, and the dump of finished ones."""

    def __init__(self, header: TraceHeader, dump_dir: Path | None = None) -> None:
        self.header = header
        self.dump_dir = dump_dir
        self.routing = StepRouting()
        self._requests: dict[str, RequestActivations] = {}
        if dump_dir is not None:
            dump_dir.mkdir(parents=True, exist_ok=True)

    def get(self, request_id: str) -> RequestActivations | None:
        return self._requests.get(request_id)

    def record_step(self, scheduled: Sequence[TracedRequest]) -> None:
        """Distribute the step's routing (rows in batch order) to the scheduled requests."""
        layers = self.routing.take()
        row = 0
        for item in scheduled:
            activations = self._requests.get(item.request_id)
            if activations is None:
                activations = self._requests[item.request_id] = RequestActivations(
                    self.header.num_layers, item.num_prompt_tokens)
            rows = {layer: (ids[row : row + item.num_tokens], weights[row : row + item.num_tokens])
                    for layer, (ids, weights) in layers.items()}
            activations.record(item.first_position, rows)
            row += item.num_tokens

    def finish(self, request_id: str, dump: bool = True) -> RequestActivations | None:
        """Forget a finished (or aborted) request; with ``dump`` and a dump directory, write its trace first."""
        activations = self._requests.pop(request_id, None)
        if activations is not None and dump and self.dump_dir is not None:
            path = self.dump_dir / f"{_UNSAFE_FILENAME.sub('_', request_id)}.jsonl"
            header = TraceHeader(**{**vars(self.header), "trace": request_id})
            write_traces(path, [activations.to_trace(header)])
            logger.debug("wrote the trace of %s to %s", request_id, path)
        return activations
