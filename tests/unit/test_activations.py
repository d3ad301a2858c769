"""A request's expert activation matrices (engine.trace.eam.RequestActivations) from recorded rows."""

from __future__ import annotations

import random

import torch

from engine.trace.eam import RequestActivations


def test_matrices_count_each_phases_rows_per_layer_and_expert() -> None:
    """Prompt rows count into the prefill matrix, generated ones into the decode matrix (one count per step, layer
    and routed expert), a recompute counts nothing again; the counts equal a plain loop's."""
    layers, experts, prompt = 3, 6, 4
    rng = random.Random(7)
    activations = RequestActivations(layers, prompt)
    steps = [[rng.sample(range(experts), 2) for _ in range(layers)] for _ in range(prompt + 9)]

    def rows(first: int, count: int) -> dict:
        return {layer: ([steps[p][layer] for p in range(first, first + count)], [[0.5, 0.5]] * count)
                for layer in range(layers)}

    activations.record(0, rows(0, prompt))  # the prompt in one step
    for position in range(prompt, prompt + 9):
        activations.record(position, rows(position, 1))
    activations.record(0, rows(0, prompt + 5))  # a recompute after preemption: nothing new
    expected = {phase: torch.zeros(layers, experts, dtype=torch.int64) for phase in ("prefill", "decode")}
    for position, step in enumerate(steps):
        for layer, ids in enumerate(step):
            for expert in ids:
                expected["prefill" if position < prompt else "decode"][layer, expert] += 1
    for phase, matrix in expected.items():
        assert torch.equal(activations.matrix(phase, experts), matrix), phase
    empty = RequestActivations(layers, prompt)
    assert torch.equal(empty.matrix("decode", experts), torch.zeros(layers, experts, dtype=torch.int64))
