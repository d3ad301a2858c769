"""The engine behind an asyncio server: `LLMEngine` steps in its own thread; each request gets an asyncio queue.

The event loop never runs engine code. It hands commands (add, abort, shut down) to the step thread through a
locked deque and a condition variable; the thread applies them between steps, steps while any request is
unfinished, and sleeps on the condition when idle (no busy loop). Outputs go back to each request's asyncio
queue with ``loop.call_soon_threadsafe``.

    engine = AsyncLLMEngine(LLMEngine(config))
    engine.start()                                   # from the event loop that will consume outputs
    stream = await engine.add_request("r1", token_ids, SamplingParams(max_tokens=8))
    async for output in stream:                      # cumulative RequestOutputs; the last is finished
        ...
    await engine.shutdown(timeout=30)

Leaving the ``async for`` early (a client went away) or calling ``engine.abort(id)`` aborts the request in the
engine, which frees its KV blocks. A fault in a step fails every request in flight with `EngineFaultError`
(their sequences are aborted, so nothing leaks) and the engine keeps serving new requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from engine.engine import LLMEngine, Prompt
from engine.request import RequestOutput, RequestTimes
from engine.sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineFaultError(RuntimeError):
    """The engine raised while stepping; every request in flight at that step fails with this error."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (``max_waiting``): the request was not queued."""


class RequestAbortedError(RuntimeError):
    """The request was aborted with `AsyncLLMEngine.abort` while its stream was being consumed."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down or stopped: the request was not queued, or was aborted by the shutdown."""


class RequestStream:
    """The outputs of one request, as an async iterator; leaving the iteration early aborts the request.

    Items are cumulative `RequestOutput`s; iteration ends after the finished one. A step fault raises
    `EngineFaultError`, an abort by shutdown `EngineStoppedError`, one by `AsyncLLMEngine.abort`
    `RequestAbortedError`, from ``__anext__``.
    """

    def __init__(self, request_id: str, engine: AsyncLLMEngine) -> None:
        self.request_id = request_id
        self.times = RequestTimes()
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False
        self._iterator = self._iterate()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called on the event loop (via call_soon_threadsafe) by the step thread."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterator

    async def aclose(self) -> None:
        """Stop consuming: aborts the request unless it finished (idempotent; also before any iteration)."""
        await self._iterator.aclose()
        self.abandon()

    def abandon(self) -> None:
        """Abort the request unless it finished; synchronous, so it is safe in any ``finally``."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.abandon()


@dataclass
class _Add:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    stream: RequestStream
    accepted: asyncio.Future[None]


class AsyncLLMEngine:
    """Runs an `LLMEngine` in a thread for one asyncio event loop: the one that called `start`, where the
    coroutines (`add_request`, `shutdown`) must run; `abort` and `stats` may be called from any thread.

    ``max_waiting``: sequences waiting in the scheduler beyond which `add_request` raises
    `EngineOverloadedError` (None = no limit).
    """

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: deque[_Add | str] = deque()
        self._aborts: deque[str] = deque()
        self._wakeup = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = engine.stats()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        """Start the step thread; outputs are delivered to the event loop running in the calling thread."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="moeserve-engine", daemon=True)
        self._thread.start()

    async def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it.

        Raises ValueError (invalid request, e.g. token ids out of the vocabulary, prompt too long),
        `EngineOverloadedError` (waiting queue full) or `EngineStoppedError` (shutting down).
        """
        if not self.is_running:
            raise EngineStoppedError("the engine is not running")
        stream = RequestStream(request_id, self)
        accepted = self._loop.create_future()
        self._submit(_Add(request_id, prompt, params, stream, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request between steps (frees its KV blocks); a no-op for unknown or finished requests."""
        with self._wakeup:
            self._aborts.append(request_id)
            self._wakeup.notify()

    def stats(self) -> dict[str, Any]:
        """`LLMEngine.stats()` as of the end of the last step or command (a consistent snapshot)."""
        return self._stats

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting requests, let in-flight ones finish for up to ``timeout`` seconds, abort the rest
        (their streams raise `EngineStoppedError`) and stop the thread."""
        deadline = time.monotonic() + timeout
        with self._wakeup:
            self._stopping = True
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._submit("shutdown")
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _submit(self, command: _Add | str) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    def _run(self) -> None:
        """The step thread: apply commands, step while requests are unfinished, sleep when idle."""
        logger.info("engine step loop started")
        while True:
            with self._wakeup:
                while not (self._commands or self._aborts or self.engine.has_unfinished_requests()):
                    self._wakeup.wait()
                commands, self._commands = list(self._commands), deque()
                aborts, self._aborts = list(self._aborts), deque()
            if not self._apply(commands):
                break
            for request_id in aborts:
                self._abort_now(request_id)
            self._stats = self.engine.stats()
            if self.engine.has_unfinished_requests():
                self._step()
                self._stats = self.engine.stats()
        self.engine.close()
        logger.info("engine step loop stopped")

    def _apply(self, commands: list[_Add | str]) -> bool:
        """Apply queued commands; False once a shutdown command is seen (remaining requests are aborted)."""
        for command in commands:
            if command == "shutdown":
                for request_id in list(self._streams):
                    self._abort_now(request_id, EngineStoppedError("the server is shutting down"))
                for pending in commands:
                    if isinstance(pending, _Add):
                        self._resolve(pending.accepted, EngineStoppedError("the server is shutting down"))
                self._stats = self.engine.stats()
                return False
            self._add(command)
        return True

    def _add(self, command: _Add) -> None:
        num_waiting = self.engine.scheduler.num_waiting
        if self._stopping:
            self._resolve(command.accepted, EngineStoppedError("the server is shutting down"))
        elif self.max_waiting is not None and num_waiting >= self.max_waiting:
            self._resolve(command.accepted, EngineOverloadedError(
                f"the waiting queue is full ({num_waiting} waiting, max_waiting {self.max_waiting})"))
        else:
            try:
                self.engine.add_request(command.request_id, command.prompt, command.params)
            except ValueError as exc:
                self._resolve(command.accepted, exc)
                return
            except Exception as exc:
                logger.exception("adding request %s failed", command.request_id)
                self._resolve(command.accepted, EngineFaultError(f"the engine failed: {type(exc).__name__}: {exc}"))
                return
            self._streams[command.request_id] = command.stream
            self._stats = self.engine.stats()  # a caller told "accepted" sees the request in stats()
            self._resolve(command.accepted, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing the %d requests in flight", len(self._streams))
            for request_id in list(self._streams):
                self._abort_now(request_id, EngineFaultError(f"the engine failed: {type(exc).__name__}: {exc}"))
            return
        now = time.monotonic()
        self._mark_scheduled(now)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if stream.times.first_token is None and any(o.token_ids for o in output.outputs):
                stream.times.first_token = now
            if output.finished:
                del self._streams[output.request_id]
            self._loop.call_soon_threadsafe(stream.put, output)

    def _mark_scheduled(self, now: float) -> None:
        """Record when each request first ran (its queue time ends there)."""
        for seq in self.engine.scheduler.running:
            stream = self._streams.get(seq.parent_id)
            if stream is not None and stream.times.scheduled is None:
                stream.times.scheduled = now

    def _abort_now(self, request_id: str, error: BaseException | None = None) -> None:
        """Abort in the engine (frees KV blocks); the stream, if still iterated, raises ``error``."""
        self.engine.abort(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            error = error or RequestAbortedError(f"request {request_id} was aborted")
            self._loop.call_soon_threadsafe(stream.put, error)

    def _resolve(self, future: asyncio.Future[None], error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        self._loop.call_soon_threadsafe(settle)
