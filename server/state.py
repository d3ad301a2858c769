"""What every route needs: the server's state (config, model id, engine once loaded, metrics) and the
API-key check. The engine loads in the background, so routes that generate ask for `ready_engine`, which
answers 503 while the model loads or the server shuts down."""

from __future__ import annotations

import asyncio
import enum
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request

from engine.async_engine import AsyncLLMEngine
from engine.config import Config
from server.errors import AuthenticationError, InternalError, NotFoundError, UnavailableError
from server.metrics import ServerMetrics

T = TypeVar("T")


class Status(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


class ServerState:
    """One served model. ``engine`` is None until the background load finishes."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.model_id = config.served_model_name or Path(config.model).name
        self.status = Status.LOADING
        self.load_error: str | None = None
        self.engine: AsyncLLMEngine | None = None
        self.created = 0
        self.metrics = ServerMetrics(lambda: self.engine.stats() if self.engine is not None else None)
        # Tokenizer calls from the server run here, one at a time: off the event loop, never concurrently.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeserve-tokenizer")

    async def in_tokenizer_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a tokenizer call without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    def check_model(self, model: str | None) -> None:
        """404 (param "model") unless ``model`` is the served model id (None means the served model)."""
        if model is not None and model != self.model_id:
            raise NotFoundError(f"the model `{model}` does not exist; this server serves `{self.model_id}`",
                                param="model", code="model_not_found")


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def ready_engine(request: Request) -> AsyncLLMEngine:
    """The engine, or 503 while loading / shutting down, 500 if the model failed to load."""
    state = get_state(request)
    if state.status is Status.READY and state.engine is not None:
        return state.engine
    if state.status is Status.FAILED:
        raise InternalError(f"the model failed to load: {state.load_error}", code="model_load_failed")
    if state.status is Status.STOPPING:
        raise UnavailableError("the server is shutting down", code="shutting_down")
    raise UnavailableError("the model is still loading; retry shortly", code="model_loading")


def require_api_key(request: Request) -> None:
    """401 unless the request carries ``Authorization: Bearer <api_key>`` (when a key is configured).

    The comparison is constant-time."""
    key = get_state(request).config.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = key.get_secret_value().encode()
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected):
        raise AuthenticationError("invalid or missing API key (send Authorization: Bearer <key>)",
                                  code="invalid_api_key")
