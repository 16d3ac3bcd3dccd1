"""Streaming mechanics against a live server with one decode slot (max_num_seqs=1), so a second
request really waits: keep-alives while queued (SSE comments / blank lines), client disconnect
-> engine abort -> KV freed, and graceful shutdown draining a running stream."""

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

USER = [{"role": "user", "content": "Tell me a story."}]
LONG = {"model": "deepseek-chat", "messages": USER, "max_tokens": 300, "ignore_eos": True}


@pytest.fixture(scope="module")
def live(tiny_dir):
    engine = AsyncEngine(EngineConfig(model=tiny_dir, kv_cache_memory=32 << 20, max_num_seqs=1), max_queue=8)
    server = BackgroundServer(create_app(engine, ServeConfig(keep_alive_interval=0.2, drain_timeout=30)))
    server.start()
    yield server, engine
    server.stop()


def _wait_idle(engine, timeout=10.0) -> dict:
    """Stats once no request is running, waiting or streaming (fails after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["running"] == stats["waiting"] == stats["in_flight"] == 0:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)


def _wait_busy(engine, key: str, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats()[key] < 1:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)


def test_disconnect_mid_stream_frees_kv(live):
    server, engine = live
    baseline = _wait_idle(engine)["kv_cache"]["live_fraction"]
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**LONG, "stream": True},
                      timeout=60) as resp:
        # Keep-alive lines come every 0.2 s until the first token (the engine process's first
        # step can take longer than a few of them): read until some tokens arrived.
        data = []
        for line in resp.iter_lines():
            if line.startswith("data: "):
                data.append(line)
                if len(data) == 3:
                    break
        assert data and engine.stats()["in_flight"] == 1
        assert engine.stats()["kv_cache"]["live_fraction"] > baseline
    # leaving the block closed the connection mid-generation
    stats = _wait_idle(engine)
    assert stats["kv_cache"]["live_fraction"] == baseline


def test_running_non_streaming_request_gets_blank_lines_and_disconnect_aborts(live):
    server, engine = live
    # Not queued (the slot is free): a reply that takes longer than one interval still gets
    # keep-alive blank lines while it generates, then the client goes away.
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**LONG, "max_tokens": 2000},
                      timeout=60) as resp:
        assert resp.status_code == 200
        first = next(resp.iter_bytes())
        assert first.startswith(b"\n")  # nothing else is in flight: this request is the running one
    stats = _wait_idle(engine)
    assert stats["kv_cache"]["live_fraction"] == 0.0


def test_stream_sends_keep_alives_while_outputs_render_nothing():
    """The keep-alive is time-based: outputs that produce no chunk do not silence it."""
    import asyncio

    from server.streaming import TIMEOUT, keepalive_events

    class SilentOutputs:  # an engine job whose outputs (one per 20 ms) render to no chunk
        def __init__(self):
            self.left, self.is_done = 30, False

        async def next(self, timeout=None):
            await asyncio.sleep(min(0.02, timeout))
            if timeout < 0.02:
                return TIMEOUT
            self.left -= 1
            self.is_done = self.left == 0
            return 0, object()

    async def collect():
        job = SilentOutputs()
        return [event async for event in keepalive_events(job, TIMEOUT, 0.1, lambda i, out: [])]

    events = asyncio.run(collect())
    assert events and all(e is None for e in events)
    assert len(events) >= 4  # ~0.6 s of silence at a 0.1 s interval, the first right away


def test_queued_stream_gets_keep_alive_comments(live):
    server, engine = live
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**LONG, "stream": True},
                      timeout=60) as running:
        running_lines = running.iter_lines()
        next(line for line in running_lines if line.startswith("data: "))
        with httpx.stream("POST", server.base_url + "/v1/chat/completions",
                          json={"model": "deepseek-chat", "messages": USER, "max_tokens": 2, "stream": True},
                          timeout=60) as queued:
            queued_lines = queued.iter_lines()
            first = next(line for line in queued_lines if line)
            assert first == ": keep-alive"  # nothing else comes before it while the request waits
            running.close()  # free the slot: the queued request starts and finishes
            rest = [line for line in queued_lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] in ("stop", "length")
    _wait_idle(engine)


def test_queued_non_streaming_request_gets_blank_lines_then_json(live):
    server, engine = live
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**LONG, "max_tokens": 40,
                                                                                "stream": True}, timeout=60) as running:
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        raw = {}

        def send_raw():
            raw["resp"] = httpx.post(server.base_url + "/v1/chat/completions",
                                     json={"model": "deepseek-chat", "messages": USER, "max_tokens": 2}, timeout=60)

        thread = threading.Thread(target=send_raw)
        thread.start()
        _wait_busy(engine, "waiting")
        # the OpenAI SDK parses a body that starts with keep-alive blank lines
        sdk_reply = client.chat.completions.create(model="deepseek-chat", messages=USER, max_tokens=2)
        thread.join(60)
    text = raw["resp"].text
    assert raw["resp"].status_code == 200 and text.startswith("\n")
    body = json.loads(text)
    assert body["object"] == "chat.completion" and body["usage"]["total_tokens"] > 0
    assert sdk_reply.choices[0].finish_reason in ("stop", "length")
    _wait_idle(engine)


def test_shutdown_drains_running_stream(live):
    """Runs last in this module: it stops the module's server."""
    server, engine = live
    finished = {}

    def stream():
        with httpx.stream("POST", server.base_url + "/v1/chat/completions",
                          json={**LONG, "max_tokens": 60, "stream": True}, timeout=60) as resp:
            finished["lines"] = [line for line in resp.iter_lines() if line.startswith("data: ")]

    thread = threading.Thread(target=stream)
    thread.start()
    _wait_busy(engine, "running")
    server.stop()
    thread.join(60)
    lines = finished["lines"]
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][len("data: "):])
    assert final["choices"][0]["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 60
    assert not engine.accepting
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.base_url + "/health", timeout=2)


@pytest.mark.parametrize("failure", ["api_error", "crash"])
def test_stream_failing_after_keep_alives_ends_with_an_error_event_and_done(failure):
    """Headers and keep-alives are out when the failure comes: the stream still ends cleanly."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from server.errors import queue_full
    from server.streaming import sse_response

    class Job:  # the engine side is gone by then; only close() is called
        def close(self):
            pass

    async def events():
        for _ in range(2):
            await asyncio.sleep(0.01)
            yield None  # keep-alive
        if failure == "api_error":
            raise queue_full("the queue filled up")
        raise RuntimeError("boom")

    app = FastAPI()
    app.add_api_route("/s", lambda: sse_response(events(), Job(), "req-1", drain_timeout=5), methods=["GET"])
    with TestClient(app) as client:
        lines = [line for line in client.get("/s").text.splitlines() if line]
    assert lines[:2] == [": keep-alive", ": keep-alive"]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert error["code"] == ("rate_limit_reached" if failure == "api_error" else "server_error")
