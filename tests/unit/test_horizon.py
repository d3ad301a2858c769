"""engine.trace.horizon: the ranking AUC, and what each estimator can and cannot see on hand-made routing."""

from __future__ import annotations

import pytest

from engine.trace.format import RequestTrace, TraceHeader, TraceStep
from engine.trace.horizon import horizon_figures, ranking_auc


def test_ranking_auc_counts_pairs_and_ties_half() -> None:
    assert ranking_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert ranking_auc([4, 3, 2, 1], [False, False, True, True]) == 0.0
    assert ranking_auc([1, 2, 3, 4], [False, True, False, True]) == 0.75  # 3 of 4 (used, unused) pairs in order
    assert ranking_auc([5, 5, 5], [True, False, False]) == 0.5
    assert ranking_auc([1, 2, 2, 3], [False, True, False, True]) == 0.875  # the tie (2, 2) counts half
    assert ranking_auc([1, 2], [True, True]) is None and ranking_auc([1, 2], [False, False]) is None


def three_cycle(tokens: int = 90, layers: int = 3) -> RequestTrace:
    """Tokens cycle through three routings, {0, 1}, {2, 3}, {4, 5} at every layer: each expert is used equally
    often, and the token after next follows from the current one (period 3)."""
    header = TraceHeader(trace="three-cycle", num_layers=layers, num_experts=6, top_k=2)
    steps = tuple(TraceStep(t, "decode", tuple((2 * (t % 3), 2 * (t % 3) + 1) for _ in range(layers)))
                  for t in range(tokens))
    return RequestTrace(header, steps)


def test_a_periodic_request_is_predictable_tokens_ahead_by_pattern_not_by_frequency() -> None:
    figures = horizon_figures([three_cycle()])
    assert figures.tokens == 87  # tokens 1..87 have two after them
    assert figures.next_visit_used == pytest.approx(1 / 3)
    assert figures.after_next_used == pytest.approx(2 / 4)  # of the 4 experts per layer the next token leaves
    # The token after next uses what the token before the current one used: transitions two tokens apart and
    # the token match see it once learned; the frequency cannot (every expert's count is within one of the others':
    # a tie, or the current token's one more), nor recency, which ranks it the wrong way round.
    assert figures.after_next["transitions"] > 0.95 and figures.after_next["match"] > 0.95
    assert figures.after_next["match_once_next_ran"] > 0.95
    assert figures.after_next["frequency"] == pytest.approx(1 / 3)  # 0, 0.5, 0.5 by the token's phase
    assert figures.after_next["recency"] < 0.05
    assert figures.next_visit["transitions"] > 0.95 and figures.next_visit["match"] > 0.95


def test_no_token_with_two_after_it_is_an_error() -> None:
    with pytest.raises(ValueError, match="nothing to score"):
        horizon_figures([three_cycle(tokens=3)])
