"""POST /v1/chat/completions: messages through the model's chat template, one engine request with n choices."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from jinja2 import TemplateError
from fastapi.responses import Response

from engine.request import CompletionOutput, RequestOutput
from server.errors import BadRequestError
from server.generation import (EventStreamResponse, Prompt, chat_logprobs, check_context_length, client_closed,
                               collect_or_abort, merge, sampling_params, sse, sse_error, submit)
from server.protocol import (AssistantMessage, ChatCompletionChoice, ChatCompletionChunk, ChatCompletionRequest,
                             ChatCompletionResponse, ChatCompletionStreamChoice, ChatLogprobs, DeltaMessage,
                             UsageInfo, now, random_id)
from server.state import ServerState, get_state, ready_engine, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


def apply_chat_template(tokenizer, body_messages, add_generation_prompt: bool, kwargs: dict | None) -> list[int]:
    """Token ids of the conversation rendered by the tokenizer's chat template (400 if it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequestError("this model has no chat template; use /v1/completions with a prompt instead",
                              param="messages", code="no_chat_template")
    messages = [{"role": m.role, "content": m.text()} for m in body_messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                             **(kwargs or {}))
    except (TemplateError, TypeError, ValueError) as exc:
        raise BadRequestError(f"the chat template rejected the messages: {exc}", param="messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response | dict:
    state = get_state(request)
    state.check_model(body.model)
    engine = ready_engine(request)
    token_ids = await state.in_tokenizer_thread(
        apply_chat_template, engine.tokenizer, body.messages, body.add_generation_prompt, body.chat_template_kwargs)
    max_tokens = body.max_completion_tokens or body.max_tokens
    max_tokens_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    check_context_length(len(token_ids), max_tokens, engine.max_model_len, "messages", max_tokens_param)
    params = sampling_params(body, max_tokens, body.logprobs, body.top_logprobs or 0)
    request_id = random_id("chatcmpl")
    streams = await submit(engine, request_id, [Prompt(token_ids)], params)
    if body.stream:
        return EventStreamResponse(_stream(state, body, request_id, streams))
    finals = await collect_or_abort(request, streams, state.metrics)
    if finals is None:
        return client_closed()
    return _response(state, body, request_id, finals[0]).model_dump()


def _response(state: ServerState, body: ChatCompletionRequest, request_id: str,
              output: RequestOutput) -> ChatCompletionResponse:
    tokenizer = state.engine.tokenizer
    choices = [
        ChatCompletionChoice(
            index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
            logprobs=ChatLogprobs(content=chat_logprobs(c.logprobs, tokenizer)) if body.logprobs else None,
        )
        for c in output.outputs
    ]
    return ChatCompletionResponse(id=request_id, model=state.model_id, choices=choices, usage=_usage(output))


def _usage(output: RequestOutput) -> UsageInfo:
    prompt = len(output.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in output.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@dataclass
class _Sent:
    """What a stream has sent of one choice."""

    chars: int = 0
    tokens: int = 0
    done: bool = False


def _delta(completion: CompletionOutput, sent: _Sent, logprobs: bool, tokenizer) -> ChatCompletionStreamChoice | None:
    """The chunk choice carrying what ``completion`` has beyond ``sent`` (None if nothing to send yet)."""
    text = completion.text[sent.chars:]
    if sent.done or (not text and not completion.finished):
        return None
    new_logprobs = None
    if logprobs:
        new_logprobs = ChatLogprobs(content=chat_logprobs(completion.logprobs[sent.tokens:], tokenizer))
    sent.chars, sent.tokens, sent.done = len(completion.text), len(completion.token_ids), completion.finished
    return ChatCompletionStreamChoice(index=completion.index, delta=DeltaMessage(content=text or None),
                                      logprobs=new_logprobs, finish_reason=completion.finish_reason)


async def _stream(state: ServerState, body: ChatCompletionRequest, request_id: str, streams) -> AsyncIterator[bytes]:
    """SSE: a role chunk per choice, content deltas, a finish chunk per choice, usage if asked, [DONE]."""
    created = now()
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    tokenizer = state.engine.tokenizer

    def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> bytes:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=state.model_id, choices=choices,
                                       usage=usage))

    yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                 for i in range(body.n)])
    sent = [_Sent() for _ in range(body.n)]
    last = None
    try:
        async for _, output in merge(streams, state.metrics):
            last = output
            deltas = [_delta(c, sent[c.index], body.logprobs, tokenizer) for c in output.outputs]
            if any(deltas):
                yield chunk([d for d in deltas if d is not None])
    except Exception as exc:
        yield sse_error(exc)
        return
    if include_usage and last is not None:
        yield chunk([], _usage(last))
    yield sse("[DONE]")
