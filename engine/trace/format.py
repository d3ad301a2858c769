"""The JSONL routing-trace format: read, validate and write (specification: tests/data/README.md).

A trace file holds one or more requests. A header object starts each request::

    {"trace": NAME, "model": ..., "num_layers": L, "num_experts": E, "top_k": K, "source": ..., "note": ...}

and every further line is one engine step of that request, in execution order::

    {"step": i, "phase": "prefill" | "decode", "experts": [[ids at layer 0], ..., [ids at layer L-1]],
     "weights": [...same shape, optional...], "counts": [...same shape, optional...]}

Only ``trace``, ``num_layers`` and ``num_experts`` are required in a header; unknown keys are errors in both
kinds of line (a misspelt key must not pass silently). Blank lines are ignored. Every violation raises
`TraceFormatError`, whose message names the file and the 1-based line number.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Phase = Literal["prefill", "decode"]
PHASES: tuple[str, ...] = ("prefill", "decode")

_HEADER_KEYS = ("trace", "model", "num_layers", "num_experts", "top_k", "source", "note")
_HEADER_REQUIRED = ("trace", "num_layers", "num_experts")
_STEP_KEYS = ("step", "phase", "experts", "weights", "counts")
_STEP_REQUIRED = ("step", "phase", "experts")


class TraceFormatError(ValueError):
    """A trace file (or a trace about to be written) breaks the format.

    ``str()`` reads ``FILE:LINE: problem`` (``FILE: problem`` when no single line is at fault).
    """

    def __init__(self, source: str, line: int | None, problem: str) -> None:
        super().__init__(f"{source}: {problem}" if line is None else f"{source}:{line}: {problem}")
        self.source = source
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class TraceHeader:
    """The header line of one request: which model produced the trace and its routing shape."""

    trace: str
    num_layers: int
    num_experts: int
    model: str | None = None
    top_k: int | None = None
    source: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class TraceStep:
    """One engine step of one request.

    ``experts[layer]`` lists the expert ids used at that layer (empty: a dense or unrecorded layer). ``weights``
    and ``counts``, when present, have the same shape: the gate weights of those experts, and (prefill) how
    many prompt tokens used each.
    """

    step: int
    phase: Phase
    experts: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...] | None = None
    counts: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class RequestTrace:
    """A header and its steps, in execution order."""

    header: TraceHeader
    steps: tuple[TraceStep, ...]

    @property
    def num_decode_steps(self) -> int:
        """How many of the steps are decode steps."""
        return sum(step.phase == "decode" for step in self.steps)


def read_traces(path: str | Path) -> list[RequestTrace]:
    """Parse every request of the trace file at ``path`` (at least one; see `parse_trace_lines`)."""
    with open(path, encoding="utf-8") as lines:
        return parse_trace_lines(lines, source=str(path))


def split_decode_steps(requests: Sequence[RequestTrace], steps: int) -> list[RequestTrace]:
    """The decode steps of ``requests``, in order, as requests of ``steps`` steps each (the last may be shorter),
    under the first request's header; prefill steps are left out. Short requests made of a long recorded one: the
    cold start of every request, measured on routing that was not recorded that way. ValueError if ``steps`` < 1."""
    if steps < 1:
        raise ValueError(f"steps per request must be at least 1, got {steps}")
    decode = [step for request in requests for step in request.steps if step.phase == "decode"]
    header = requests[0].header
    return [RequestTrace(header, tuple(decode[begin:begin + steps])) for begin in range(0, len(decode), steps)]


def parse_trace_lines(lines: Iterable[str], source: str = "<trace>") -> list[RequestTrace]:
    """Parse JSONL trace lines into requests; ``source`` names the input in error messages.

    Raises `TraceFormatError` for: a line that is not a JSON object, a step before any header, a header or step
    that breaks the format (see `check_header`, `check_step`), step numbers that do not increase within a
    request, and input that holds no header at all.
    """
    requests: list[tuple[TraceHeader, list[TraceStep]]] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            _parse_line(text, requests)
        except ValueError as error:
            raise TraceFormatError(source, number, str(error)) from error
    if not requests:
        raise TraceFormatError(source, None, "no header line: the input holds no trace")
    return [RequestTrace(header, tuple(steps)) for header, steps in requests]


def write_traces(path: str | Path, requests: Sequence[RequestTrace]) -> None:
    """Write ``requests`` to ``path`` in the trace format (replacing the file); `read_traces` reads them back."""
    with open(path, "w", encoding="utf-8") as out:
        for request in requests:
            for line in trace_lines(request):
                out.write(line + "\n")


def trace_lines(request: RequestTrace) -> Iterator[str]:
    """The JSONL lines (no newline) of one request: its header, then its steps.

    Raises `TraceFormatError` (source ``<writer>``, line = position in the request) if a step breaks the format,
    so that the engine never writes a trace the reader would refuse.
    """
    header = request.header
    try:
        check_header(header)
    except ValueError as error:
        raise TraceFormatError("<writer>", 1, str(error)) from error
    yield json.dumps(_without_none(vars(header), _HEADER_KEYS))
    previous: int | None = None
    for position, step in enumerate(request.steps, start=2):
        try:
            check_step(step, header, previous)
        except ValueError as error:
            raise TraceFormatError("<writer>", position, str(error)) from error
        previous = step.step
        yield json.dumps(_without_none(vars(step), _STEP_KEYS, nested=("experts", "weights", "counts")))


def check_header(header: TraceHeader) -> None:
    """Raise ValueError unless the header's fields have the format's types (positive layer and expert counts)."""
    _require_type("trace", header.trace, str)
    for name in ("model", "source", "note"):
        if getattr(header, name) is not None:
            _require_type(name, getattr(header, name), str)
    for name in ("num_layers", "num_experts", "top_k"):
        value = getattr(header, name)
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"header {name!r} must be a positive integer, got {value!r}")


def check_step(step: TraceStep, header: TraceHeader, previous_step: int | None) -> None:
    """Raise ValueError unless ``step`` fits ``header``.

    Checks: a non-negative integer step number greater than ``previous_step``; a known phase; exactly
    ``num_layers`` expert lists of distinct integer ids in ``[0, num_experts)``; ``weights`` and ``counts`` (if
    any) of the same shape, numbers and positive integers respectively.
    """
    if not _is_int(step.step) or step.step < 0:
        raise ValueError(f"'step' must be a non-negative integer, got {step.step!r}")
    if previous_step is not None and step.step <= previous_step:
        raise ValueError(f"step {step.step} does not follow step {previous_step} (a missing header line?)")
    if step.phase not in PHASES:
        raise ValueError(f"step {step.step}: 'phase' must be one of {PHASES}, got {step.phase!r}")
    if len(step.experts) != header.num_layers:
        raise ValueError(
            f"step {step.step}: 'experts' has {len(step.experts)} layers, the header says num_layers="
            f"{header.num_layers}"
        )
    for layer, ids in enumerate(step.experts):
        _check_expert_ids(step.step, layer, ids, header.num_experts)
    _check_same_shape(step, "weights", _is_number)
    _check_same_shape(step, "counts", lambda value: _is_int(value) and value > 0)


def _parse_line(text: str, requests: list[tuple[TraceHeader, list[TraceStep]]]) -> None:
    """Parse one non-blank line, appending a new request (header) or a step to the last one."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON: {error}") from error
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "trace" in record:
        header = TraceHeader(**_known_fields(record, _HEADER_KEYS, _HEADER_REQUIRED, "header"))
        check_header(header)
        requests.append((header, []))
        return
    if "step" not in record:
        raise ValueError("neither a header (no 'trace' key) nor a step (no 'step' key)")
    if not requests:
        raise ValueError("a step line before any header line")
    header, steps = requests[-1]
    step = _step_from_record(_known_fields(record, _STEP_KEYS, _STEP_REQUIRED, "step"))
    check_step(step, header, steps[-1].step if steps else None)
    steps.append(step)


def _known_fields(record: dict[str, Any], known: tuple[str, ...], required: tuple[str, ...], kind: str) -> dict:
    """``record`` itself, after checking it has every required key and no unknown one."""
    unknown = sorted(set(record) - set(known))
    if unknown:
        raise ValueError(f"unknown {kind} key(s) {unknown}; allowed: {list(known)}")
    missing = [key for key in required if key not in record]
    if missing:
        raise ValueError(f"{kind} lacks required key(s) {missing}")
    return record


def _step_from_record(record: dict[str, Any]) -> TraceStep:
    """Build a TraceStep, turning the nested lists into tuples (shape errors surface in `check_step`)."""
    nested = {name: _nested_tuple(name, record[name]) for name in ("experts", "weights", "counts") if name in record}
    return TraceStep(step=record["step"], phase=record["phase"], **nested)


def _nested_tuple(name: str, value: Any) -> tuple[tuple[Any, ...], ...]:
    """A list of lists as a tuple of tuples; ValueError for any other shape."""
    if not isinstance(value, list) or not all(isinstance(inner, list) for inner in value):
        raise ValueError(f"{name!r} must be a list of lists (one per layer)")
    return tuple(tuple(inner) for inner in value)


def _check_expert_ids(step: int, layer: int, ids: tuple[Any, ...], num_experts: int) -> None:
    """ValueError unless ``ids`` are distinct integers in ``[0, num_experts)``."""
    for expert in ids:
        if not _is_int(expert):
            raise ValueError(f"step {step}, layer {layer}: expert id {expert!r} is not an integer")
        if not 0 <= expert < num_experts:
            raise ValueError(f"step {step}, layer {layer}: expert id {expert} out of range [0, {num_experts})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"step {step}, layer {layer}: repeated expert id in {list(ids)}")


def _check_same_shape(step: TraceStep, name: str, valid: Callable[[Any], bool]) -> None:
    """ValueError unless the optional field ``name`` is absent or matches ``experts`` in shape and ``valid``."""
    values = getattr(step, name)
    if values is None:
        return
    shape = [len(ids) for ids in step.experts]
    if [len(layer) for layer in values] != shape:
        raise ValueError(f"step {step.step}: {name!r} does not have the shape of 'experts'")
    for layer, row in enumerate(values):
        if not all(valid(value) for value in row):
            raise ValueError(f"step {step.step}, layer {layer}: invalid {name!r} entry in {list(row)}")


def _without_none(fields: dict[str, Any], order: tuple[str, ...], nested: tuple[str, ...] = ()) -> dict:
    """``fields`` in the format's key order, without None values, nested tuples turned into lists."""
    record = {key: fields[key] for key in order if fields[key] is not None}
    for key in nested:
        if key in record:
            record[key] = [list(inner) for inner in record[key]]
    return record


def _require_type(name: str, value: Any, kind: type) -> None:
    """ValueError unless ``value`` is a ``kind``."""
    if not isinstance(value, kind):
        raise ValueError(f"header {name!r} must be a {kind.__name__}, got {value!r}")


def _is_int(value: Any) -> bool:
    """An int that is not a bool (JSON true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
