"""Errors and status codes against a live server: the OpenAI envelope, DeepSeek's codes, API
keys, the bounded queue (429), shutdown (503), context limits, and a table of hostile inputs
that must never produce a 500."""

import json
import threading
import time

import httpx
import openai
import pytest

from engine.async_engine import AsyncEngine
from engine.engine_config import EngineConfig
from server.app import BackgroundServer, create_app
from server.serve_config import ServeConfig

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 512
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def live(tiny_dir):
    engine = AsyncEngine(EngineConfig(model=tiny_dir, kv_cache_memory=32 << 20, max_num_seqs=1,
                                      max_model_len=MAX_MODEL_LEN), max_queue=1)
    app = create_app(engine, ServeConfig(api_keys=(KEY,), keep_alive_interval=0.5))
    server = BackgroundServer(app)
    server.start()
    yield server, engine, app
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].base_url + "/v1", api_key=KEY, max_retries=0)


def _post(live, path, body=None, content=None, headers=AUTH):
    return httpx.post(live[0].base_url + path, json=body, content=content, headers=headers, timeout=60)


def _error(resp) -> dict:
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], str)
    return error


def _chat(**fields):
    return {"model": "deepseek-chat", "messages": USER, "max_tokens": 2, **fields}


# (body or raw bytes, expected status, expected param or None)
HOSTILE = [
    (b"hello", 400, None),
    (b"[]", 400, None),
    (b'{"model": "deepseek-chat", "messages": [', 400, None),
    (b'{"model": "deepseek-chat", "messages": [{"role": "user", "content": "\\ud800x"}]}', 400, None),
    (b"[" * 100_000 + b"]" * 100_000, 400, None),
    ({"model": "deepseek-chat"}, 422, "messages"),
    ({"model": "deepseek-chat", "messages": "hi"}, 422, "messages"),
    ({"model": "deepseek-chat", "messages": ["hi"]}, 422, "messages[0]"),
    ({"model": 5, "messages": USER}, 422, "model"),
    (_chat(messages=[]), 400, "messages"),
    (_chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role"),
    (_chat(messages=[{"role": "user"}]), 400, "messages[0].content"),
    (_chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages[0].content[0].type"),
    (_chat(model="gpt-4o"), 400, "model"),
    (_chat(max_tokens=-1), 400, "max_tokens"),
    (_chat(max_tokens=0), 400, "max_tokens"),
    (_chat(max_tokens="many"), 422, "max_tokens"),
    (_chat(max_tokens=10**12), 400, "max_tokens"),
    (_chat(max_tokens=None, max_completion_tokens=-5), 400, "max_completion_tokens"),
    (_chat(n=10**6), 400, "n"),
    (_chat(n=0), 400, "n"),
    (_chat(temperature=5), 400, "temperature"),
    (_chat(temperature="hot"), 422, "temperature"),
    (_chat(top_p=2), 400, "top_p"),
    (_chat(stop=["x"] * 17), 400, "stop"),
    (_chat(stop=[""]), 400, "stop"),
    (_chat(stop=5), 422, "stop"),
    (_chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), 400, "tools[0].function.name"),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]), 400,
     "tools[0].function.parameters"),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]), 400,
     "tools[0].function.parameters"),
    (_chat(tools=[{"type": "retrieval"}]), 400, "tools[0]"),
    (_chat(tools=[TOOL] * 129), 400, "tools"),
    (_chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), 400, "tool_choice"),
    (_chat(tools=[TOOL], tool_choice={"type": "function", "function": "x"}), 400, "tool_choice"),
    (_chat(tool_choice="sometimes"), 400, "tool_choice"),
    (_chat(response_format={"type": "json_schema", "json_schema": {}}), 400, "response_format.json_schema.name"),
    (_chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}), 400,
     "response_format.json_schema.schema"),
    (_chat(response_format={"type": 5}), 400, "response_format.type"),
    (_chat(thinking={"type": "maybe"}), 400, "thinking.type"),
    (_chat(thinking="on"), 422, "thinking"),
    (_chat(reasoning_effort="extreme"), 400, "reasoning_effort"),
    (_chat(thinking={"type": "enabled", "reasoning_effort": [1]}), 400, "reasoning_effort"),
    (_chat(stream_options={"include_usage": True}), 400, "stream_options"),
    (_chat(top_logprobs=5), 400, "top_logprobs"),
    (_chat(logprobs=True, top_logprobs=25), 400, "top_logprobs"),
    (_chat(user_id="bad id!"), 400, "user_id"),
    (_chat(user_id="x" * 513), 400, "user_id"),
    ({"model": "deepseek-v4-pro", "max_tokens": 2, "messages": USER + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}, 400, "messages[1].reasoning_content"),
]


@pytest.mark.parametrize("body,status,param", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_chat_inputs_get_clean_errors(live, body, status, param):
    if isinstance(body, bytes):
        resp = _post(live, "/v1/chat/completions", content=body, headers={**AUTH, "content-type": "application/json"})
    else:
        resp = _post(live, "/v1/chat/completions", body)
    assert resp.status_code == status, resp.text
    error = _error(resp)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "lookup"}}])
def test_thinking_mode_rejects_forced_tool_choice_like_deepseek(live, tool_choice):
    thinking = _post(live, "/v1/chat/completions", {"model": "deepseek-v4-pro", "max_tokens": 2, "messages": USER,
                                                    "tools": [TOOL], "tool_choice": tool_choice})
    assert thinking.status_code == 400
    assert _error(thinking)["message"] == "Thinking mode does not support this tool_choice"
    assert _error(thinking)["param"] == "tool_choice"
    chat = _post(live, "/v1/chat/completions", _chat(tools=[TOOL], tool_choice=tool_choice))
    assert chat.status_code == 200, chat.text  # chat mode accepts it (not enforced: no grammar)


def test_tool_call_history_with_null_arguments_is_rendered_not_rejected(live):
    # DeepSeek's reference encoder renders it (one `arguments` parameter holding null).
    body = _chat(tools=[TOOL], messages=USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": None}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}])
    resp = _post(live, "/v1/chat/completions", body)
    assert resp.status_code == 200, resp.text


def test_passback_error_uses_deepseeks_message(live):
    resp = _post(live, "/v1/chat/completions", HOSTILE[-1][0])
    assert "The `reasoning_content` in the thinking mode must be passed back to the API" in _error(resp)["message"]


def test_unicode_garbage_is_served(client):
    content = "\u0000\uffff\U0001F600 \u202e\u200b漢字 \t\r\n" + "\U0010FFFF" * 3
    reply = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": content}],
                                           max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_context_length_errors_name_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="deepseek-chat", max_tokens=2,
                                       messages=[{"role": "user", "content": "word " * 700}])
    assert str(MAX_MODEL_LEN) in err.value.message and err.value.param == "messages"
    prompt_tokens = int(err.value.message.split("prompt is ")[1].split(" ")[0])
    assert prompt_tokens >= MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="deepseek-chat", messages=USER, max_tokens=MAX_MODEL_LEN)
    assert str(MAX_MODEL_LEN) in err.value.message and err.value.param == "max_tokens"


def test_completion_endpoint_errors(live):
    cases = [({"model": "deepseek-chat", "prompt": ["a", "b"]}, 400, "prompt"),
             ({"model": "deepseek-chat", "prompt": "a", "suffix": 5}, 422, "suffix"),
             ({"model": "deepseek-chat", "prompt": "a", "logprobs": 30}, 400, "logprobs"),
             ({"model": "deepseek-chat", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
             ({"model": "nope", "prompt": "a"}, 400, "model"),
             ({"prompt": "a"}, 422, "model")]
    for body, status, param in cases:
        resp = _post(live, "/beta/completions", body)
        assert resp.status_code == status, (body, resp.text)
        assert _error(resp)["param"] == param


def test_api_key_required(live):
    base = live[0].base_url
    for headers in ({}, {"Authorization": "Bearer wrong-key-9999"}, {"Authorization": f"Basic {KEY}"}):
        resp = httpx.post(base + "/v1/chat/completions", json=_chat(), headers=headers)
        assert resp.status_code == 401
        assert _error(resp)["type"] == "authentication_error"
    message = httpx.post(base + "/chat/completions", json=_chat(),
                         headers={"Authorization": "Bearer wrong-key-9999"}).json()["error"]["message"]
    assert "invalid" in message and "9999" not in message  # no characters of the key given
    assert httpx.get(base + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
    # operational endpoints stay open for probes and scrapers
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.get(base + "/metrics").status_code == 200
    assert httpx.get(base + "/v1/models", headers=AUTH).status_code == 200


def test_unknown_routes_and_methods_use_the_envelope(live):
    resp = httpx.get(live[0].base_url + "/v2/nothing", headers=AUTH)
    assert resp.status_code == 404 and _error(resp)["code"] == "not_found"
    resp = httpx.get(live[0].base_url + "/v1/chat/completions", headers=AUTH)
    assert resp.status_code == 405 and _error(resp)


def test_full_queue_gets_429(live, client):
    engine = live[1]
    body = {"model": "deepseek-chat", "messages": USER, "max_tokens": 400, "stream": True, "ignore_eos": True}
    results = {}
    with httpx.stream("POST", live[0].base_url + "/v1/chat/completions", json=body, headers=AUTH,
                      timeout=60) as running:
        lines = running.iter_lines()  # keep a reference: a collected iterator closes the connection
        assert next(line for line in lines if line.startswith("data: "))

        def queued():
            results["queued"] = client.chat.completions.create(model="deepseek-chat", messages=USER, max_tokens=2)

        waiter = threading.Thread(target=queued)
        waiter.start()
        deadline = time.monotonic() + 20
        while engine.stats()["waiting"] < 1:  # max_num_seqs=1: the second request waits
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="deepseek-chat", messages=USER, max_tokens=2)
        assert err.value.code == "rate_limit_reached"
    # leaving the stream aborts it; the queued request then runs to completion
    waiter.join(60)
    assert results["queued"].choices[0].finish_reason in ("stop", "length")


def test_draining_server_answers_503(live, client):
    ctx = live[2].state.ctx
    ctx.is_draining = True
    try:
        assert httpx.get(live[0].base_url + "/health").status_code == 503
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="deepseek-chat", messages=USER, max_tokens=2)
        assert err.value.status_code == 503 and err.value.code == "server_overloaded"
    finally:
        ctx.is_draining = False
    assert httpx.get(live[0].base_url + "/health").status_code == 200


def test_no_leaks_after_errors(live):
    deadline = time.monotonic() + 10
    while True:
        stats = live[1].stats()
        if stats["running"] == stats["waiting"] == stats["in_flight"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    assert stats["kv_cache"]["live_fraction"] == 0.0
    assert json.dumps(stats)  # plain data
