"""Replay with prediction and prefetch: the clock's hit rule on a hand-made trace, and the figures that
README.md and benchmarks/results/replay_policies.json claim on the real Mixtral traces (replay is deterministic)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from engine.trace.format import RequestTrace, TraceHeader, TraceStep, read_traces, split_decode_steps
from engine.trace.planner import POLICY_SOURCES, PrefetchSettings
from engine.trace.replay import (
    GATED_POLICY,
    ORACLE_POLICY,
    PREDICTIVE_POLICY,
    ClockModel,
    NextVisitOracle,
    add_replay_arguments,
    layer_recall,
    next_layer_recall,
    replay,
    replay_steps,
    run_replay_command,
    with_prompt_steps,
)

DATA = Path(__file__).resolve().parents[1] / "data"
H39S = DATA / "mixtral-h39s-prompt1.jsonl"
MARIO = DATA / "mixtral-mario-2req.jsonl"
INSTANT = ClockModel(expert_bytes=10, load_bandwidth=1e9, layer_compute_seconds=1.0)
SLOW = ClockModel(expert_bytes=10, load_bandwidth=10.0, layer_compute_seconds=0.5, max_bytes_in_flight=20)
CLOCKS = {"unbounded": ClockModel(load_bandwidth=1e18), "nvme": ClockModel(load_bandwidth=7e9), "disk": ClockModel()}


def figures(result) -> tuple[float, int, int]:
    """A replay's pinned figures: (hit rate to 3 places, expert blobs loaded, whole stall seconds)."""
    return round(result.hit_rate, 3), result.bytes_loaded, round(result.stall_seconds)


PREDICTING = (PREDICTIVE_POLICY, GATED_POLICY)
"""The policies whose figures pass through the predictor's float64 numpy (exp, log, sums), which rounds differently
on CPUs with and without AVX-512: on a Zen 3 (AVX2) one choice in ~22,000 went the other way against the Zen 4 these
figures were pinned on (h39s from disk: hit rate 0.696 and 21,846 blobs against 0.697 and 21,845). Their figures
and recalls are pinned to within that (`assert_pinned`, `assert_recall`); the other policies' exactly."""


def assert_pinned(result, pinned: tuple[float, int, int]) -> None:
    """``result``'s `figures` are ``pinned``: exactly, or for a PREDICTING policy within rounding noise (hit rate
    +-0.001 beyond its 3 places, blobs and stall +-0.1 %)."""
    if result.policy not in PREDICTING:
        assert figures(result) == pinned
        return
    hit_rate, blobs, stall = pinned
    assert (result.hit_rate, result.bytes_loaded, result.stall_seconds) == (
        pytest.approx(hit_rate, abs=0.0015), pytest.approx(blobs, rel=1e-3), pytest.approx(stall, rel=1e-3, abs=1))


def assert_recall(recall: float, pinned: float) -> None:
    """A recall of the predictor is ``pinned`` to 3 places, within the rounding noise of PREDICTING (+-0.001)."""
    assert recall == pytest.approx(pinned, abs=0.0015)


def cycle(tokens: int = 60, layers: int = 4) -> RequestTrace:
    """Token t uses expert (t + l) % 4 at layer l: each layer's expert follows from the layer before."""
    header = TraceHeader(trace="cycle", num_layers=layers, num_experts=4, top_k=1)
    steps = tuple(TraceStep(t, "decode", tuple(((t + layer) % 4,) for layer in range(layers)))
                  for t in range(tokens))
    return RequestTrace(header, steps)


def test_timely_prefetch_beats_even_the_demand_optimum() -> None:
    lru = replay([cycle()], "lru", slots_per_layer=1, clock=INSTANT)
    result = replay([cycle()], PREDICTIVE_POLICY, slots_per_layer=1, clock=INSTANT)
    assert (lru.hit_rate, lru.global_belady_hit_rate) == (0.0, 0.1875)
    assert result.hit_rate > 0.6 > result.global_belady_hit_rate
    assert result.prefetch_precision > 0.95 and result.prefetch_recall > 0.6
    # Correct prefetches replace demand reads instead of adding to them.
    assert result.bytes_loaded <= lru.bytes_loaded


def test_a_late_prefetch_is_a_miss_that_stalls_less() -> None:
    # Reads take 1 s, a layer computes 0.5 s: the plan looks 2 layers ahead (PrefetchSettings.for_read_time(2)),
    # but one read at a time cannot keep up with a miss per layer, so prefetches land after their layer arrives.
    lru = replay([cycle()], "lru", slots_per_layer=1, clock=SLOW)
    result = replay([cycle()], PREDICTIVE_POLICY, slots_per_layer=1, clock=SLOW)
    assert lru.stall_seconds == 240.0 and lru.modelled_seconds == 360.0
    assert result.hit_rate < 0.05
    assert result.prefetch_recall > 0.6
    assert result.stall_seconds == pytest.approx(128.0)
    assert result.modelled_seconds == pytest.approx(128.0 + 240 * 0.5)


def test_the_default_policy_reports_prefetch_keys_and_the_cli_accepts_it(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="moeserve replay")
    add_replay_arguments(parser)
    args = parser.parse_args([str(MARIO), "--policy", PREDICTIVE_POLICY, "--json", "--load-bandwidth", "1e18"])
    assert run_replay_command(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["policy"] == "default" and result["prefetches"] > 0
    assert 0 < result["prefetch_precision"] <= 1 and 0 < result["prefetch_recall"] <= 1
    assert result["stall_seconds"] < 1e-3  # reads of ~0.35 ns each
    assert run_replay_command(parser.parse_args([str(MARIO), "--loads-in-flight", "0"])) == 2
    assert "--loads-in-flight must be positive" in capsys.readouterr().err


def test_each_clock_plans_as_far_ahead_as_a_read_takes() -> None:
    read_layers = {name: clock.expert_load_seconds / clock.layer_compute_seconds for name, clock in CLOCKS.items()}
    settings = {name: PrefetchSettings.for_read_time(layers) for name, layers in read_layers.items()}
    assert {name: (each.horizon, each.min_probability) for name, each in settings.items()} == {
        "unbounded": (1, 0.7), "nvme": (2, 0.7), "disk": (7, 0.9)}
    assert PrefetchSettings.for_read_time(100.0).horizon == 8 == PrefetchSettings().horizon
    # The replay's default policy runs with its clock's settings.
    mario = read_traces(MARIO)
    assert (replay(mario, PREDICTIVE_POLICY, 4, clock=CLOCKS["nvme"])
            == replay(mario, PREDICTIVE_POLICY, 4, clock=CLOCKS["nvme"], settings=settings["nvme"]))
    assert (replay(mario, PREDICTIVE_POLICY, 4, clock=CLOCKS["nvme"])
            != replay(mario, PREDICTIVE_POLICY, 4, clock=CLOCKS["nvme"], settings=settings["disk"]))


@pytest.mark.parametrize("policy", ["lru", "global-lru", PREDICTIVE_POLICY])
@pytest.mark.parametrize("clock", [INSTANT, SLOW], ids=["instant", "slow"])
def test_warm_up_requests_run_through_the_same_cache_and_count_nowhere(policy: str, clock: ClockModel) -> None:
    # Nothing looks ahead (no Belady here): the warm run over [a, b] minus the run over [a] alone is b after a.
    a, b = cycle(60), cycle(12)
    both, first = replay([a, b], policy, 1, clock=clock), replay([a], policy, 1, clock=clock)
    warm = replay([b], policy, 1, clock=clock, warm_up=[a])
    assert (warm.requests, warm.warm_up_requests, warm.decode_steps, warm.accesses) == (1, 1, 12, 48)
    assert warm.to_json()["warm_up_requests"] == 1 and replay([b], policy, 1, clock=clock).warm_up_requests == 0
    assert (warm.hits, warm.bytes_loaded) == (both.hits - first.hits, both.bytes_loaded - first.bytes_loaded)
    assert warm.stall_seconds == pytest.approx(both.stall_seconds - first.stall_seconds)
    assert warm.modelled_seconds == pytest.approx(both.modelled_seconds - first.modelled_seconds)
    prefill_only = RequestTrace(b.header, (TraceStep(0, "prefill", ((0,), (1,), (2,), (3,))),))
    with pytest.raises(ValueError, match="no decode access"):
        replay([prefill_only], policy, 1, clock=clock, warm_up=[a])


def test_a_warm_up_teaches_the_predictor_before_the_scored_requests() -> None:
    a, b = cycle(60), cycle(12)
    cold, warm = replay([b], PREDICTIVE_POLICY, 1, clock=INSTANT), replay([b], PREDICTIVE_POLICY, 1, clock=INSTANT,
                                                                            warm_up=[a])
    assert (cold.hit_rate, warm.hit_rate) == (28 / 48, 43 / 48)  # the 60 tokens weigh 8 in the request's own statistics
    assert next_layer_recall([b], ("transitions",)) < 0.9 < next_layer_recall([b], ("transitions",), warm_up=[a]) == 1
    with pytest.raises(ValueError, match="different models"):
        next_layer_recall([b], ("transitions",), warm_up=[cycle(4, layers=3)])


def test_the_cli_warms_up_on_other_traces(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="moeserve replay")
    add_replay_arguments(parser)
    assert run_replay_command(parser.parse_args([str(MARIO), "--warm-up", str(MARIO), "--json"])) == 0
    result = json.loads(capsys.readouterr().out)
    mario = read_traces(MARIO)
    assert (result["requests"], result["warm_up_requests"]) == (2, 2)
    assert result["hit_rate"] == replay(mario, "lru", warm_up=mario).hit_rate != replay(mario, "lru").hit_rate
    assert run_replay_command(parser.parse_args([str(MARIO), "--warm-up", str(MARIO)])) == 0
    assert "after 2 warm-up" in capsys.readouterr().out


# Next-layer recall at M = 2 * top_k (README "Replay and prediction"): tuned on h39s, mario held out.
RECALL = {
    "h39s": {"frequency": 0.571, "transitions": 0.812, "history": 0.833, "transitions+history": 0.840,
             "transitions+history+recent": 0.846, "store": 0.571, "store+transitions+history+recent": 0.846},
    "mario": {"frequency": 0.595, "transitions": 0.765, "history": 0.769, "transitions+history": 0.782,
              "transitions+history+recent": 0.780, "store": 0.546, "store+transitions+history+recent": 0.779},
}
SOURCES = {name: () if name == "frequency" else tuple(name.split("+")) for name in RECALL["h39s"]}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_next_layer_recall_on_the_held_out_traces(source: str) -> None:
    assert_recall(next_layer_recall(read_traces(MARIO), SOURCES[source]), RECALL["mario"][source])


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_next_layer_recall_on_the_tuning_trace(source: str) -> None:
    assert_recall(next_layer_recall(read_traces(H39S), SOURCES[source]), RECALL["h39s"][source])


# The default policy at 4 slots per layer, with each clock's PrefetchSettings.for_read_time: (hit rate, expert
# blobs loaded, stall seconds) per clock.
DEFAULT_FIGURES = {
    "h39s": {"unbounded": (0.741, 21711, 0), "nvme": (0.719, 22200, 762), "disk": (0.697, 21845, 4739)},
    "mario": {"unbounded": (0.701, 4407, 0), "nvme": (0.685, 4535, 171), "disk": (0.674, 4514, 997)},
}


@pytest.mark.parametrize("clock", sorted(CLOCKS))
def test_default_policy_figures_on_the_held_out_traces(clock: str) -> None:
    result = replay(read_traces(MARIO), PREDICTIVE_POLICY, slots_per_layer=4, clock=CLOCKS[clock])
    assert_pinned(result, DEFAULT_FIGURES["mario"][clock])


@pytest.mark.slow
@pytest.mark.parametrize("clock", sorted(CLOCKS))
def test_default_policy_figures_on_the_tuning_trace(clock: str) -> None:
    result = replay(read_traces(H39S), PREDICTIVE_POLICY, slots_per_layer=4, clock=CLOCKS[clock])
    assert_pinned(result, DEFAULT_FIGURES["h39s"][clock])


# Prompt stand-ins (benchmarks/prompt_learning.py, README "Replay and prediction"): mario's first 16 decode steps
# per request stand in for its prompt's end, seen only as one prefill step (merged) or also learned token by token.
# Recall with the default policy's sources; the default policy's (hit rate, blobs, stall seconds) with instant reads.
PROMPT_FIGURES = {"merged": (0.765, (0.692, 4067, 0)), "learned": (0.807, (0.717, 3883, 0))}


@pytest.mark.parametrize("mode", sorted(PROMPT_FIGURES))
def test_prompt_stand_ins_on_the_held_out_traces(mode: str) -> None:
    prompted = with_prompt_steps(read_traces(MARIO), 16)
    learn = mode == "learned"
    recall, pinned = PROMPT_FIGURES[mode]
    assert_recall(next_layer_recall(prompted, POLICY_SOURCES, learn_prompt=learn), recall)
    result = replay(prompted, PREDICTIVE_POLICY, slots_per_layer=4, clock=CLOCKS["unbounded"], learn_prompt=learn)
    assert_pinned(result, pinned)
    assert replay(prompted, "lru", slots_per_layer=4).bytes_loaded == 3968


# Warm (README "Replay and prediction"): each trace scored after the other one's requests ran, uncounted, through
# the same predictor, store, cache and clock. Settings as tuned on h39s cold; nothing changed after seeing these.
WARM_UP = {"h39s": MARIO, "mario": H39S}
WARM_RECALL = {
    "h39s": {"frequency": 0.571, "transitions": 0.814, "history": 0.833, "transitions+history": 0.841,
             "transitions+history+recent": 0.846, "store": 0.500, "store+transitions+history+recent": 0.842},
    "mario": {"frequency": 0.594, "transitions": 0.777, "history": 0.766, "transitions+history": 0.789,
              "transitions+history+recent": 0.789, "store": 0.497, "store+transitions+history+recent": 0.788},
}
# The default policy's (hit rate, expert blobs loaded, stall seconds) per clock; per-layer LRU's (hit rate, blobs)
# and global Belady's hit rate at the same 4 slots per layer, after the same warm-up.
WARM_DEFAULT_FIGURES = {
    "h39s": {"unbounded": (0.731, 22648, 0), "nvme": (0.708, 23184, 794), "disk": (0.686, 23242, 5046)},
    "mario": {"unbounded": (0.710, 4530, 0), "nvme": (0.696, 4661, 167), "disk": (0.683, 4747, 1033)},
}
WARM_BASELINES = {"h39s": (0.546, 22657, 0.803), "mario": (0.566, 4421, 0.815)}
TRACE_FILES = {"h39s": H39S, "mario": MARIO}


@pytest.mark.slow
@pytest.mark.parametrize("trace", sorted(TRACE_FILES))
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_next_layer_recall_after_the_other_trace(trace: str, source: str) -> None:
    recall = next_layer_recall(read_traces(TRACE_FILES[trace]), SOURCES[source],
                               warm_up=read_traces(WARM_UP[trace]))
    assert_recall(recall, WARM_RECALL[trace][source])


@pytest.mark.slow
@pytest.mark.parametrize("trace", sorted(TRACE_FILES))
def test_demand_baselines_after_the_other_trace(trace: str) -> None:
    lru = replay(read_traces(TRACE_FILES[trace]), "lru", slots_per_layer=4, warm_up=read_traces(WARM_UP[trace]))
    assert (round(lru.hit_rate, 3), lru.bytes_loaded, round(lru.global_belady_hit_rate, 3)) == WARM_BASELINES[trace]


@pytest.mark.slow
@pytest.mark.parametrize("trace", sorted(TRACE_FILES))
@pytest.mark.parametrize("clock", sorted(CLOCKS))
def test_default_policy_figures_after_the_other_trace(trace: str, clock: str) -> None:
    result = replay(read_traces(TRACE_FILES[trace]), PREDICTIVE_POLICY, slots_per_layer=4, clock=CLOCKS[clock],
                    warm_up=read_traces(WARM_UP[trace]))
    assert_pinned(result, WARM_DEFAULT_FIGURES[trace][clock])
    assert round(result.global_belady_hit_rate, 3) == WARM_BASELINES[trace][2]


def test_the_gate_keeps_a_prefetch_that_pays_in_stall() -> None:
    # The late prefetches above save nearly half of LRU's stall, the timely ones nearly all of it: the gate keeps both.
    for clock in (SLOW, INSTANT):
        default = replay([cycle()], PREDICTIVE_POLICY, slots_per_layer=1, clock=clock)
        gated = replay([cycle()], GATED_POLICY, slots_per_layer=1, clock=clock)
        assert (gated.hit_rate, gated.stall_seconds, gated.bytes_loaded) == (
            default.hit_rate, default.stall_seconds, default.bytes_loaded)


# The gated default policy (as served) on the held-out traces at 4 slots per layer: (hit rate, blobs loaded, stall
# seconds) per clock. Against the ungated DEFAULT_FIGURES: equal with free reads; at NVMe speed the gate spends
# windows off (stall 190 against 171, LRU's 224); on the disk it stalls less than either (935 against 997 and
# LRU's 1,047) with fewer blobs than LRU. (NVMe's 4,187 blobs were 4,188 before the predictor's numpy hot path, whose
# float64 sums and logs round in another order: one near-tie the other way; no other pinned figure moved.)
GATED_FIGURES = {"unbounded": (0.701, 4407, 0), "nvme": (0.635, 4187, 190), "disk": (0.622, 4016, 935)}


@pytest.mark.parametrize("clock", sorted(CLOCKS))
def test_gated_policy_figures_on_the_held_out_traces(clock: str) -> None:
    result = replay(read_traces(MARIO), GATED_POLICY, slots_per_layer=4, clock=CLOCKS[clock])
    assert_pinned(result, GATED_FIGURES[clock])


def test_the_oracle_predicts_each_layers_next_visit_across_requests() -> None:
    header = TraceHeader(trace="two", num_layers=2, num_experts=3, top_k=1)
    first = RequestTrace(header, (TraceStep(0, "prefill", ((0, 1), (2,))), TraceStep(1, "decode", ((1,), (0,)))))
    second = RequestTrace(header, (TraceStep(0, "decode", ((2,), ())),))
    oracle = NextVisitOracle([first, second])
    seen = []
    for request in (first, second):
        state = oracle.new_request()
        for step in request.steps:
            oracle.begin_step(state, step.phase == "decode")
            seen.append([list(row) for row in oracle.predict(state)])
            for layer, experts in enumerate(step.experts):
                oracle.observe_layer(state, layer, experts)
                seen.append([list(row) for row in oracle.predict(state)])
            oracle.end_step(state)
        oracle.finish(state)
    one_hot = {(): [0.0, 0.0, 0.0], (0,): [1.0, 0.0, 0.0], (1,): [0.0, 1.0, 0.0], (2,): [0.0, 0.0, 1.0],
               (0, 1): [1.0, 1.0, 0.0]}
    # Per step: at the frontier 0, 1, 2; a passed layer's row is the next step's (the next request's, at the end).
    expected = [[(0, 1), (2,)], [(1,), (2,)], [(1,), (0,)],
                [(1,), (0,)], [(2,), (0,)], [(2,), ()],
                [(2,), ()], [(), ()], [(), ()]]
    assert seen == [[one_hot[row] for row in rows] for rows in expected]
    with pytest.raises(ValueError, match="known future has 3 steps"):
        oracle.begin_step(oracle.new_request(), True)


def test_the_oracle_bounds_the_default_planner_and_the_cli_accepts_it(capsys: pytest.CaptureFixture[str]) -> None:
    # Fed the true next visits, the same planner prefetches every expert in time with free reads: every access hits
    # but the first (nothing is planned before the first layer runs), and no prefetch is wasted.
    oracle = replay([cycle()], ORACLE_POLICY, slots_per_layer=1, clock=INSTANT)
    default = replay([cycle()], PREDICTIVE_POLICY, slots_per_layer=1, clock=INSTANT)
    assert (oracle.hits, oracle.accesses, oracle.prefetches, oracle.prefetch_precision) == (239, 240, 239, 1.0)
    assert default.hit_rate == 220 / 240
    parser = argparse.ArgumentParser(prog="moeserve replay")
    add_replay_arguments(parser)
    args = parser.parse_args([str(MARIO), "--policy", ORACLE_POLICY, "--json", "--warm-up", str(MARIO)])
    assert run_replay_command(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["policy"] == ORACLE_POLICY and result["warm_up_requests"] == 2 and result["prefetch_precision"] == 1


# The oracle on the held-out traces at 4 slots per layer: (hit rate, blobs loaded, stall seconds) per clock, against
# DEFAULT_FIGURES and per-layer LRU's 4,459 blobs (224 s nvme, 1,047 s disk). From disk a read takes ~7 layers of
# compute and the device is the bottleneck: even perfect next visits stall 0.62 x LRU there.
ORACLE_FIGURES = {"unbounded": (1.0, 3472, 0), "nvme": (0.820, 3497, 44), "disk": (0.660, 3498, 645)}


@pytest.mark.parametrize("clock", sorted(CLOCKS))
def test_oracle_figures_on_the_held_out_traces(clock: str) -> None:
    result = replay(read_traces(MARIO), ORACLE_POLICY, slots_per_layer=4, clock=CLOCKS[clock])
    assert_pinned(result, ORACLE_FIGURES[clock])


# Where a read takes 3 layers of compute (benchmarks/replay_policies.py's read_3_layers: the ratio the engine's
# real-routing offload benchmark, benchmarks/trace_prefetch.py, meets on this machine class), on the held-out traces:
# (hit rate, blobs loaded, stall seconds). Even perfect next visits stall 0.41 x on-demand global LRU (the engine's
# cache is global): issue #7's engine bar, 0.3 x, is out of reach of any next-visit predictor under this planner there.
READ_3_LAYERS = ClockModel(load_bandwidth=ClockModel.expert_bytes / (3 * ClockModel.layer_compute_seconds))
# Knowing a key's visit after the next (oracle-2) still stalls 0.32 x; knowing every visit (oracle-future), 0.18 x.
READ_3_LAYERS_FIGURES = {"global-lru": (0.525, 4837, 508), PREDICTIVE_POLICY: (0.676, 4619, 411),
                         ORACLE_POLICY: (0.694, 3506, 209), "oracle-2": (0.748, 2989, 164),
                         "oracle-future": (0.840, 2021, 89)}


@pytest.mark.parametrize("policy", sorted(READ_3_LAYERS_FIGURES))
def test_where_a_read_takes_3_layers_even_perfect_next_visits_stall_over_0_3_of_on_demand_lru(policy: str) -> None:
    result = replay(read_traces(MARIO), policy, slots_per_layer=4, clock=READ_3_LAYERS)
    assert_pinned(result, READ_3_LAYERS_FIGURES[policy])
    lru_stall = READ_3_LAYERS_FIGURES["global-lru"][2]
    assert READ_3_LAYERS_FIGURES[ORACLE_POLICY][2] > 0.4 * lru_stall
    assert READ_3_LAYERS_FIGURES["oracle-2"][2] > 0.3 * lru_stall > READ_3_LAYERS_FIGURES["oracle-future"][2]


def test_an_oracle_that_knows_more_visits_waits_for_each_keys_true_next_use() -> None:
    header = TraceHeader(trace="one layer", num_layers=1, num_experts=3, top_k=1)
    routing = (0, 1, 2, 0, 1)  # one expert per step
    request = RequestTrace(header, tuple(TraceStep(t, "decode", ((expert,),)) for t, expert in enumerate(routing)))
    waits = {}
    for visits in (1, 2, None):
        oracle, seen = NextVisitOracle([request], visits), []
        state = oracle.new_request()
        for step in request.steps:
            oracle.begin_step(state, True)
            seen.append(oracle.waits(state))
            oracle.observe_layer(state, 0, step.experts[0])
            seen.append(oracle.waits(state))
            oracle.end_step(state)
        waits[visits] = [None if wait is None else wait[0].tolist() for wait in seen]
    assert waits[1] == [None] * 10  # the planner's miss_steps for every key
    # Steps from each key's next visit (this step's before the layer runs, the next one's after) to its use after it;
    # with every visit known, a key never used again waits past the end (until step 5 + miss_steps 3 = 8).
    assert waits[None] == [[3, 1, 2], [2, 3, 1], [2, 3, 1], [1, 2, 6], [1, 2, 6], [5, 1, 5], [5, 1, 5],
                           [4, 4, 4], [4, 4, 4], [3, 3, 3]]
    # Knowing two visits: only a use at the visit after the next is seen, the rest wait max(miss_steps, 2) = 3.
    assert waits[2] == [[1 if wait == 1 else 3 for wait in row] for row in waits[None]]
    with pytest.raises(ValueError, match="at least the next visit"):
        NextVisitOracle([request], 0)


# h39s cut into 80-token requests (benchmarks/replay_policies.py's h39s_80, tuning data): every request starts cold
# as mario's do. Recall of (c) + history and of all four sources; per-layer LRU's (hit rate, blobs), global
# Belady's hit rate; the default policy's and the oracle's (hit rate, blobs, stall seconds) per clock.
SHORT_RECALL = {"transitions+history": 0.794, "store+transitions+history+recent": 0.797}
SHORT_BASELINES = (0.546, 22484, 0.800)
SHORT_DEFAULT_FIGURES = {"unbounded": (0.706, 23277, 0), "nvme": (0.686, 24024, 850), "disk": (0.671, 24477, 5328)}
SHORT_ORACLE_FIGURES = {"unbounded": (1.0, 17229, 0)}


def short_requests() -> list[RequestTrace]:
    return split_decode_steps(read_traces(H39S), 80)


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(SHORT_RECALL))
def test_next_layer_recall_on_short_requests(source: str) -> None:
    assert_recall(next_layer_recall(short_requests(), SOURCES[source]), SHORT_RECALL[source])


@pytest.mark.slow
@pytest.mark.parametrize("clock", sorted(CLOCKS))
def test_default_policy_figures_on_short_requests(clock: str) -> None:
    result = replay(short_requests(), PREDICTIVE_POLICY, slots_per_layer=4, clock=CLOCKS[clock])
    assert_pinned(result, SHORT_DEFAULT_FIGURES[clock])


def test_demand_baselines_on_short_requests() -> None:
    lru = replay(short_requests(), "lru", slots_per_layer=4)
    assert (round(lru.hit_rate, 3), lru.bytes_loaded, round(lru.global_belady_hit_rate, 3)) == SHORT_BASELINES


@pytest.mark.slow
@pytest.mark.parametrize("clock", sorted(SHORT_ORACLE_FIGURES))
def test_oracle_figures_on_short_requests(clock: str) -> None:
    result = replay(short_requests(), ORACLE_POLICY, slots_per_layer=4, clock=CLOCKS[clock])
    assert_pinned(result, SHORT_ORACLE_FIGURES[clock])


def test_a_prompt_learned_token_by_token_teaches_what_its_union_cannot() -> None:
    """Prompt stand-ins (`with_prompt_steps`): the first decode steps stand in for the prompt's end. Seen only as
    one prefill step (their union of experts) they teach nothing about transitions; learned token by token they
    teach the request its pattern, and the rest of it is predicted as after a warm-up — in the recall and in the
    replay's cache alike."""
    request = cycle(40)
    (prompted,) = with_prompt_steps([request], 20)
    assert [step.phase for step in prompted.steps] == ["prompt"] * 20 + ["decode"] * 20
    assert prompted.num_decode_steps == 20
    runs = list(replay_steps(prompted))
    assert len(runs) == 21 and runs[0][0].phase == "prefill" and len(runs[0][1]) == 20
    assert runs[0][0].experts == ((0, 1, 2, 3),) * 4, "the union of the prompt's experts per layer"
    merged = next_layer_recall([prompted], ("transitions",), learn_prompt=False)
    learned = next_layer_recall([prompted], ("transitions",))
    assert merged < learned == 1
    assert next_layer_recall([request], ("transitions",)) < learned, "the cold tokens are the ones left out"
    with_prefill = RequestTrace(request.header, (TraceStep(0, "prefill", ((0, 1),) * 4), *request.steps[1:]))
    (prompted_after_prefill,) = with_prompt_steps([with_prefill], 20)
    assert [step.phase for step, _ in replay_steps(prompted_after_prefill)][:3] == ["prefill", "prefill", "decode"]
    cold, taught = (replay([prompted], PREDICTIVE_POLICY, 1, clock=INSTANT, learn_prompt=learn)
                    for learn in (False, True))
    assert cold.accesses == taught.accesses == 20 * 4 and cold.hit_rate < taught.hit_rate
    with pytest.raises(ValueError, match=">= 0"):
        with_prompt_steps([request], -1)


def test_layer_recall_scores_each_distance_from_the_frontier_d_layers_before() -> None:
    a, b = cycle(60, layers=6), cycle(12, layers=6)
    # Each layer's expert follows from any earlier layer's (they are all t + l), so once learned every distance
    # within max_offset is predicted perfectly; cold, the far ones have fewer learned pairs to go on.
    warm = layer_recall([b], ("transitions",), (1, 3, 5), warm_up=[a])
    assert warm == {1: 1.0, 3: 1.0, 5: 1.0}
    cold = layer_recall([b], ("transitions",), (1, 3, 5))
    assert cold[1] == next_layer_recall([b], ("transitions",)) < 1
    assert all(0 < value < 1 for value in cold.values())
    for distance in (0, 6):
        with pytest.raises(ValueError, match="distances must be in 1..5"):
            layer_recall([b], ("transitions",), (1, distance))
