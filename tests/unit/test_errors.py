"""OpenAI error bodies and how pydantic errors become a message and a ``param``."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.errors import describe_validation, error_body, param_of
from server.protocol import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize("status, error_type", [
    (400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"),
    (429, "rate_limit_error"), (500, "internal_server_error"), (503, "service_unavailable_error"),
])
def test_error_body_has_openai_shape(status: int, error_type: str) -> None:
    body = error_body(status, "went wrong", "temperature", "some_code")
    assert body == {"error": {"message": "went wrong", "type": error_type, "param": "temperature",
                              "code": "some_code"}}


@pytest.mark.parametrize("loc, param", [
    (("body", "temperature"), "temperature"),
    (("body", "messages", 0, "content", "str"), "messages.0.content"),
    (("body", "messages", 0, "content", "list[TextPart]", 0, "type"), "messages.0.content"),
    (("body", "prompt", "constrained-str"), "prompt"),
    (("body", "logit_bias", "5"), "logit_bias.5"),
    (("body",), None),
    (("body", 12), "12"),
])
def test_param_of_drops_body_and_union_member_tags(loc: tuple, param: str | None) -> None:
    assert param_of(loc) == param


def _errors(cls, **fields) -> list[dict]:
    with pytest.raises(ValidationError) as error:
        cls(**fields)
    return [{**e, "loc": ("body", *e["loc"])} for e in error.value.errors()]


def test_describe_validation_names_the_first_param_and_all_problems() -> None:
    errors = _errors(ChatCompletionRequest, model="m", messages=[], temperature=9)
    message, param = describe_validation(errors)
    assert param == param_of(errors[0]["loc"]) and param in ("messages", "temperature")
    assert "messages:" in message and "temperature:" in message


def test_describe_validation_of_unsupported_parameter_drops_pydantics_prefix() -> None:
    message, param = describe_validation(_errors(CompletionRequest, model="m", prompt="x", suffix="y"))
    assert param == "suffix" and message.startswith("suffix: suffix is not supported")


def test_describe_validation_of_invalid_json_and_non_object_bodies() -> None:
    invalid = [{"type": "json_invalid", "loc": ("body", 7), "msg": "JSON decode error",
                "ctx": {"error": "Expecting value"}}]
    assert describe_validation(invalid) == ("invalid JSON in the request body: Expecting value", None)
    not_object = [{"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be a valid dictionary"}]
    message, param = describe_validation(not_object)
    assert param is None and "JSON object" in message
