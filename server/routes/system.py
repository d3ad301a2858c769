"""GET /health (200 ready, 503 loading or shutting down, 500 load failed), /version and /metrics; no API key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from engine import __version__
from server.errors import error_response
from server.state import Status, get_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    state = get_state(request)
    if state.status is Status.READY:
        return Response(status_code=200)
    if state.status is Status.FAILED:
        return error_response(500, f"the model failed to load: {state.load_error}", code="model_load_failed")
    if state.status is Status.STOPPING:
        return error_response(503, "the server is shutting down", code="shutting_down")
    return error_response(503, "the model is still loading", code="model_loading")


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
