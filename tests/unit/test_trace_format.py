"""The JSONL routing-trace format: the reference files parse, writing round-trips, and bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.trace.format import (
    RequestTrace,
    TraceFormatError,
    TraceHeader,
    TraceStep,
    parse_trace_lines,
    read_traces,
    split_decode_steps,
    trace_lines,
    write_traces,
)

DATA = Path(__file__).resolve().parents[1] / "data"
H39S = DATA / "mixtral-h39s-prompt1.jsonl"
MARIO = DATA / "mixtral-mario-2req.jsonl"

HEADER = {"trace": "t", "num_layers": 2, "num_experts": 4}
STEP = {"step": 0, "phase": "decode", "experts": [[0, 1], [2, 3]]}


def _lines(*records: dict | str) -> list[str]:
    return [record if isinstance(record, str) else json.dumps(record) for record in records]


def test_reference_files_parse_into_requests_and_steps() -> None:
    (h39s,) = read_traces(H39S)
    assert (h39s.header.num_layers, h39s.header.num_experts, h39s.header.top_k) == (32, 8, 2)
    assert len(h39s.steps) == 774 and h39s.num_decode_steps == 773
    assert h39s.steps[0].phase == "prefill" and h39s.steps[0].experts[5] == tuple(range(8))
    assert h39s.steps[1].experts[0] == (3, 4) and h39s.steps[1].weights is None

    humaneval, gsm8k = read_traces(MARIO)
    assert humaneval.header.trace == "mixtral-8x7b-instruct/humaneval-0"
    assert gsm8k.header.trace == "mixtral-8x7b-instruct/gsm8k-1"
    assert (humaneval.num_decode_steps, gsm8k.num_decode_steps) == (81, 78)
    assert humaneval.steps[0].experts[0] == (6, 5)
    assert len(humaneval.steps[0].weights[0]) == 2


@pytest.mark.parametrize("path", [H39S, MARIO], ids=lambda path: path.name)
def test_writing_a_reference_file_reproduces_it_byte_for_byte(path: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy.jsonl"
    write_traces(out, read_traces(path))
    assert out.read_bytes() == path.read_bytes()


def test_round_trip_keeps_every_optional_field_and_empty_layers(tmp_path: Path) -> None:
    requests = [
        RequestTrace(
            TraceHeader(trace="a", num_layers=2, num_experts=4, model="m", top_k=2, source="s", note="n"),
            (
                TraceStep(0, "prefill", ((0, 1, 3), ()), counts=((5, 1, 2), ())),
                TraceStep(1, "decode", ((3, 0), ()), weights=((0.75, 0.25), ())),
            ),
        ),
        RequestTrace(TraceHeader(trace="b", num_layers=2, num_experts=4), (TraceStep(0, "decode", ((2,), (1,))),)),
    ]
    path = tmp_path / "trace.jsonl"
    write_traces(path, requests)
    assert read_traces(path) == requests
    assert json.loads(path.read_text().splitlines()[3]) == {"trace": "b", "num_layers": 2, "num_experts": 4}


@pytest.mark.parametrize(
    ("lines", "line", "problem"),
    [
        (_lines(HEADER, "{not json"), 2, "invalid JSON"),
        (_lines(STEP), 1, "a step line before any header"),
        (_lines(HEADER, {**STEP, "experts": [[0, 1]]}), 2, "'experts' has 1 layers, the header says num_layers=2"),
        (_lines(HEADER, {**STEP, "experts": [[0, 1], [2, 4]]}), 2, "expert id 4 out of range [0, 4)"),
        (_lines(HEADER, {**STEP, "experts": [[0, -1], [2, 3]]}), 2, "expert id -1 out of range"),
        (_lines(HEADER, {**STEP, "experts": [[0, True], [2, 3]]}), 2, "expert id True is not an integer"),
        (_lines(HEADER, {**STEP, "experts": [[1, 1], [2, 3]]}), 2, "repeated expert id"),
        (_lines(HEADER, {**STEP, "experts": [0, 1]}), 2, "must be a list of lists"),
        (_lines(HEADER, {**STEP, "phase": "verify"}), 2, "'phase' must be one of"),
        (_lines(HEADER, {**STEP, "weights": [[1.0], [0.5, 0.5]]}), 2, "'weights' does not have the shape"),
        (_lines(HEADER, {**STEP, "counts": [[1, 0], [1, 1]]}), 2, "invalid 'counts' entry"),
        (_lines(HEADER, {**STEP, "expert": [[0]]}), 2, "unknown step key(s) ['expert']"),
        (_lines(HEADER, {"step": 0, "experts": [[0], [1]]}), 2, "step lacks required key(s) ['phase']"),
        (_lines(HEADER, STEP, STEP), 3, "step 0 does not follow step 0"),
        (_lines(HEADER, "[1, 2]"), 2, "expected a JSON object, got list"),
        (_lines(HEADER, {"phase": "decode"}), 2, "neither a header"),
        (_lines({**HEADER, "num_layers": 0}), 1, "'num_layers' must be a positive integer"),
        (_lines({"trace": "t", "num_layers": 2}), 1, "header lacks required key(s) ['num_experts']"),
        (_lines(HEADER, "", STEP, {**STEP, "step": 1, "experts": [[9], []]}), 4, "expert id 9 out of range"),
    ],
)
def test_errors_name_the_file_and_line(lines: list[str], line: int, problem: str) -> None:
    with pytest.raises(TraceFormatError) as caught:
        parse_trace_lines(lines, source="bad.jsonl")
    assert (caught.value.source, caught.value.line) == ("bad.jsonl", line)
    assert str(caught.value).startswith(f"bad.jsonl:{line}: ")
    assert problem in caught.value.problem


def test_an_input_without_a_header_is_an_error() -> None:
    with pytest.raises(TraceFormatError, match=r"^empty\.jsonl: no header line"):
        parse_trace_lines(["\n", "  \n"], source="empty.jsonl")


def test_read_traces_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(HEADER) + "\n" + json.dumps({**STEP, "experts": [[7], [0]]}) + "\n")
    with pytest.raises(TraceFormatError, match=rf"^{path}:2: step 0, layer 0: expert id 7"):
        read_traces(path)


def test_the_writer_refuses_a_step_the_reader_would_refuse() -> None:
    request = RequestTrace(TraceHeader(trace="t", num_layers=2, num_experts=4), (TraceStep(0, "decode", ((5,), ())),))
    with pytest.raises(TraceFormatError, match=r"^<writer>:2: step 0, layer 0: expert id 5 out of range"):
        list(trace_lines(request))


def test_decode_steps_split_into_short_requests() -> None:
    (h39s,) = read_traces(H39S)
    short = split_decode_steps([h39s], 80)
    assert [request.num_decode_steps for request in short] == [80] * 9 + [53]
    assert all(step.phase == "decode" for request in short for step in request.steps)
    assert [step for request in short for step in request.steps] == list(h39s.steps[1:])
    assert {request.header for request in short} == {h39s.header}
    mario = read_traces(MARIO)
    assert [r.num_decode_steps for r in split_decode_steps(mario, 100)] == [100, 59]  # across the two requests
    with pytest.raises(ValueError, match="at least 1"):
        split_decode_steps(mario, 0)
