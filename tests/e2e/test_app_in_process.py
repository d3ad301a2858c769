"""The app in process (Starlette's TestClient drives its lifespan), for what a subprocess cannot pin down.

The model loads in the background after the app starts: /health is 503 (and generation 503) until it is
ready, 200 after; a load that fails is a 500 naming the error (the engine factory is injected so the test
decides when loading ends). A model without a chat template answers chat requests with a 400 that says so.
"""

from __future__ import annotations

import shutil
import threading

import pytest
from fastapi.testclient import TestClient
from harness import wait_until

from engine.config import load_config
from engine.engine import LLMEngine
from server.app import create_app

pytestmark = pytest.mark.slow

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _config(model_dir):
    return load_config(overrides={"model": str(model_dir), "max_model_len": 128, "served_model_name": "demo"})


def test_health_is_503_while_loading_then_200(demo_model) -> None:
    release = threading.Event()

    def slow_engine(config):
        release.wait(timeout=60)
        return LLMEngine(config)

    with TestClient(create_app(_config(demo_model()), engine_factory=slow_engine)) as client:
        try:
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["error"]["code"] == "model_loading"
            chat = client.post("/v1/chat/completions", json=CHAT)
            assert chat.status_code == 503 and chat.json()["error"]["type"] == "service_unavailable_error"
            assert client.get("/v1/models").json()["data"][0]["id"] == "demo"
        finally:
            release.set()
        wait_until(lambda: client.get("/health").status_code == 200, timeout=60, what="the model to load")
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_failed_load_is_a_500_naming_the_error(tmp_path) -> None:
    def broken_engine(config):
        raise OSError("checkpoint unreadable")

    (tmp_path / "model").mkdir()
    with TestClient(create_app(_config(tmp_path / "model"), engine_factory=broken_engine)) as client:
        wait_until(lambda: client.get("/health").status_code != 503, timeout=30, what="the load to fail")
        health = client.get("/health")
        assert health.status_code == 500 and "checkpoint unreadable" in health.json()["error"]["message"]
        chat = client.post("/v1/chat/completions", json=CHAT)
        assert chat.status_code == 500 and chat.json()["error"]["code"] == "model_load_failed"


def test_model_without_chat_template_is_a_400_that_says_so(demo_model, tmp_path) -> None:
    model_dir = tmp_path / "no-template"
    shutil.copytree(demo_model(), model_dir)
    (model_dir / "chat_template.jinja").unlink()
    with TestClient(create_app(_config(model_dir))) as client:
        wait_until(lambda: client.get("/health").status_code == 200, timeout=60, what="the model to load")
        chat = client.post("/v1/chat/completions", json=CHAT)
        assert chat.status_code == 400
        assert chat.json()["error"]["param"] == "messages" and "no chat template" in chat.json()["error"]["message"]
        completion = client.post("/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 2})
        assert completion.status_code == 200
