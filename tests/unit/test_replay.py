"""Offline replay: the reference hit rates of tests/data/README.md, the counting conventions, and the CLI."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from engine.trace.format import RequestTrace, TraceHeader, TraceStep, read_traces
from engine.trace.replay import ClockModel, add_replay_arguments, replay, run_replay_command, simulate

DATA = Path(__file__).resolve().parents[1] / "data"
H39S = DATA / "mixtral-h39s-prompt1.jsonl"
MARIO = DATA / "mixtral-mario-2req.jsonl"

CONTRACT_KEYS = {"hit_rate", "belady_hit_rate", "global_belady_hit_rate", "prefetch_precision", "prefetch_recall",
                 "bytes_loaded", "stall_seconds"}

# tests/data/README.md, "Reference demand hit rates": slots per layer -> policy -> hit rate.
H39S_REFERENCE = {
    2: {"lru": 0.286, "lfu": 0.232, "belady": 0.424, "global-belady": 0.572},
    4: {"lru": 0.546, "lfu": 0.546, "belady": 0.738, "global-belady": 0.803},
    6: {"lru": 0.786, "lfu": 0.800, "belady": 0.904, "global-belady": 0.932},
}
MARIO_REFERENCE = {"lru": 0.562, "lfu": 0.548, "belady": 0.742, "global-belady": 0.804}


@pytest.fixture(scope="module")
def h39s() -> list[RequestTrace]:
    return read_traces(H39S)


@pytest.fixture(scope="module")
def mario() -> list[RequestTrace]:
    return read_traces(MARIO)


@pytest.mark.parametrize("slots", sorted(H39S_REFERENCE))
@pytest.mark.parametrize("policy", ["lru", "lfu", "belady", "global-belady"])
def test_h39s_reference_hit_rates(h39s: list[RequestTrace], policy: str, slots: int) -> None:
    tally = simulate(h39s, policy, slots_per_layer=slots)
    assert sum(tally.accesses) == 773 * 32 * 2
    assert round(tally.hit_rate, 3) == H39S_REFERENCE[slots][policy]


@pytest.mark.parametrize("policy", sorted(MARIO_REFERENCE))
def test_mario_two_requests_through_one_cache_reference_hit_rates(mario: list[RequestTrace], policy: str) -> None:
    assert round(simulate(mario, policy, slots_per_layer=4).hit_rate, 3) == MARIO_REFERENCE[policy]


def test_replay_result_carries_the_baselines_and_the_contract_keys(mario: list[RequestTrace]) -> None:
    clock = ClockModel(expert_bytes=1000, load_bandwidth=4000.0, layer_compute_seconds=0.5)
    result = replay(mario, "lru", slots_per_layer=4, clock=clock).to_json()
    assert CONTRACT_KEYS <= set(result)
    assert [round(result[key], 3) for key in ("hit_rate", "belady_hit_rate", "global_belady_hit_rate")] == [
        MARIO_REFERENCE["lru"], MARIO_REFERENCE["belady"], MARIO_REFERENCE["global-belady"]]
    assert result["prefetch_precision"] is None and result["prefetch_recall"] is None
    assert (result["accesses"], result["capacity"], result["slots_per_layer"]) == ((81 + 78) * 32 * 2, 128, 4)
    # No prefill in these traces: every decode miss is one blob loaded, each stalling 1000 / 4000 s.
    assert result["bytes_loaded"] == result["accesses"] - result["hits"]
    assert result["stall_seconds"] == pytest.approx(result["bytes_loaded"] * 0.25)
    assert result["modelled_seconds"] == pytest.approx(result["stall_seconds"] + (81 + 78) * 32 * 0.5)
    assert len(result["per_layer_hit_rate"]) == 32
    json.dumps(result)


def _trace(*steps: tuple[str, list[list[int]]], num_layers: int = 2) -> RequestTrace:
    header = TraceHeader(trace="t", num_layers=num_layers, num_experts=8)
    return RequestTrace(header, tuple(TraceStep(i, phase, tuple(map(tuple, experts)))
                                      for i, (phase, experts) in enumerate(steps)))


def test_prefill_warms_the_cache_but_does_not_count() -> None:
    request = _trace(("prefill", [[0, 1, 2], [3]]), ("decode", [[1, 2], [3]]), ("decode", [[0, 2], [4]]))
    result = replay([request], "lru", slots_per_layer=2)
    # LRU keeps the last two prefill ids (1, 2) at layer 0: decode hits 1, 2, 3, 2; misses 0 and 4.
    assert (result.accesses, result.hits) == (6, 4)
    assert result.per_layer_hit_rate == (0.75, 0.5)
    assert result.bytes_loaded == 4 + 2


def test_experts_are_accessed_in_the_listed_order() -> None:
    listed = replay([_trace(("decode", [[0, 1]]), ("decode", [[2]]), ("decode", [[1]]), num_layers=1)],
                    "lru", slots_per_layer=2)
    swapped = replay([_trace(("decode", [[1, 0]]), ("decode", [[2]]), ("decode", [[1]]), num_layers=1)],
                     "lru", slots_per_layer=2)
    assert (listed.hits, swapped.hits) == (1, 0)


def test_one_cache_spans_the_requests_and_empty_layers_are_skipped() -> None:
    first = _trace(("decode", [[0, 1], []]))
    second = _trace(("decode", [[0, 1], []]))
    result = replay([first, second], "lru", slots_per_layer=2)
    assert (result.accesses, result.hits, result.per_layer_hit_rate) == (4, 2, (0.5, None))


def test_belady_looks_ahead_across_requests() -> None:
    first = _trace(("decode", [[0]]), ("decode", [[1]]), ("decode", [[2]]), num_layers=1)
    second = _trace(("decode", [[0]]), num_layers=1)
    # Only a look-ahead into the second request keeps 0 over 1 when 2 arrives.
    assert replay([first, second], "belady", slots_per_layer=2).hits == 1


def test_capacity_splits_over_layers_or_is_refused() -> None:
    request = _trace(("decode", [[0, 1], [2, 3]]), ("decode", [[0, 1], [2, 3]]))
    two_per_layer = replay([request], "lru", capacity=4)
    assert (two_per_layer.slots_per_layer, two_per_layer.hits) == (2, 4)
    assert replay([request], "lru").slots_per_layer == 4
    global_result = replay([request], "global-lru", capacity=3)
    assert global_result.belady_hit_rate is None and global_result.slots_per_layer is None
    with pytest.raises(ValueError, match="capacity 3 is not a positive multiple of 2"):
        replay([request], "lru", capacity=3)
    with pytest.raises(ValueError, match="not both"):
        replay([request], "lru", slots_per_layer=2, capacity=4)
    with pytest.raises(ValueError, match="slots_per_layer must be at least 1"):
        replay([request], "lru", slots_per_layer=0)


def test_unreplayable_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown cache policy"):
        replay([_trace(("decode", [[0], [1]]))], "fifo")
    with pytest.raises(ValueError, match="no decode access"):
        replay([_trace(("prefill", [[0], [1]]))])
    with pytest.raises(ValueError, match="different models"):
        replay([_trace(("decode", [[0], [1]])), _trace(("decode", [[0]]), num_layers=1)])


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moeserve replay")
    add_replay_arguments(parser)
    return parser.parse_args(argv)


def test_cli_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_replay_command(_parse(str(MARIO), "--policy", "lfu", "--capacity", "128", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert CONTRACT_KEYS <= set(result)
    assert (result["policy"], result["slots_per_layer"], round(result["hit_rate"], 3)) == ("lfu", 4, 0.548)


def test_cli_prompt_steps_stand_in_for_each_requests_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    """``--prompt-steps 10``: mario's two requests (81 and 78 decode steps) each lose 10 decode steps to one prefill
    step: 139 decode steps scored, the prompt's accesses (their union) warm the cache; a negative count is an
    error."""
    assert run_replay_command(_parse(str(MARIO), "--prompt-steps", "10", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["decode_steps"], result["accesses"]) == (139, 139 * 32 * 2)
    assert result["bytes_loaded"] > result["accesses"] - result["hits"], "the prompt steps loaded blobs too"
    assert run_replay_command(_parse(str(MARIO), "--prompt-steps", "-1")) == 2
    assert "prompt steps must be >= 0" in capsys.readouterr().err


def test_cli_table_defaults_to_lru_at_four_slots(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_replay_command(_parse(str(MARIO))) == 0
    out = capsys.readouterr().out
    assert "lru" in out and "4 per layer, 128 in total" in out
    assert re.search(r"^hit rate +0\.562$", out, re.MULTILINE)
    assert re.search(r"^per-layer Belady +0\.742$", out, re.MULTILINE)


def test_cli_rejects_both_capacities_and_reports_bad_traces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _parse(str(MARIO), "--slots-per-layer", "2", "--capacity", "64")
    assert "not allowed with argument" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0, "phase": "decode", "experts": [[0]]}\n')
    assert run_replay_command(_parse(str(bad))) == 2
    assert capsys.readouterr().err == f"moeserve replay: error: {bad}:1: a step line before any header line\n"
