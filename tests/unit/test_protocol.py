"""Request models: strict types, ranges, unsupported parameters accepted only with their default value."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def _error_locs(cls, **fields) -> list[tuple]:
    with pytest.raises(ValidationError) as error:
        cls(**fields)
    return [e["loc"] for e in error.value.errors()]


def test_chat_defaults_and_text_parts() -> None:
    request = ChatCompletionRequest(model="m", messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ])
    assert request.n == 1 and request.stream is False and request.max_tokens is None
    assert [m.text() for m in request.messages] == ["be brief", "ab"]


@pytest.mark.parametrize("field, value", [
    ("max_tokens", True), ("max_tokens", 1.5), ("max_tokens", "3"), ("temperature", "1"), ("stream", "yes"),
    ("n", 0), ("n", 17), ("top_p", 0), ("temperature", 2.5), ("frequency_penalty", -3), ("seed", 2**63),
    ("stop", ""), ("stop", ["ok", ""]), ("logit_bias", {"1": 101}), ("top_k", -2), ("min_tokens", -1),
])
def test_chat_rejects_bad_values_at_their_field(field: str, value) -> None:
    assert _error_locs(ChatCompletionRequest, model="m", messages=MESSAGES, **{field: value})[0][0] == field


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function"}]), ("response_format", {"type": "json_object"}), ("tool_choice", "required"),
    ("functions", [{"name": "f"}]), ("store", True), ("audio", {"voice": "x"}), ("reasoning_effort", "high"),
])
def test_unsupported_parameters_with_a_non_default_value_are_named(field: str, value) -> None:
    with pytest.raises(ValidationError) as error:
        ChatCompletionRequest(model="m", messages=MESSAGES, **{field: value})
    [problem] = error.value.errors()
    assert problem["loc"] == (field,) and "not supported" in problem["msg"]


@pytest.mark.parametrize("field, value", [
    ("tools", []), ("response_format", {"type": "text"}), ("tool_choice", "none"), ("store", False),
    ("service_tier", "auto"), ("parallel_tool_calls", True),
])
def test_unsupported_parameters_with_their_default_value_are_accepted(field: str, value) -> None:
    assert getattr(ChatCompletionRequest(model="m", messages=MESSAGES, **{field: value}), field) == value


def test_unknown_fields_and_roles_and_parts_are_rejected() -> None:
    assert _error_locs(ChatCompletionRequest, model="m", messages=MESSAGES, temprature=1) == [("temprature",)]
    assert _error_locs(ChatCompletionRequest, model="m", messages=[{"role": "bot", "content": "x"}]) == [
        ("messages", 0, "role")]
    assert _error_locs(ChatCompletionRequest, model="m", messages=[]) == [("messages",)]


def test_top_logprobs_requires_logprobs() -> None:
    assert _error_locs(ChatCompletionRequest, model="m", messages=MESSAGES, top_logprobs=2) == [("top_logprobs",)]
    assert ChatCompletionRequest(model="m", messages=MESSAGES, logprobs=True, top_logprobs=2).top_logprobs == 2


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_forms(prompt) -> None:
    request = CompletionRequest(model="m", prompt=prompt)
    assert request.prompt == prompt and request.max_tokens == 16


@pytest.mark.parametrize("prompt", ["", [], [""], [-1], [[]], [["a"]], 5])
def test_completion_bad_prompts_are_rejected_at_prompt(prompt) -> None:
    assert all(loc[0] == "prompt" for loc in _error_locs(CompletionRequest, model="m", prompt=prompt))


def test_completion_logprobs_range_and_unsupported_suffix() -> None:
    assert _error_locs(CompletionRequest, model="m", prompt="x", logprobs=6) == [("logprobs",)]
    assert _error_locs(CompletionRequest, model="m", prompt="x", suffix="tail") == [("suffix",)]
    assert CompletionRequest(model="m", prompt="x", best_of=1).best_of == 1


def test_tokenize_needs_exactly_one_of_prompt_and_messages() -> None:
    assert TokenizeRequest(prompt="x").messages is None
    assert TokenizeRequest(messages=MESSAGES).prompt is None
    with pytest.raises(ValidationError, match="exactly one"):
        TokenizeRequest()
    with pytest.raises(ValidationError, match="exactly one"):
        TokenizeRequest(prompt="x", messages=MESSAGES)
