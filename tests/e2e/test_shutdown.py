"""SIGTERM: the server stops accepting connections, lets the stream in flight finish, and exits 0."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from harness import Server, serve_argv, start_server, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture
def server(demo_model, tmp_path) -> Server:
    proc = start_server(serve_argv(demo_model(), "--served-model-name", "demo"), tmp_path / "server.log")
    yield proc
    stop_server(proc)


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(server: Server) -> None:
    body = {"model": "demo", "prompt": "import os", "max_tokens": 300, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.api_url}/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        server.process.send_signal(signal.SIGTERM)
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 300
    assert server.process.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/health", timeout=5)
