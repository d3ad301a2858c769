"""The FastAPI application and how `moeserve serve` runs it.

`create_app(config)` returns an app whose lifespan starts loading the model in a worker thread and returns at
once, so the socket opens while the model loads (/health answers 503 until it is ready). On shutdown (SIGTERM:
uvicorn stops accepting and waits up to `GRACEFUL_SHUTDOWN_S` for in-flight requests) the engine aborts what
is still running after `ENGINE_SHUTDOWN_S` and its thread stops; `run_server` then returns and the process
exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from engine.async_engine import AsyncLLMEngine
from engine.config import Config
from engine.engine import LLMEngine
from server.errors import install_error_handlers
from server.routes import chat, completions, models, system, tokenize
from server.state import ServerState, Status

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 30
ENGINE_SHUTDOWN_S = 5
MAX_BODY_BYTES = 16 * 1024 * 1024

EngineFactory = Callable[[Config], LLMEngine]


def create_app(config: Config, engine_factory: EngineFactory = LLMEngine) -> FastAPI:
    """The OpenAI-compatible app for ``config.model``; ``engine_factory`` builds the engine (tests inject one)."""
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load(state, engine_factory))
        yield
        state.status = Status.STOPPING
        loading.cancel()
        if state.engine is not None:
            await state.engine.shutdown(timeout=ENGINE_SHUTDOWN_S)
        state.close()
        logger.info("engine stopped")

    app = FastAPI(title="moeserve", lifespan=lifespan, max_body_size=MAX_BODY_BYTES)
    app.state.server = state
    install_error_handlers(app)
    for module in (chat, completions, models, tokenize, system):
        app.include_router(module.router)
    return app


async def _load(state: ServerState, engine_factory: EngineFactory) -> None:
    """Build the engine off the event loop and start its step thread; FAILED (logged) if that raises."""
    logger.info("loading %s as %r", state.config.model, state.model_id)
    started = time.monotonic()
    try:
        engine = await asyncio.to_thread(engine_factory, state.config)
    except Exception as exc:
        logger.exception("loading the model failed")
        state.load_error = f"{type(exc).__name__}: {exc}"
        state.status = Status.FAILED
        return
    state.engine = AsyncLLMEngine(engine, max_waiting=state.config.max_waiting)
    state.engine.start()
    state.created = int(time.time())
    state.status = Status.READY
    logger.info("model %r ready in %.1f s (max_model_len %d)", state.model_id, time.monotonic() - started,
                engine.max_model_len)


def run_server(config: Config, engine_factory: EngineFactory = LLMEngine) -> int:
    """Serve until SIGTERM or SIGINT (Ctrl-C); returns 0 after a clean shutdown."""
    app = create_app(config, engine_factory)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, log_level=config.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    ))
    # uvicorn re-raises the signal it shut down on once it is done; these handlers make that a clean exit.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _log_clean_exit)
    server.run()
    return 0


def _log_clean_exit(signum: int, frame: object) -> None:
    logger.info("shut down cleanly on signal %d", signum)
