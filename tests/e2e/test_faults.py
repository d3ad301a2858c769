"""An engine fault (injected: the engine raises from step) is a 500 with an error object, or an error event
that ends a stream already started; the requests it hit are aborted and the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from harness import Server, start_server, stop_server, wait_until

pytestmark = pytest.mark.slow

MODEL = "demo"
SCRIPT = Path(__file__).with_name("faulty_server.py")


@pytest.fixture(scope="module")
def server(demo_model, tmp_path_factory) -> Server:
    proc = start_server([str(SCRIPT), str(demo_model()), "--max-model-len", "256"],
                        tmp_path_factory.mktemp("server") / "server.log")
    yield proc
    stop_server(proc)


def _idle(server: Server) -> bool:
    metrics = server.metrics()
    return metrics["moeserve:num_requests_running"] == 0 and metrics["moeserve:kv_cache_usage_perc"] == 0


def test_fault_is_a_500_error_object(server: Server) -> None:
    response = httpx.post(f"{server.api_url}/completions", timeout=60,
                          json={"model": MODEL, "prompt": "import os", "max_tokens": 8, "ignore_eos": True})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "internal_server_error" and error["code"] == "engine_fault"
    assert "injected fault" in error["message"]
    wait_until(lambda: _idle(server), timeout=10, what="the faulted request's KV blocks freed")


def test_fault_through_the_sdk_is_an_internal_server_error(server: Server) -> None:
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       extra_body={"ignore_eos": True})


def test_fault_mid_stream_sends_an_error_event_then_closes(server: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.api_url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    error = json.loads(events[-1])["error"]
    assert error["code"] == "engine_fault" and "[DONE]" not in events


def test_server_keeps_serving_after_a_fault(server: Server) -> None:
    response = httpx.post(f"{server.api_url}/completions", timeout=60,
                          json={"model": MODEL, "prompt": "import os", "max_tokens": 1})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 1
    assert httpx.get(f"{server.base_url}/health").status_code == 200
