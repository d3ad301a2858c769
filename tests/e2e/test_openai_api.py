"""The server through the real OpenAI SDK and raw HTTP, as users reach it: one `moeserve serve` subprocess.

The demo model has random weights, so texts are noise; the tests compare the server with itself (stream vs
non-stream, same seed twice, a stop string cut where it first appears) and check every field's shape.
"""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from harness import Server, serve_argv, start_server, stop_server, wait_until

pytestmark = pytest.mark.slow

MODEL = "demo"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Reverse a list."}]


@pytest.fixture(scope="module")
def server(demo_model, tmp_path_factory) -> Server:
    proc = start_server(serve_argv(demo_model(), "--served-model-name", MODEL),
                        tmp_path_factory.mktemp("server") / "server.log")
    yield proc
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE response, as curl would print them."""
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


# --- chat ---


def test_chat_completion_has_openai_shape(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-") and result.model == MODEL
    assert result.created > 0
    [choice] = result.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)
    assert result.usage.completion_tokens <= 6 and result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_max_completion_tokens_limits_the_completion(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3,
                                            extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 3 and result.choices[0].finish_reason == "length"


def test_every_sampling_parameter_is_accepted(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0.7, top_p=0.9, n=2, stop=["\n\n"], seed=5,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"7": 1.5}, user="tester",
        extra_body={"top_k": 20, "min_p": 0.01, "min_tokens": 1, "repetition_penalty": 1.1,
                    "stop_token_ids": [2], "ignore_eos": False})
    assert len(result.choices) == 2 and result.usage.completion_tokens >= 2


def test_logit_bias_forces_a_token(server: Server, client: openai.OpenAI) -> None:
    result = client.completions.create(model=MODEL, prompt="import os", max_tokens=3, temperature=0,
                                       logit_bias={"300": 100}, extra_body={"ignore_eos": True})
    forced = httpx.post(f"{server.base_url}/detokenize", json={"tokens": [300, 300, 300]}).json()["prompt"]
    assert result.choices[0].text == forced


def test_chat_content_as_text_parts_equals_string_content(client: openai.OpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Reverse "}, {"type": "text", "text": "a list."}]}]
    as_parts = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=5, temperature=0)
    as_string = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Reverse a list."}], max_tokens=5, temperature=0)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert as_parts.usage == as_string.usage


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 7)])
def test_chat_stream_joins_to_the_non_streamed_text(client: openai.OpenAI, temperature: float, seed) -> None:
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=temperature, seed=seed)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_n2_returns_two_indexed_choices(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=2, temperature=1.0,
                                            seed=3)
    assert [c.index for c in result.choices] == [0, 1]
    assert result.choices[0].message.content != result.choices[1].message.content
    assert result.usage.completion_tokens == 12 or any(c.finish_reason == "stop" for c in result.choices)


def test_seed_reproduces_sampled_completions(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0,
                                              seed=seed).choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_stop_string_cuts_the_text_before_its_first_occurrence(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt="def reverse(items):", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    match = re.search(r"[A-Za-z]{2}", plain[2:])
    assert match, f"greedy text has no two-letter word to stop on: {plain!r}"
    stop = match.group(0)
    stopped = client.completions.create(model=MODEL, prompt="def reverse(items):", max_tokens=12, temperature=0,
                                        stop=[stop, "@@never@@"], extra_body={"ignore_eos": True}).choices[0]
    assert stopped.text == plain[: plain.index(stop)]
    assert stopped.finish_reason == "stop"


def test_chat_logprobs_with_top_alternatives(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)  # greedy: the chosen one is the top
        assert token.bytes == list(token.token.encode())


# --- completions ---


def test_completion_prompts_as_strings_and_token_ids_agree(server: Server, client: openai.OpenAI) -> None:
    ids = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "def reverse(items):"}).json()
    by_text = client.completions.create(model=MODEL, prompt="def reverse(items):", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids["tokens"], max_tokens=5, temperature=0)
    assert by_text.object == "text_completion" and by_text.id.startswith("cmpl-")
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage == by_text.usage and by_text.usage.prompt_tokens == ids["count"]


def test_completion_list_of_prompts_times_n(client: openai.OpenAI) -> None:
    result = client.completions.create(model=MODEL, prompt=[[9, 8, 7, 6], [5, 17, 42]], max_tokens=3, n=2,
                                       temperature=0)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    single = client.completions.create(model=MODEL, prompt=[5, 17, 42], max_tokens=3, temperature=0)
    assert result.choices[2].text == result.choices[3].text == single.choices[0].text
    assert result.usage.prompt_tokens == 7
    strings = client.completions.create(model=MODEL, prompt=["import os", "def f():"], max_tokens=2)
    assert [c.index for c in strings.choices] == [0, 1]


def test_completion_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt="import os", max_tokens=4, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt="import os", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "import os" + plain.choices[0].text


def test_completion_logprobs(client: openai.OpenAI) -> None:
    result = client.completions.create(model=MODEL, prompt="import os", max_tokens=4, temperature=0, logprobs=2)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == result.choices[0].text
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(lp)
               for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))


@pytest.mark.parametrize("echo", [False, True])
def test_completion_stream_with_several_prompts_joins_per_choice(client: openai.OpenAI, echo: bool) -> None:
    kwargs = dict(model=MODEL, prompt=["import os", "def f():"], max_tokens=6, temperature=0, echo=echo)
    whole = client.completions.create(**kwargs)
    texts = ["", ""]
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]
    assert [t.startswith(p) for t, p in zip(texts, kwargs["prompt"])] == [echo, echo]


# --- errors through the SDK ---


def test_sdk_bad_request_for_bad_parameters_and_context_overflow(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3000)
    assert overflow.value.body["param"] == "max_tokens" and overflow.value.body["code"] == "context_length_exceeded"
    assert "2048" in overflow.value.body["message"] and "3000" in overflow.value.body["message"]
    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.completions.create(model=MODEL, prompt=[10] * 2100, max_tokens=1)
    assert long_prompt.value.body["param"] == "prompt" and "2100" in long_prompt.value.body["message"]


def test_sdk_not_found_for_an_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-5", messages=MESSAGES)
    assert missing.value.body["param"] == "model" and missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    [card] = client.models.list().data
    assert card.id == MODEL and card.object == "model" and card.owned_by == "moeserve"
    assert client.models.retrieve(MODEL).id == MODEL


# --- raw HTTP ---


def test_raw_sse_as_curl_sees_it(server: Server) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.api_url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c or c["usage"] is None for c in chunks)


def test_tokenize_detokenize_round_trip(server: Server) -> None:
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "def f(x): return x"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 2048
    text = httpx.post(f"{server.base_url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"].endswith("def f(x): return x")
    chat = httpx.post(f"{server.base_url}/tokenize", json={"messages": MESSAGES}).json()
    usage = httpx.post(f"{server.api_url}/chat/completions",
                       json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1}).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"]


def test_health_version_and_contract_metrics(server: Server) -> None:
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/version").json()["version"]
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("moeserve:num_requests_running", "moeserve:num_requests_waiting", "moeserve:kv_cache_usage_perc",
                 "moeserve:prompt_tokens_total", "moeserve:generation_tokens_total",
                 "moeserve:request_success_total{", "moeserve:num_preemptions_total",
                 "moeserve:time_to_first_token_seconds_bucket", "moeserve:inter_token_latency_seconds_bucket",
                 "moeserve:e2e_request_latency_seconds_bucket", "moeserve:request_queue_time_seconds_bucket"):
        assert name in text, name
    assert "moeserve:trace_store_entries" in text, "the trace store exists in every mode"
    assert "moeserve:expert" not in text, "expert-cache metrics exist only in offload mode"


def test_metrics_count_tokens_of_a_request(server: Server) -> None:
    before = server.metrics()
    usage = httpx.post(f"{server.api_url}/completions", timeout=60, json={
        "model": MODEL, "prompt": "import os", "max_tokens": 3, "ignore_eos": True}).json()["usage"]
    after = server.metrics()
    assert after["moeserve:prompt_tokens_total"] - before["moeserve:prompt_tokens_total"] == usage["prompt_tokens"]
    assert after["moeserve:generation_tokens_total"] - before["moeserve:generation_tokens_total"] == 3


# --- client disconnect ---

LONG = {"model": MODEL, "prompt": "import os", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
ABORTED = 'moeserve:request_success_total{finished_reason="abort"}'


def _engine_idle(server: Server) -> bool:
    metrics = server.metrics()
    return (metrics["moeserve:num_requests_running"] == 0 and metrics["moeserve:num_requests_waiting"] == 0
            and metrics["moeserve:kv_cache_usage_perc"] == 0)


def _assert_aborted_and_idle(server: Server, before: dict[str, float]) -> None:
    """The engine went idle with every KV block free because the request was aborted, not because it finished."""
    wait_until(lambda: _engine_idle(server), timeout=30, what="0 running and every KV block free")
    after = server.metrics()
    assert after.get(ABORTED, 0) == before.get(ABORTED, 0) + 1
    generated = after["moeserve:generation_tokens_total"] - before["moeserve:generation_tokens_total"]
    assert 0 < generated < LONG["max_tokens"]


def test_disconnect_mid_stream_aborts_and_frees_every_kv_block(server: Server) -> None:
    before = server.metrics()
    with httpx.stream("POST", f"{server.api_url}/completions", json={**LONG, "stream": True}, timeout=60) as response:
        lines = response.iter_lines()  # kept open: leaving an httpx line iterator early closes the connection
        events = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert len(events) == 3
        busy = server.metrics()
        assert busy["moeserve:num_requests_running"] == 1 and busy["moeserve:kv_cache_usage_perc"] > 0
    _assert_aborted_and_idle(server, before)


def test_disconnect_while_waiting_for_a_non_streamed_response_aborts(server: Server) -> None:
    before = server.metrics()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.api_url}/completions", json=LONG, timeout=httpx.Timeout(60, read=1.0))
    _assert_aborted_and_idle(server, before)


# --- bad input, table-driven: exact status and param, never a 5xx ---

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
BAD_INPUT = [
    # (name, path, body (dict = JSON, bytes = raw), content type, status, param)
    ("temperature wrong type", "chat", {**CHAT, "temperature": "hot"}, None, 400, "temperature"),
    ("messages wrong type", "chat", {**CHAT, "messages": "hi"}, None, 400, "messages"),
    ("n as a string", "chat", {**CHAT, "n": "2"}, None, 400, "n"),
    ("stream as a string", "chat", {**CHAT, "stream": "yes"}, None, 400, "stream"),
    ("max_tokens fractional", "chat", {**CHAT, "max_tokens": 1.5}, None, 400, "max_tokens"),
    ("max_tokens boolean", "chat", {**CHAT, "max_tokens": True}, None, 400, "max_tokens"),
    ("stop wrong type", "chat", {**CHAT, "stop": 5}, None, 400, "stop"),
    ("role unknown", "chat", {**CHAT, "messages": [{"role": "bot", "content": "x"}]}, None, 400, "messages.0.role"),
    ("image content part", "chat",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     None, 400, "messages.0.content"),
    ("messages missing", "chat", {"model": MODEL}, None, 400, "messages"),
    ("messages empty", "chat", {**CHAT, "messages": []}, None, 400, "messages"),
    ("model missing", "chat", {"messages": CHAT["messages"]}, None, 400, "model"),
    ("role missing", "chat", {**CHAT, "messages": [{"content": "x"}]}, None, 400, "messages.0.role"),
    ("prompt missing", "completions", {"model": MODEL}, None, 400, "prompt"),
    ("temperature too high", "chat", {**CHAT, "temperature": 3}, None, 400, "temperature"),
    ("top_p zero", "chat", {**CHAT, "top_p": 0}, None, 400, "top_p"),
    ("n zero", "chat", {**CHAT, "n": 0}, None, 400, "n"),
    ("max_tokens zero", "chat", {**CHAT, "max_tokens": 0}, None, 400, "max_tokens"),
    ("presence_penalty out of range", "chat", {**CHAT, "presence_penalty": 5}, None, 400, "presence_penalty"),
    ("top_logprobs too many", "chat", {**CHAT, "logprobs": True, "top_logprobs": 25}, None, 400, "top_logprobs"),
    ("top_logprobs without logprobs", "chat", {**CHAT, "top_logprobs": 2}, None, 400, "top_logprobs"),
    ("logit_bias out of range", "chat", {**CHAT, "logit_bias": {"5": 200}}, None, 400, "logit_bias.5"),
    ("logit_bias key not a token id", "chat", {**CHAT, "logit_bias": {"a": 1}}, None, 400, "logit_bias"),
    ("seed beyond int64", "chat", {**CHAT, "seed": 2**64}, None, 400, "seed"),
    ("top_k below -1", "chat", {**CHAT, "top_k": -2}, None, 400, "top_k"),
    ("min_tokens above max_tokens", "chat", {**CHAT, "min_tokens": 5}, None, 400, "min_tokens"),
    ("completion logprobs above 5", "completions", {**COMPLETION, "logprobs": 6}, None, 400, "logprobs"),
    ("prompt empty list", "completions", {**COMPLETION, "prompt": []}, None, 400, "prompt"),
    ("prompt negative token id", "completions", {**COMPLETION, "prompt": [-1]}, None, 400, "prompt"),
    ("prompt token id beyond vocab", "completions", {**COMPLETION, "prompt": [10**6]}, None, 400, "prompt"),
    ("echo with logprobs", "completions", {**COMPLETION, "echo": True, "logprobs": 1}, None, 400, "echo"),
    ("unsupported tools", "chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, None,
     400, "tools"),
    ("unsupported response_format", "chat", {**CHAT, "response_format": {"type": "json_object"}}, None, 400,
     "response_format"),
    ("unsupported suffix", "completions", {**COMPLETION, "suffix": "x"}, None, 400, "suffix"),
    ("unknown field", "chat", {**CHAT, "temprature": 0.5}, None, 400, "temprature"),
    ("context overflow", "chat", {**CHAT, "max_tokens": 3000}, None, 400, "max_tokens"),
    ("unknown model", "chat", {**CHAT, "model": "nope"}, None, 404, "model"),
    ("invalid JSON", "chat", b'{"model": "demo", "messages": [', "application/json", 400, None),
    ("wrong content type", "chat", json.dumps(CHAT).encode(), "text/plain", 400, None),
    ("empty body", "chat", b"", "application/json", 400, None),
    ("JSON array body", "chat", b"[1, 2]", "application/json", 400, None),
    ("unknown route", "nope", CHAT, None, 404, None),
]


@pytest.mark.parametrize("path, body, content_type, status, param",
                         [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_its_exact_status_and_param(server: Server, path, body, content_type, status,
                                                   param) -> None:
    url = f"{server.api_url}/{path}" if path != "chat" else f"{server.api_url}/chat/completions"
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"content-type": content_type}, timeout=30)
    else:
        response = httpx.post(url, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_default_values_of_unsupported_parameters_are_accepted(server: Server) -> None:
    body = {**CHAT, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "store": False}
    assert httpx.post(f"{server.api_url}/chat/completions", json=body, timeout=60).status_code == 200


def test_bench_serve_measures_the_server_over_http(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    length_stops = 'moeserve:request_success_total{finished_reason="length"}'
    before = server.metrics().get(length_stops, 0.0)  # the labelled sample exists from its first request
    assert main(["bench", "serve", "--base-url", server.base_url, "--num-prompts", "5", "--input-len", "6",
                 "--output-len", "4", "--concurrency", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["requests"], report["failed"], report["model"]) == (5, 0, MODEL)
    assert (report["prompt_tokens"], report["output_tokens"]) == (30, 20)  # usage: exactly --output-len each
    assert 0 < report["ttft_ms"]["median"] <= report["e2e_ms"]["median"]
    # The warm-up request and the five, all stopped by their length, as the server itself counts them.
    assert server.metrics()[length_stops] - before == 6
