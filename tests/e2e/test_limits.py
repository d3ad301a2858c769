"""API key (from MOESERVE_API_KEY) and the waiting-queue limit (429), on a server started with environment
configuration: MOESERVE_MAX_NUM_SEQS=1 runs one sequence at a time, MOESERVE_MAX_WAITING=1 queues one more."""

from __future__ import annotations

import httpx
import openai
import pytest
from harness import Server, serve_argv, start_server, stop_server, wait_until

pytestmark = pytest.mark.slow

KEY = "s3cret-key"
MODEL = "demo"
LONG = {"model": MODEL, "prompt": "import os", "max_tokens": 2000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(demo_model, tmp_path_factory) -> Server:
    env = {"MOESERVE_API_KEY": KEY, "MOESERVE_MAX_NUM_SEQS": "1", "MOESERVE_MAX_WAITING": "1"}
    proc = start_server(serve_argv(demo_model(), "--served-model-name", MODEL),
                        tmp_path_factory.mktemp("server") / "server.log", env)
    yield proc
    stop_server(proc)


def _client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=key, max_retries=0, timeout=60)


@pytest.mark.parametrize("key", ["wrong-key", KEY + "x", KEY[:-1]])
def test_wrong_api_key_is_an_authentication_error(server: Server, key: str) -> None:
    with pytest.raises(openai.AuthenticationError) as error:
        _client(server, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert error.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(server, key).models.list()


def test_missing_api_key_is_401_with_an_error_object(server: Server) -> None:
    response = httpx.post(f"{server.api_url}/completions", json={"model": MODEL, "prompt": "x"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_right_api_key_is_served_and_health_and_metrics_need_none(server: Server) -> None:
    result = _client(server, KEY).completions.create(model=MODEL, prompt="import os", max_tokens=2)
    assert result.usage.completion_tokens <= 2
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200


def test_full_waiting_queue_answers_429(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.api_url}/completions"
    with httpx.stream("POST", url, json=LONG, headers=headers, timeout=60) as running:
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")  # the first request runs (max_num_seqs 1) ...
        with httpx.stream("POST", url, json=LONG, headers=headers, timeout=60) as waiting:
            assert waiting.status_code == 200  # ... the second was accepted, and waits (max_waiting 1) ...
            assert server.metrics()["moeserve:num_requests_waiting"] == 1
            with pytest.raises(openai.RateLimitError) as error:  # ... so a third is refused
                _client(server, KEY).completions.create(model=MODEL, prompt="import os", max_tokens=2)
    assert "max_waiting 1" in error.value.body["message"]
    wait_until(lambda: server.metrics()["moeserve:kv_cache_usage_perc"] == 0
               and server.metrics()["moeserve:num_requests_running"] == 0, timeout=30, what="both aborted")
