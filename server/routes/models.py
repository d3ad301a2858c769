"""GET /v1/models and /v1/models/{id}: the one served model (known before it finishes loading)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.protocol import ModelCard, ModelList
from server.state import ServerState, get_state, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


def _card(state: ServerState) -> ModelCard:
    max_model_len = state.engine.max_model_len if state.engine is not None else state.config.max_model_len
    return ModelCard(id=state.model_id, created=state.created, root=state.config.model, max_model_len=max_model_len)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(get_state(request))])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    state = get_state(request)
    state.check_model(model_id)
    return _card(state)
