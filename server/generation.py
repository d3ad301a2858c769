"""The server side of the engine seam, shared by chat and completions: protocol parameters -> SamplingParams,
the context-length check, submitting prompts, merging their output streams, logprobs in OpenAI's shapes,
aborting on client disconnect, and the SSE response.

Every engine request started here is aborted when its HTTP request ends early: a streaming response closes
its body iterator (`EventStreamResponse`), a non-streaming one races the engine against the client's
disconnect (`collect_or_abort`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import Request
from fastapi.sse import format_sse_event
from starlette.responses import Response, StreamingResponse
from starlette.types import Send

from engine.async_engine import (AsyncLLMEngine, EngineFaultError, EngineOverloadedError, EngineStoppedError,
                                 RequestAbortedError, RequestStream)
from engine.request import RequestOutput, TokenLogprob
from engine.sampling import SamplingParams
from server.errors import APIError, BadRequestError, InternalError, OverloadedError, UnavailableError, error_body
from server.metrics import ServerMetrics
from server.protocol import SamplingFields, TopLogprob, TokenLogprobInfo

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499
_SAMPLING_PARAM_NAMES = {
    "n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "stop", "stop_token_ids", "logprobs", "top_logprobs",
    "prompt",
}


@dataclass(frozen=True)
class Prompt:
    """One prompt as the engine gets it, and its text for ``echo`` (None when not needed)."""

    token_ids: list[int]
    text: str | None = None


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
    """The engine's SamplingParams for a request; a value the engine rejects is a 400 naming the parameter."""
    try:
        return SamplingParams(
            n=body.n, max_tokens=max_tokens, min_tokens=body.min_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
            min_p=body.min_p or 0.0, seed=body.seed, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=body.logit_bias or {}, stop=body.stop or (), stop_token_ids=body.stop_token_ids or (),
            ignore_eos=body.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs,
        )
    except ValueError as exc:
        raise BadRequestError(str(exc), param=_param_in(str(exc))) from None


def _param_in(message: str) -> str | None:
    """The parameter an engine ValueError names (its messages start with it), if any."""
    first = message.split(" ", 1)[0].split("[", 1)[0]
    return first if first in _SAMPLING_PARAM_NAMES else None


def check_context_length(prompt_len: int, max_tokens: int | None, max_model_len: int,
                         prompt_param: str, max_tokens_param: str) -> None:
    """400 when the prompt leaves no room to generate, or prompt + max tokens exceed max_model_len."""
    if prompt_len >= max_model_len:
        raise BadRequestError(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has {prompt_len} "
            "tokens, leaving no room for the completion", param=prompt_param, code="context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise BadRequestError(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len} tokens "
            f"and {max_tokens_param} is {max_tokens} ({prompt_len + max_tokens} in total); reduce the prompt or "
            f"{max_tokens_param}", param=max_tokens_param, code="context_length_exceeded")


async def submit(engine: AsyncLLMEngine, request_id: str, prompts: Sequence[Prompt],
                 params: SamplingParams) -> list[RequestStream]:
    """Queue every prompt (ids ``request_id-i`` when several); engine refusals become API errors."""
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            engine_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            streams.append(await engine.add_request(engine_id, prompt.token_ids, params))
    except Exception as exc:
        _abandon(streams)
        raise _api_error(exc) from None
    except BaseException:
        _abandon(streams)
        raise
    return streams


def _abandon(streams: Sequence[RequestStream]) -> None:
    for stream in streams:
        stream.abandon()


def _api_error(exc: BaseException) -> BaseException:
    """The API error an engine exception maps to (others pass through unchanged)."""
    if isinstance(exc, EngineOverloadedError):
        return OverloadedError(str(exc), code="too_many_waiting_requests")
    if isinstance(exc, EngineStoppedError | RequestAbortedError):
        return UnavailableError(str(exc), code="shutting_down")
    if isinstance(exc, EngineFaultError):
        return InternalError(str(exc), code="engine_fault")
    if isinstance(exc, ValueError):
        return BadRequestError(str(exc), param=_param_in(str(exc)))
    return exc


async def merge(streams: Sequence[RequestStream], metrics: ServerMetrics) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from all streams as they come; engine errors become API errors.

    Leaving early abandons (aborts) every stream; each stream's last output is accounted in ``metrics``.
    """
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        last = None
        try:
            async for output in stream:
                last = output
                await queue.put((index, output))
            await queue.put((index, None))
        except Exception as exc:
            await queue.put((index, exc))
        finally:
            if last is not None:
                metrics.observe_finished(last, stream.times)

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise _api_error(item)
            if item is None:
                remaining -= 1
                continue
            yield index, item
    finally:
        _abandon(streams)
        for task in tasks:
            task.cancel()


async def collect_or_abort(request: Request, streams: Sequence[RequestStream],
                           metrics: ServerMetrics) -> list[RequestOutput] | None:
    """The final output of every stream, in order; None (with every request aborted) if the client left first."""

    async def collect() -> list[RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        async for index, output in merge(streams, metrics):
            finals[index] = output
        return [finals[i] for i in range(len(streams))]

    collecting = asyncio.ensure_future(collect())
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    await asyncio.wait({collecting, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    disconnected.cancel()
    if collecting.done():
        return collecting.result()
    collecting.cancel()
    _abandon(streams)
    logger.info("client disconnected; aborted %d engine request(s)", len(streams))
    return None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def client_closed() -> Response:
    """The response to a request whose client already left (nobody reads it)."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def sse(data: object) -> bytes:
    """One SSE event carrying ``data`` (a pydantic model, a dict or a raw string such as "[DONE]")."""
    if isinstance(data, str):
        return format_sse_event(data_str=data)
    if hasattr(data, "model_dump_json"):
        return format_sse_event(data_str=data.model_dump_json())
    return format_sse_event(data_str=json.dumps(data))


def sse_error(exc: Exception) -> bytes:
    """The error event that ends a stream that failed after it started."""
    if isinstance(exc, APIError):
        return sse(error_body(exc.status_code, exc.message, exc.param, exc.code))
    logger.exception("stream failed", exc_info=exc)
    return sse(error_body(500, f"internal error: {type(exc).__name__}", code="internal_error"))


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` whose body iterator is always closed when the response ends, however it ends
    (finished, client disconnect, cancellation): closing it aborts the engine requests behind it."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def chat_logprobs(logprobs: Sequence[TokenLogprob], tokenizer) -> list[TokenLogprobInfo]:
    """OpenAI chat logprobs (``choices[i].logprobs.content``) of generated tokens."""
    return [
        TokenLogprobInfo(**_token_info(lp.token_id, lp.logprob, tokenizer),
                         top_logprobs=[TopLogprob(**_token_info(t, v, tokenizer)) for t, v in lp.top_logprobs])
        for lp in logprobs
    ]


def _token_info(token_id: int, logprob: float, tokenizer) -> dict:
    token = tokenizer.decode([token_id])
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def _finite(value: float) -> float:
    """-inf logprobs (masked tokens) as the most negative float, since JSON has no infinity."""
    return max(value, -9999.0)
