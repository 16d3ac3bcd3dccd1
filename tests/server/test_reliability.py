"""Reliability and security regressions (issue 17) against a live HTTP server on the embedded
demo model: stop strings that grew memory with the square of their length, malformed tool
schemas at any depth, body / prompt / message / connection limits, slow clients, draining
shutdown under SIGTERM, admission from the live queue, and the smaller API hygiene items."""

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from bench.abort_storm import audit, storm, wait_idle
from engine.async_engine import AsyncEngine
from engine.core.stopping import StopChecker
from engine.engine_config import EngineConfig
from server.app import BackgroundServer, create_app
from server.http_guard import RequestGuard
from server.limits import RequestLimits
from server.serve_config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
USER = [{"role": "user", "content": "hello there"}]
MAX_MODEL_LEN = 2048
LIMITS = RequestLimits(max_body_bytes=256 << 10, max_stop_strings=4, max_stop_length=64, max_messages=64,
                       max_connections=48, header_timeout=2.0, body_timeout=2.0)


@pytest.fixture(scope="module")
def live():
    engine = AsyncEngine(EngineConfig(model=None, max_num_seqs=2, max_model_len=MAX_MODEL_LEN), max_queue=4)
    app = create_app(engine, ServeConfig(keep_alive_interval=0.5, stats_interval=0, limits=LIMITS))
    server = BackgroundServer(app)
    server.start()
    yield server, engine
    server.stop()


def _chat(**fields) -> dict:
    return {"model": "deepseek-chat", "messages": USER, "max_tokens": 2, **fields}


def _post(live, body=None, path="/v1/chat/completions", **kwargs) -> httpx.Response:
    return httpx.post(live[0].base_url + path, json=body, timeout=60, **kwargs)


def _error(resp: httpx.Response, status: int, param=None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


# ---------------------------------------------------------------- 1. stop strings


def test_a_megabyte_stop_string_costs_linear_memory():
    tracemalloc.start()
    checker = StopChecker(["ab" * 500_000] + [chr(ord("a") + i) * 8_000 for i in range(15)])
    for _ in range(200):
        checker.feed("ab" * 50)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the old prefix sets needed ~500 MB for 16 x 8K and ~TBs for 1M characters
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert not checker.stopped and checker.flush() == "ab" * 10_000


def test_oversized_stop_strings_are_400s_and_a_long_allowed_one_is_served(live):
    _error(_post(live, _chat(stop=["x" * 65])), 400, "stop")
    _error(_post(live, _chat(stop=["a", "b", "c", "d", "e"])), 400, "stop")
    resp = _post(live, _chat(stop=["z" * 64] * 4, max_tokens=8))
    assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ---------------------------------------------------------------- 2. malformed tool schemas

BAD_SCHEMAS = [
    {"type": "object", "required": [{}]},
    {"type": "object", "required": 5},
    {"type": "object", "required": None},
    {"type": {}},
    {"enum": 5},
    {"anyOf": 5},
    {"anyOf": []},
    {"type": "object", "properties": {"a": {"type": {}}}},  # nested: used to pass the up-front check
    {"type": "object", "properties": {"a": {"type": "array", "items": {"required": [1]}}}},
    {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, 7]}}},
    {"type": "object", "additionalProperties": {"type": ["string", 3]}},
    {"type": "object", "properties": 5},
    {"type": []},
]


@pytest.mark.parametrize("schema", BAD_SCHEMAS, ids=range(len(BAD_SCHEMAS)))
def test_malformed_tool_schema_at_any_depth_is_a_400_up_front(live, schema):
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    for stream in (False, True):
        error = _error(_post(live, _chat(tools=tools, stream=stream)), 400, "tools[0].function.parameters")
        assert "schema" in error["message"]


def test_a_deep_valid_schema_is_accepted(live):
    schema = {"type": "string"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    assert _post(live, _chat(tools=tools)).status_code == 200


def test_an_unexpected_error_is_one_500_with_one_traceback(caplog):
    app = FastAPI()
    app.add_middleware(RequestGuard, limits=RequestLimits())

    @app.post("/boom")
    async def boom():
        raise RuntimeError("bug")

    async def call():
        transport = httpx.ASGITransport(app=app)  # raises whatever escapes the app: nothing must
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/boom", json={})

    with caplog.at_level(logging.ERROR):
        resp = asyncio.run(call())
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "server_error"
    assert "bug" not in resp.text
    assert len([r for r in caplog.records if r.exc_info]) == 1


# ---------------------------------------------------------------- 4. limits and slow clients


def test_body_over_the_limit_is_413_before_parsing(live):
    big = b'{"model": "deepseek-chat", "messages": [{"role": "user", "content": "' + b"a" * (300 << 10) + b'"}]}'
    _error(_post(live, content=big, headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: the guard counts as the body arrives
        yield big[:1000]
        yield big[1000:]

    _error(_post(live, content=chunks(), headers={"content-type": "application/json"}), 413)


def test_prompt_over_the_context_is_refused_without_tokenizing(live):
    text = "汉字" * 40_000  # 240 KB of UTF-8: at least ~8K tokens whatever the tokenizer does
    error = _error(_post(live, _chat(messages=[{"role": "user", "content": text}])), 400, "messages")
    assert "at least" in error["message"] and str(MAX_MODEL_LEN) in error["message"]
    # just over the context: counted exactly, still before the engine sees it
    error = _error(_post(live, _chat(messages=[{"role": "user", "content": "word " * 2100}])), 400, "messages")
    assert "prompt is" in error["message"] and "at least" not in error["message"]
    assert live[1].num_in_flight == 0


def test_too_many_messages_is_a_400(live):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}] * 40
    _error(_post(live, _chat(messages=messages + USER)), 400, "messages")


def _raw(live) -> socket.socket:
    sock = socket.create_connection((live[0].host, live[0].port), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_partial_headers_get_408_and_the_connection_closed(live):
    sock = _raw(live)
    start = time.monotonic()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
    data = _read_all(sock)
    assert data.startswith(b"HTTP/1.1 408") and b"request_timeout" in data
    assert time.monotonic() - start < LIMITS.header_timeout + 3


def test_a_connection_that_sends_nothing_is_closed(live):
    sock = _raw(live)
    assert _read_all(sock).startswith(b"HTTP/1.1 408")


def test_a_short_body_gets_408(live):
    sock = _raw(live)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\":")
    data = _read_all(sock)
    assert data.startswith(b"HTTP/1.1 408") and b"body did not arrive" in data


def test_connections_beyond_the_limit_get_503(live):
    socks = [_raw(live) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.2)
        resp = httpx.get(live[0].base_url + "/health", timeout=10)
        assert resp.status_code == 503
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 5
    while httpx.get(live[0].base_url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


# ---------------------------------------------------------------- 6. admission


def test_a_burst_admits_exactly_running_plus_queue_and_429s_carry_retry_after(live):
    engine = live[1]
    body = _chat(max_tokens=300, ignore_eos=True, stream=True)
    results, lock = [], threading.Lock()
    release = threading.Event()

    def client():
        with httpx.stream("POST", live[0].base_url + "/v1/chat/completions", json=body, timeout=60) as resp:
            with lock:
                results.append((resp.status_code, resp.headers.get("retry-after")))
            if resp.status_code == 200:
                release.wait(60)  # hold the stream open: admitted requests stay in flight

    threads = [threading.Thread(target=client) for _ in range(40)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(results) < 40:
        assert time.monotonic() < deadline, results
        time.sleep(0.02)
    release.set()
    for t in threads:
        t.join(60)
    admitted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(admitted) == 2 + 4 and len(refused) == 34, results  # max_num_seqs + max_queue
    assert all(retry == "1" for _, retry in refused)
    wait_idle(engine)


# ---------------------------------------------------------------- 8. API hygiene


def test_non_json_bodies_are_415(live):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        resp = _post(live, content=json.dumps(_chat()), headers={"content-type": content_type})
        assert resp.status_code == 415, content_type
        assert resp.json()["error"]["code"] == "unsupported_media_type"
    assert _post(live, content=json.dumps(_chat()),
                 headers={"content-type": "application/json; charset=utf-8"}).status_code == 200


@pytest.mark.parametrize("field,value", [("max_tokens", "8"), ("max_tokens", True), ("max_tokens", 8.5),
                                         ("n", "2"), ("stream", "true"), ("temperature", "0.5"),
                                         ("seed", True), ("logprobs", 1)])
def test_types_are_strict(live, field, value):
    _error(_post(live, _chat(**{field: value})), 422, field)


def test_logit_bias_steers_sampling_and_bad_entries_are_400s(live):
    ids = _post(live, {"prompt": " zebra"}, path="/tokenize").json()["tokens"]
    token = ids[-1]
    resp = _post(live, _chat(max_tokens=4, temperature=0, logit_bias={str(token): 100}))
    assert resp.status_code == 200, resp.text
    reply = resp.json()
    assert reply["usage"]["completion_tokens"] == 4
    text = _post(live, {"tokens": [token]}, path="/detokenize").json()["prompt"]
    assert reply["choices"][0]["message"]["content"] == text * 4
    for bias in ({"-1": 5}, {"abc": 5}, {str(10**9): 5}, {str(token): 101}, {str(i): 1 for i in range(301)}):
        _error(_post(live, _chat(logit_bias=bias)), 400, "logit_bias")


def test_openapi_publishes_the_request_bodies(live):
    spec = httpx.get(live[0].base_url + "/openapi.json", timeout=10).json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages"} <= set(body["required"]) and "max_tokens" in body["properties"]
    completion = spec["paths"]["/beta/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "prompt" in completion["required"]


# ---------------------------------------------------------------- abort storm (small scale)


def test_abort_storm_leaves_every_pool_empty_and_the_cache_consistent():
    engine = AsyncEngine(EngineConfig(model=None, max_num_seqs=8), max_queue=256)
    server = BackgroundServer(create_app(engine, ServeConfig(keep_alive_interval=0.5, stats_interval=0)))
    server.start()
    try:
        result = asyncio.run(storm(server.base_url, requests=64, concurrency=16, seed=1, max_wait=0.6))
        assert result.disconnected > 20 and result.completed > 0
        assert set(result.statuses) == {200}, result.statuses
        wait_idle(engine)
        report = asyncio.run(engine.run_in_engine_thread(audit))
    finally:
        server.stop()
    assert report["running"] == report["waiting"] == 0 and report["live_fraction"] == 0.0
    assert report["every_pool_zero"], report


# ---------------------------------------------------------------- 5. shutdown under SIGTERM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_health_503_streams_end_with_error_and_done_exit_0():
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--drain-timeout", "4",
                             "--stats-interval", "0", "--log-level", "warning", "--keep-alive-interval", "0.5"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        body = _chat(max_tokens=100_000, ignore_eos=True, stream=True)
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            health = httpx.get(base + "/health", timeout=5)  # the socket still accepts
            assert health.status_code == 503
            refused = httpx.post(base + "/v1/chat/completions", json=_chat(), timeout=5)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            tail = [line for line in lines if line.startswith("data: ")]
        assert time.monotonic() - sent < 4 + 1
        assert tail[-1] == "data: [DONE]"
        final = json.loads(tail[-2][len("data: "):])
        assert final["error"]["code"] == "server_overloaded" and "shutting down" in final["error"]["message"]
        assert proc.wait(15) == 0
        log = proc.stdout.read().decode()
        assert "ASGI callable returned without completing response" not in log and "Traceback" not in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- 7. flags and deploy defaults


def test_limit_flags_reach_the_config_and_keyless_remote_binds_are_refused(monkeypatch):
    from server.cli import build_configs, build_parser

    monkeypatch.delenv("DSV4_API_KEY", raising=False)
    parser = build_parser()
    args = parser.parse_args(["serve", "--max-body-bytes", "1MiB", "--max-stop-strings", "3", "--max-stop-length", "9",
                              "--max-messages", "5", "--max-prompt-tokens", "100", "--max-connections", "7",
                              "--header-timeout", "1.5", "--body-timeout", "2.5"])
    limits = build_configs(args)[1].limits
    assert limits == RequestLimits(max_body_bytes=1 << 20, max_stop_strings=3, max_stop_length=9, max_messages=5,
                                   max_prompt_tokens=100, max_connections=7, header_timeout=1.5, body_timeout=2.5)
    with pytest.raises(ValueError, match="--api-key"):
        build_configs(parser.parse_args(["serve", "--host", "0.0.0.0"]))
    assert build_configs(parser.parse_args(["serve", "--host", "0.0.0.0", "--allow-no-api-key"]))[1].api_keys == ()
    assert build_configs(parser.parse_args(["serve", "--host", "::1"]))[1].api_keys == ()
    monkeypatch.setenv("DSV4_API_KEY", "k-env")
    assert build_configs(parser.parse_args(["serve", "--host", "0.0.0.0"]))[1].api_keys == ("k-env",)
    with pytest.raises(ValueError, match="max-messages"):
        build_configs(parser.parse_args(["serve", "--max-messages", "0"]))


def test_masked_tokens_in_logprobs_are_finite_not_a_500(live):
    """Found by bench/fuzz.py: JSON mode masks tokens to -inf, which the top alternatives then
    carried; the JSON encoder refused it (500) or streams sent `-Infinity` (invalid JSON)."""
    body = _chat(max_tokens=8, response_format={"type": "json_object"}, logprobs=True, top_logprobs=20,
                 messages=[{"role": "user", "content": "reply in json"}])
    for stream in (False, True):
        resp = _post(live, {**body, "stream": stream})
        assert resp.status_code == 200, resp.text
        assert "Infinity" not in resp.text and "NaN" not in resp.text
    resp = _post(live, {"model": "deepseek-chat", "prompt": "a", "max_tokens": 4, "logprobs": 20, "temperature": 0,
                        "logit_bias": {"5": -100}}, path="/v1/completions")
    assert resp.status_code == 200 and "Infinity" not in resp.text
    resp = _post(live, _chat(max_tokens=4, temperature=0, logprobs=True, top_logprobs=20,
                             logit_bias={str(i): -100 for i in range(300)}))
    assert resp.status_code == 200 and "Infinity" not in resp.text
    entries = resp.json()["choices"][0]["logprobs"]["content"]
    assert all(top["logprob"] >= -9999.0 for e in entries for top in e["top_logprobs"])
