"""POST /tokenize and /detokenize (vLLM's shapes): a prompt or chat messages to token ids, and back."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.routes.chat import apply_chat_template
from server.state import get_state, ready_engine, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


def _tokenize(tokenizer, body: TokenizeRequest) -> list[int]:
    if body.messages is not None:
        return apply_chat_template(tokenizer, body.messages, body.add_generation_prompt, None)
    return tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = get_state(request)
    state.check_model(body.model)
    engine = ready_engine(request)
    tokens = await state.in_tokenizer_thread(_tokenize, engine.tokenizer, body)
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = get_state(request)
    state.check_model(body.model)
    engine = ready_engine(request)
    return DetokenizeResponse(prompt=await state.in_tokenizer_thread(engine.tokenizer.decode, body.tokens))
