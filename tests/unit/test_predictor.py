"""The predictor's sources on hand-made routings, and the batch-aware priorities."""

from __future__ import annotations

import functools
import math
import random
from collections import deque

import numpy as np
import pytest
import torch

from engine.trace.predictor import HistorySettings, Predictor, TransitionStatistics, any_request, batch_priorities
from engine.trace.store import TraceStore

LAYERS, EXPERTS = 4, 8


def run_token(predictor: Predictor, state, token: list[list[int]]) -> None:
    predictor.begin_step(state, decode=True)
    for layer, experts in enumerate(token):
        predictor.observe_layer(state, layer, experts)
    predictor.end_step(state)


def chain(start: int) -> list[list[int]]:
    """Expert e at layer l is followed by e + 1 at layer l + 1 (mod 8)."""
    return [[(start + layer) % EXPERTS] for layer in range(LAYERS)]


def top(row: list[float], count: int = 1) -> list[int]:
    return sorted(range(len(row)), key=lambda expert: -row[expert])[:count]


def test_transition_statistics_learn_a_layer_chain_that_frequency_cannot_see() -> None:
    with_transitions = Predictor(LAYERS, EXPERTS, top_k=1, sources=["transitions"])
    frequency_only = Predictor(LAYERS, EXPERTS, top_k=1, sources=[])
    for predictor in (with_transitions, frequency_only):
        state = predictor.new_request()
        for start in range(EXPERTS * 8):
            run_token(predictor, state, chain(start))
    for predictor, expected in ((with_transitions, [5]), (frequency_only, None)):
        state = predictor.new_request()
        predictor.begin_step(state, decode=True)
        predictor.observe_layer(state, 0, [4])
        row = predictor.predict(state)[1].tolist()
        if expected is None:  # every expert equally frequent at layer 1: no preference
            assert max(row) == pytest.approx(min(row))
        else:
            assert top(row) == expected and row[5] > 2.5 * max(row[:5] + row[6:])


def test_the_temporal_transition_predicts_next_steps_layers_from_this_token() -> None:
    predictor = Predictor(LAYERS, EXPERTS, top_k=1, sources=["transitions"],
                          transitions=TransitionStatistics(LAYERS, EXPERTS, max_offset=0))
    state = predictor.new_request()
    for token in range(24):  # layer 0 alternates between experts 1 and 6 from token to token
        run_token(predictor, state, [[1 if token % 2 else 6], [0], [0], [0]])
    state = predictor.new_request()
    predictor.begin_step(state, decode=True)
    predictor.observe_layer(state, 0, [6])
    assert top(predictor.predict(state)[0]) == [1]  # layer 0's next visit is the next token's


def test_evidence_reaches_max_offset_layers_ahead() -> None:
    # Layer 0 alternates between experts 1 and 6, layers 1..8 always use 0 except layer 8, which copies layer 0.
    layers = 9
    predictor = Predictor(layers, EXPERTS, top_k=1, sources=["transitions"],
                          transitions=TransitionStatistics(layers, EXPERTS, max_offset=8, top_k=1))
    state = predictor.new_request()
    for token in range(40):
        first = 1 if token % 2 else 6
        run_token(predictor, state, [[first]] + [[0]] * (layers - 2) + [[first]])
    for first in (1, 6):
        state = predictor.new_request()
        predictor.begin_step(state, decode=True)
        predictor.observe_layer(state, 0, [first])
        assert top(predictor.predict(state)[8]) == [first]


def test_incremental_rows_equal_the_naive_bayes_formula() -> None:
    layers, weight = 6, 0.5
    stats = TransitionStatistics(layers, EXPERTS, max_offset=3, top_k=2)
    predictor = Predictor(layers, EXPERTS, top_k=2, sources=["transitions"], transitions=stats, evidence_weight=weight)
    state = predictor.new_request()
    tokens = [[[(3 * token + layer) % EXPERTS, (5 * token + 2 * layer + 1) % EXPERTS] for layer in range(layers)]
              for token in range(30)]
    for token in tokens[:-1]:
        run_token(predictor, state, token)
    current, previous = tokens[-1], tokens[-2]
    stats = state.statistics  # the request's own: its 29 tokens on the empty shared prior
    assert stats.tokens == 29
    predictor.begin_step(state, decode=True)
    for seen in range(layers):
        predictor.observe_layer(state, seen, current[seen])
        for layer, row in enumerate(predictor.predict(state)):
            if layer <= seen:  # the next step's visit: only this token's experts at the layer speak
                evidence = [(0, current[layer])]
            else:  # this step's: the previous token at the layer, and the layers run up to 3 before it
                evidence = [(0, previous[layer])] + [(layer - source, current[source])
                                                     for source in range(max(0, layer - 3), seen + 1)]
            scores = [stats.log_frequency[layer][b] + weight * sum(
                stats.log_row(offset, layer, a)[b] - stats.log_frequency[layer][b]
                for offset, experts in evidence for a in experts) for b in range(EXPERTS)]
            total = sum(math.exp(score) for score in scores)
            assert row == pytest.approx([min(1.0, 2 * math.exp(score) / total) for score in scores], abs=1e-12)


def test_the_smoothing_prior_starts_at_the_average_rate_and_yields_to_the_counts() -> None:
    stats = TransitionStatistics(2, 4, max_offset=1, smoothing=4.0, top_k=1)
    share = float(stats.counts[1, 1, 0, 2] / stats.frequency[1, 2])
    assert share == pytest.approx(1 / 4), "no data: P(a | b) is the average rate top_k / num_experts"
    for _ in range(400):
        stats.observe([[0], [2]], None)
    share = float(stats.counts[1, 1, 0, 2] / stats.frequency[1, 2])
    assert share == pytest.approx((400 + 1) / (400 + 4)), "400 tokens of 0 -> 2 outweigh the 4-token prior"
    with pytest.raises(ValueError):
        TransitionStatistics(2, 4, top_k=5)


def test_the_store_alone_predicts_a_request_like_a_stored_one() -> None:
    store = TraceStore(LAYERS, EXPERTS)
    store.add(torch.tensor([[5.0 if e == 2 else 0.0 for e in range(EXPERTS)]] * LAYERS))
    store.add(torch.tensor([[5.0 if e == 7 else 0.0 for e in range(EXPERTS)]] * LAYERS))
    predictor = Predictor(LAYERS, EXPERTS, top_k=1, sources=["store"], store=store)
    state = predictor.new_request()
    run_token(predictor, state, [[7]] * LAYERS)
    predictor.begin_step(state, decode=True)
    assert [top(row) for row in predictor.predict(state)] == [[7]] * LAYERS
    assert Predictor(LAYERS, EXPERTS, 1, sources=["store"]).predict(predictor.new_request()) == []


def test_finished_requests_enter_the_store() -> None:
    predictor = Predictor(LAYERS, EXPERTS, top_k=1)
    for start in (0, 4):
        state = predictor.new_request()
        run_token(predictor, state, chain(start))
        predictor.finish(state)
    assert len(predictor.store) == 2


def test_contract_errors() -> None:
    with pytest.raises(ValueError, match="unknown prediction source"):
        Predictor(LAYERS, EXPERTS, 1, sources=["gate"])
    predictor = Predictor(LAYERS, EXPERTS, 1)
    state = predictor.new_request()
    predictor.begin_step(state, decode=True)
    with pytest.raises(ValueError, match="layers run in order"):
        predictor.observe_layer(state, 2, [0])


def test_any_request_combines_the_batch() -> None:
    first = [[0.5, 0.0], [1.0, 0.2]]
    second = [[0.5, 0.1], [0.0, 0.5]]
    combined = any_request([first, second])
    assert [value for row in combined for value in row] == pytest.approx([0.75, 0.1, 1.0, 0.6])
    assert any_request([]).size == 0


def test_priorities_order_by_probability_then_by_how_soon_the_layer_comes() -> None:
    probabilities = [[0.9, 0.2], [0.9, 0.2], [0.9, 0.2]]
    priorities = batch_priorities(probabilities, layers_seen=1)
    assert set(priorities) == {(layer, expert, "native") for layer in range(3) for expert in range(2)}
    # Layer 1 runs next, then 2, then 0 (next step): the same probability ranks sooner first.
    assert priorities[(1, 0, "native")] > priorities[(2, 0, "native")] > priorities[(0, 0, "native")]
    assert priorities[(1, 0, "native")] > priorities[(1, 1, "native")]
    assert batch_priorities([], 0) == {}


def test_a_request_starts_from_the_shared_statistics_and_its_own_tokens_soon_dominate() -> None:
    predictor = Predictor(LAYERS, EXPERTS, top_k=1, sources=["transitions"])
    taught = predictor.new_request()
    for start in range(EXPERTS * 40):  # 320 tokens of the chain e -> e + 1
        run_token(predictor, taught, chain(start))
    newcomer = predictor.new_request()
    predictor.begin_step(newcomer, decode=True)
    predictor.observe_layer(newcomer, 0, [4])
    assert top(predictor.predict(newcomer)[1]) == [5], "a new request predicts what past requests taught"
    predictor.end_step(newcomer)
    for start in range(EXPERTS * 2):  # 16 tokens of its own, of another kind: e -> e + 3
        run_token(predictor, newcomer, [[(start + 3 * layer) % EXPERTS] for layer in range(LAYERS)])
    predictor.begin_step(newcomer, decode=True)
    predictor.observe_layer(newcomer, 0, [4])
    assert top(predictor.predict(newcomer)[1]) == [7], "17 own tokens outweigh 337 shared ones"
    assert predictor.transitions.tokens == 337 and newcomer.statistics.tokens == 17
    later = predictor.new_request()
    predictor.begin_step(later, decode=True)
    predictor.observe_layer(later, 0, [4])
    assert top(predictor.predict(later)[1]) == [5], "the shared statistics learned both; the chain is most of it"


def test_scaled_counts_are_a_prior_of_the_given_weight() -> None:
    stats = TransitionStatistics(2, 4, max_offset=1, smoothing=4.0, top_k=1)
    for _ in range(36):
        stats.observe([[0], [2]], None)
    own = stats.scaled(8.0)
    assert (own.tokens, own.prior_tokens) == (0, 8.0)
    assert math.exp(own.log_frequency[1][2]) == pytest.approx((36 + 4) * 8 / 40)
    assert math.exp(own.log_row(1, 1, 0)[2] - own.log_frequency[1][2]) == pytest.approx(
        float(stats.counts[1, 1, 0, 2] / stats.frequency[1, 2])), "the same estimates, less weight"
    own.observe([[1], [2]], None)
    assert own.tokens == 1 and stats.tokens == 36, "a request's own counts leave the shared ones alone"


def test_a_request_reads_the_shared_rows_as_they_were_when_it_started_and_copies_only_those_it_needs() -> None:
    stats = TransitionStatistics(3, 4, max_offset=2, top_k=2)
    rng = random.Random(5)
    tokens = [[sorted(rng.sample(range(4), 2)) for _ in range(3)] for _ in range(40)]
    for previous, token in zip(tokens[:9], tokens[1:10]):
        stats.observe(token, previous)
    early, spare = stats.scaled(8.0), stats.scaled(8.0)
    assert not early.copied_rows, "nothing is copied when a request starts"
    expected = {(d, l, a): np.log(stats.counts[d, l, a].numpy() * early.scale)
                for d in range(3) for l in range(3) for a in range(4)}
    same = functools.partial(np.allclose, rtol=1e-12, atol=0.0)
    assert same(early.log_row(1, 2, 3), expected[1, 2, 3]) and early.copied_rows == 1, "a read copies one row"
    for previous, token in zip(tokens[9:-1], tokens[10:]):  # other requests teach the shared statistics
        stats.observe(token, previous)
    assert 1 < early.copied_rows < 3 * 3 * 4, "the rows the shared statistics changed were copied first"
    assert all(same(early.log_row(*key), row) for key, row in expected.items()), "every row as it was at the start"
    assert not same(stats.scaled(8.0).log_row(1, 2, 3), expected[1, 2, 3]), "a later request reads them as they are now"
    del spare
    assert set(stats._views) == {early}, "requests that are gone (spare, the later one) are no longer kept up to date"


@pytest.mark.parametrize("window", [256, 8])  # 8: the 30 tokens wrap the window's ring of recent tokens
def test_the_neighbours_next_tokens_predict_the_next_visit_of_the_layer_just_run(window: int) -> None:
    """Tokens cycle through three routings; once layer 0 of a token has run, its row is the next token's visit,
    which the tokens like this one were followed by: with successor votes that routing's expert leads the row."""
    def token(t: int) -> list[list[int]]:
        return [[(3 * (t % 3) + layer) % EXPERTS] for layer in range(LAYERS)]

    rows = {}
    for weight in (0.0, 0.5):
        predictor = Predictor(LAYERS, EXPERTS, top_k=1, sources=["history"],
                              history_settings=HistorySettings(tokens=window, successor_weight=weight))
        state = predictor.new_request()
        for t in range(30):
            run_token(predictor, state, token(t))
        predictor.begin_step(state, decode=True)  # token 30 routes as token 0, token 31 will as token 1
        predictor.observe_layer(state, 0, token(30)[0])
        rows[weight] = predictor.predict(state)[0]
    successor = token(31)[0][0]
    assert top(rows[0.5]) == [successor] and rows[0.5][successor] > (0.7 if window == 256 else 0.55)  # 2 voters
    assert rows[0.0][successor] < 0.5, "without them the row is the layer's frequency: three experts alike"


def xor_token(first: int, second: int) -> list[list[int]]:
    """Layers 0 and 1 use expert 0 or 1; layer 2 uses 2 + (first xor second), layer 3 expert 4."""
    return [[first], [second], [2 + (first ^ second)], [4]]


def test_the_token_match_finds_a_pattern_of_several_layers_that_pairwise_transitions_cannot() -> None:
    rng = random.Random(0)
    combinations = [(0, 0), (0, 1), (1, 0), (1, 1)]
    tokens = [xor_token(*pair) for _ in range(16) for pair in rng.sample(combinations, 4)]  # 16 of each
    predictors = {sources: Predictor(LAYERS, EXPERTS, top_k=1, sources=sources)
                  for sources in (("transitions",), ("transitions", "history"))}
    for sources, predictor in predictors.items():
        state = predictor.new_request()
        for token in tokens:
            run_token(predictor, state, token)
        for first, second in combinations:
            predictor.begin_step(state, decode=True)
            predictor.observe_layer(state, 0, [first])
            predictor.observe_layer(state, 1, [second])
            row = predictor.predict(state)[2]
            if "history" in sources:
                assert row[2 + (first ^ second)] > 0.9
            else:  # each of layers 0 and 1 alone says little about layer 2
                assert row[2 + (first ^ second)] < 0.75
            predictor.observe_layer(state, 2, xor_token(first, second)[2])
            predictor.observe_layer(state, 3, [4])
            predictor.end_step(state)


def test_the_token_match_matches_only_the_requests_last_tokens() -> None:
    predictor = Predictor(LAYERS, EXPERTS, top_k=1, sources=["history"], history_settings=HistorySettings(tokens=8))
    state = predictor.new_request()
    for _ in range(8):
        run_token(predictor, state, [[0], [1], [2], [3]])
    for _ in range(8):  # the same layer 0, another continuation: the first 8 tokens drop out of the window
        run_token(predictor, state, [[0], [5], [6], [7]])
    assert len(state.recent) == 8
    predictor.begin_step(state, decode=True)
    predictor.observe_layer(state, 0, [0])
    assert [top(row) for row in predictor.predict(state)[1:]] == [[5], [6], [7]]
    other = predictor.new_request()  # another request matches its own tokens, none yet
    predictor.begin_step(other, decode=True)
    predictor.observe_layer(other, 0, [0])
    assert other.recent == deque() and max(predictor.predict(other)[3]) < 0.5


def test_recent_use_follows_a_request_that_changed_its_experts() -> None:
    rows = {}
    for sources in ((), ("recent",)):
        predictor = Predictor(LAYERS, EXPERTS, top_k=1, sources=sources)
        state = predictor.new_request()
        for token in range(56):  # layer 0 used expert 1 for 50 tokens, then expert 3 for 6
            run_token(predictor, state, [[1 if token < 50 else 3], [0], [0], [0]])
        predictor.begin_step(state, decode=True)
        rows[sources] = predictor.predict(state)[0]  # nothing of this token seen: no token match, recent use only
    frequency, recent = rows[()], rows[("recent",)]
    assert recent[3] > 3 * frequency[3] and recent[1] < frequency[1]
    assert top(frequency, 2) == [1, 3] and recent[3] > 0.3


def test_a_step_that_only_records_teaches_what_a_predicting_step_does() -> None:
    rng = random.Random(3)
    tokens = [[[rng.randrange(EXPERTS)] for _ in range(LAYERS)] for _ in range(24)]
    full, light = (Predictor(LAYERS, EXPERTS, top_k=1) for _ in range(2))
    full_state, light_state = full.new_request(), light.new_request()
    for number, token in enumerate(tokens):
        predict = number % 3 == 0  # every third step predicts in both; the others only record in ``light``
        for predictor, state, records in ((full, full_state, False), (light, light_state, not predict)):
            predictor.begin_step(state, decode=True, predict=not records)
            for layer, experts in enumerate(token):
                predictor.observe_layer(state, layer, experts)
            if records:
                with pytest.raises(RuntimeError, match="predict=False"):
                    predictor.predict(state)
            predictor.end_step(state)
    assert torch.equal(light.transitions.counts, full.transitions.counts)
    assert np.array_equal(light_state.history, full_state.history) and light_state.recent == full_state.recent
    for predictor, state in ((full, full_state), (light, light_state)):  # a predicting step after: the same answer
        predictor.begin_step(state, decode=True)
        predictor.observe_layer(state, 0, tokens[0][0])
    assert np.array_equal(light.predict(light_state), full.predict(full_state))
    with pytest.raises(ValueError, match="in order"):
        light.begin_step(light_state, decode=True, predict=False)
        light.observe_layer(light_state, 1, [0])


def test_a_prompt_teaches_the_request_what_decode_tokens_would_and_leaves_the_shared_statistics_alone() -> None:
    """`observe_prompt` after a prefill step: the request's own statistics, token match and recent use hold the
    prompt's tokens as if they had been decoded, its last token is the next step's previous one; the shared
    statistics and the store's matrix (the request's decode history) do not count them."""
    rng = random.Random(11)
    tokens = [[sorted(rng.sample(range(EXPERTS), 2)) for _ in range(LAYERS)] for _ in range(12)]
    prompted, decoded = (Predictor(LAYERS, EXPERTS, top_k=2) for _ in range(2))
    prompt_state, decode_state = prompted.new_request(), decoded.new_request()
    prompted.begin_step(prompt_state, decode=False)  # the prefill step: the union of the prompt's experts
    for layer in range(LAYERS):
        prompted.observe_layer(prompt_state, layer, sorted({e for token in tokens for e in token[layer]}))
    prompted.end_step(prompt_state)
    assert prompt_state.previous is None
    prompted.observe_prompt(prompt_state, tokens)
    for token in tokens:
        run_token(decoded, decode_state, token)
    assert prompt_state.statistics.tokens == decode_state.statistics.tokens == len(tokens)
    assert prompted.transitions.tokens == 0 and decoded.transitions.tokens == len(tokens)
    assert not prompt_state.history.any(), "the store's matrix is the decode one"
    assert prompt_state.previous == [tuple(experts) for experts in tokens[-1]]
    assert list(prompt_state.recent) == list(decode_state.recent) and prompt_state.remembered == len(tokens)
    assert np.array_equal(prompt_state.recent_use, decode_state.recent_use)
    rows = range(prompted.transitions.max_offset * LAYERS * EXPERTS)
    assert np.allclose(prompt_state.statistics.log_rows(rows), decode_state.statistics.log_rows(rows), rtol=1e-12)
    for predictor, state in ((prompted, prompt_state), (decoded, decode_state)):  # the first decode step after
        predictor.begin_step(state, decode=True)
        predictor.observe_layer(state, 0, tokens[0][0])
    assert np.allclose(prompted.predict(prompt_state), decoded.predict(decode_state), rtol=1e-12)
    with pytest.raises(ValueError, match="routes 2 layers"):
        prompted.observe_prompt(prompted.new_request(), [[[0], [1]]])
