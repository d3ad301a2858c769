"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, for every failure.

`APIError` (and its subclasses, one per status) is what route code raises; the handlers installed by
`install_error_handlers` render it, FastAPI's request validation errors (as 400, not 422, with ``param`` the
dotted path of the offending field), Starlette's HTTP errors (404 unknown route, 405, 413) and any other
exception (500, logged with its traceback).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# Location elements pydantic adds for the members of a union ("str", "list[TextPart]", "constrained-str").
_UNION_TAG_MARKERS = ("[", "constrained-", "function-")
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}

# Error types of a body that is not a JSON object (e.g. sent with another Content-Type, or a JSON array).
_NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "model_type", "missing"}

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error response: HTTP status, message, and optionally the parameter at fault and a code."""

    status_code = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class BadRequestError(APIError):
    status_code = 400


class AuthenticationError(APIError):
    status_code = 401


class NotFoundError(APIError):
    status_code = 404


class OverloadedError(APIError):
    status_code = 429


class InternalError(APIError):
    status_code = 500


class UnavailableError(APIError):
    status_code = 503


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    error_type = _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=code)).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def param_of(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content", "str")`` -> ``"messages.0.content"``; None for the body itself."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    kept = []
    for part in parts:
        if isinstance(part, str) and (part in _UNION_TAGS or any(m in part for m in _UNION_TAG_MARKERS)):
            break
        kept.append(str(part))
    return ".".join(kept) or None


def describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) of a list of pydantic errors: the first error's parameter, every error's message."""
    if not errors:
        return "invalid request", None
    param = param_of(tuple(errors[0].get("loc", ())))
    if errors[0].get("type") == "json_invalid":
        return f"invalid JSON in the request body: {errors[0].get('ctx', {}).get('error', 'malformed')}", None
    if param is None and errors[0].get("type") in _NOT_AN_OBJECT:
        return "the request body must be a JSON object, sent with Content-Type: application/json", None
    messages = []
    for error in errors:
        where = param_of(tuple(error.get("loc", ())))
        text = error.get("msg", "invalid value").removeprefix("Value error, ")
        messages.append(f"{where}: {text}" if where else text)
    return "; ".join(dict.fromkeys(messages)), param


def install_error_handlers(app: FastAPI) -> None:
    """Render every error of ``app`` in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(list(exc.errors()))
        return error_response(400, message, param)

    @app.exception_handler(ValidationError)
    async def _model_validation_error(request: Request, exc: ValidationError) -> JSONResponse:
        message, param = describe_validation(list(exc.errors()))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", code="internal_error")
