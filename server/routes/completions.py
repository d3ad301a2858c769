"""POST /v1/completions: a prompt as a string, a list of strings, token ids or a list of token-id lists.

Each prompt is its own engine request with n completions; choice ``index`` is ``prompt_index * n + i``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from engine.request import CompletionOutput, RequestOutput
from server.errors import BadRequestError
from server.generation import (EventStreamResponse, Prompt, check_context_length, client_closed, collect_or_abort,
                               merge, sampling_params, sse, sse_error, submit)
from server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo,
                             now, random_id)
from server.state import ServerState, get_state, ready_engine, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


def tokenize_prompts(tokenizer, prompt: str | list, echo: bool) -> list[Prompt]:
    """The request's prompts as token ids (strings tokenized with the tokenizer's special tokens)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    result = []
    for p in prompts:
        if isinstance(p, str):
            result.append(Prompt(tokenizer(p).input_ids, p if echo else None))
        else:
            result.append(Prompt(list(p), tokenizer.decode(p) if echo else None))
    return result


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> Response | dict:
    state = get_state(request)
    state.check_model(body.model)
    engine = ready_engine(request)
    if body.echo and body.logprobs is not None:
        raise BadRequestError("echo with logprobs is not supported (prompt logprobs are not computed)", param="echo")
    prompts = await state.in_tokenizer_thread(tokenize_prompts, engine.tokenizer, body.prompt, body.echo)
    for prompt in prompts:
        check_context_length(len(prompt.token_ids), body.max_tokens, engine.max_model_len, "prompt", "max_tokens")
    params = sampling_params(body, body.max_tokens, body.logprobs is not None, body.logprobs or 0)
    request_id = random_id("cmpl")
    streams = await submit(engine, request_id, prompts, params)
    if body.stream:
        return EventStreamResponse(_stream(state, body, request_id, prompts, streams))
    finals = await collect_or_abort(request, streams, state.metrics)
    if finals is None:
        return client_closed()
    choices = [_choice(state, body, p * body.n + c.index, c, (prompts[p].text or "") + c.text, c.token_ids, 0)
               for p, output in enumerate(finals) for c in output.outputs]
    return CompletionResponse(id=request_id, created=now(), model=state.model_id, choices=choices,
                              usage=_usage(finals)).model_dump()


def _choice(state: ServerState, body: CompletionRequest, index: int, completion: CompletionOutput,
            text: str, token_ids: Sequence[int], first_token: int) -> CompletionChoice:
    """A choice carrying ``text`` (a delta when streaming) and the logprobs of its tokens from ``first_token``."""
    logprobs = None
    if body.logprobs is not None:
        logprobs = _logprobs(state.engine.tokenizer, completion.logprobs[first_token:first_token + len(token_ids)])
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=completion.finish_reason)


def _logprobs(tokenizer, logprobs) -> CompletionLogprobs:
    """OpenAI's legacy logprobs: tokens, their logprobs, top alternatives, offsets within the delta's text."""
    result = CompletionLogprobs()
    offset = 0
    for lp in logprobs:
        token = tokenizer.decode([lp.token_id])
        result.tokens.append(token)
        result.token_logprobs.append(max(lp.logprob, -9999.0))
        result.top_logprobs.append({tokenizer.decode([t]): max(v, -9999.0) for t, v in lp.top_logprobs})
        result.text_offset.append(offset)
        offset += len(token)
    return result


def _usage(outputs: Sequence[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@dataclass
class _Cursor:
    """What a stream has sent of one choice; ``prefix`` (the echoed prompt) goes out with its first chunk."""

    prefix: str = ""
    chars: int = 0
    tokens: int = 0
    done: bool = False


def _next_choice(state: ServerState, body: CompletionRequest, index: int, completion: CompletionOutput,
                 cursor: _Cursor) -> CompletionChoice | None:
    """The chunk choice carrying what ``completion`` has beyond ``cursor`` (None if nothing to send yet)."""
    text = completion.text[cursor.chars:]
    if cursor.done or not (text or completion.finished or cursor.prefix):
        return None
    choice = _choice(state, body, index, completion, cursor.prefix + text, completion.token_ids[cursor.tokens:],
                     cursor.tokens)
    cursor.prefix, cursor.chars, cursor.tokens = "", len(completion.text), len(completion.token_ids)
    cursor.done = completion.finished
    return choice


async def _stream(state: ServerState, body: CompletionRequest, request_id: str, prompts: list[Prompt],
                  streams) -> AsyncIterator[bytes]:
    """SSE: text deltas per choice (the echoed prompt first), a finish chunk per choice, usage if asked, [DONE]."""
    created = now()
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    cursors = [_Cursor(prefix=prompt.text or "") for prompt in prompts for _ in range(body.n)]
    finals: dict[int, RequestOutput] = {}
    try:
        async for p, output in merge(streams, state.metrics):
            finals[p] = output
            choices = [_next_choice(state, body, p * body.n + c.index, c, cursors[p * body.n + c.index])
                       for c in output.outputs]
            if any(choices):
                yield sse(CompletionResponse(id=request_id, created=created, model=state.model_id,
                                             choices=[c for c in choices if c is not None]))
    except Exception as exc:
        yield sse_error(exc)
        return
    if include_usage:
        yield sse(CompletionResponse(id=request_id, created=created, model=state.model_id, choices=[],
                                     usage=_usage([finals[p] for p in sorted(finals)])))
    yield sse("[DONE]")
