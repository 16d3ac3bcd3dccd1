"""The engine core in its own process (issue 18): the wire format round-trips every field, the
server really talks to another process, and a crashed engine process fails in-flight requests and
/health clearly instead of hanging them."""

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest

from bench.abort_storm import audit, wait_idle
from engine import ipc
from engine.async_engine import AsyncEngine
from engine.core.request import CacheHints
from engine.engine_config import EngineConfig
from engine.outputs import RequestMetrics, RequestOutput, StepStats, TokenLogprob
from engine.sampling_params import SamplingParams
from server.app import BackgroundServer, create_app
from server.logit_bias import LogitBias
from server.serve_config import ServeConfig

USER = [{"role": "user", "content": "tell me a long story about the sea"}]


def test_add_frames_carry_every_sampling_field_and_the_processors():
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=17, stop=["\n\n"], seed=5, logprobs=2,
                            logits_processors=[LogitBias({3: 1.5})])
    hints = CacheHints((64, 128), True)
    frame = ipc.unpack(ipc.encode_add("r1", [1, 2, 3], params, "salt", hints, 12.5))
    rid, ids, back, salt, back_hints, arrival = ipc.decode_add(frame)
    assert (rid, ids, salt, back_hints, arrival) == ("r1", [1, 2, 3], "salt", hints, 12.5)
    assert back == params  # every compared field (processors are not compared)
    assert len(back.logits_processors) == 1 and isinstance(back.logits_processors[0], LogitBias)


def test_a_step_frame_round_trips_outputs_stats_and_errors():
    outputs = [RequestOutput("a", [5, 6], "", False, None, None, 9, 4, "cold", 2,
                             [TokenLogprob(5, -0.25, [(5, -0.25), (7, -1.5)]), TokenLogprob(6, -0.5, [(6, -0.5)])],
                             RequestMetrics(1.0, 1.5, 2.0, None, 0)),
               RequestOutput("b", [1], "", True, "stop", 1, 3, 0, None, 1, None, None)]
    stats = StepStats(num_running=1, num_waiting=0, kv_cache_usage=0.25, pool_usage={"swa": 0.5},
                      num_generation_tokens=3, prefix_cache_evictions={("swa", "unit"): 2})
    scheduler_stats = {"running": 1, "prefix_cache": {"evictions": {("c4", "leaf"): 2}}}
    frame = ipc.unpack(ipc.encode_step(outputs, stats, [["c", "too long"]], scheduler_stats))
    back, back_stats, errors, scheduler = ipc.decode_step(frame)
    assert back == outputs and back_stats == stats
    # A map keyed by (pool, kind) cannot cross as is (it once killed the receiver): spelled out.
    assert errors == [["c", "too long"]] and scheduler == {"running": 1, "prefix_cache": {"evictions": {"c4/leaf": 2}}}


@pytest.fixture()
def served():
    engine = AsyncEngine(EngineConfig(model=None, max_num_seqs=4), max_queue=8)
    server = BackgroundServer(create_app(engine, ServeConfig(keep_alive_interval=0.5, stats_interval=0)))
    server.start()
    yield server, engine
    server.stop()


def test_the_core_runs_in_another_process_and_serves(served):
    server, engine = served
    assert engine.engine_pid is not None and engine.engine_pid != os.getpid()
    os.kill(engine.engine_pid, 0)  # alive
    reply = httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                       json={"model": "deepseek-chat", "messages": USER, "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    # Diagnostics run in the engine process between steps: every pool is empty again.
    wait_idle(engine)
    report = asyncio.run(engine.run_in_engine_thread(audit))
    assert report["running"] == 0 and report["every_pool_zero"], report


def test_a_killed_engine_process_ends_streams_with_an_error_and_health_turns_503(served):
    server, engine = served
    events: list[dict] = []
    started = threading.Event()

    def stream():
        body = {"model": "deepseek-chat", "messages": USER, "max_tokens": 4000, "stream": True,
                "temperature": 1.0}
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    started.set()

    client = threading.Thread(target=stream)
    client.start()
    assert started.wait(60)
    os.kill(engine.engine_pid, signal.SIGKILL)
    began = time.monotonic()
    client.join(30)
    assert not client.is_alive() and time.monotonic() - began < 15
    assert "error" in events[-1] and "engine process exited with code -9" in events[-1]["error"]["message"]
    health = httpx.get(server.base_url + "/health", timeout=10)
    assert health.status_code == 503
    again = httpx.post(server.base_url + "/v1/chat/completions", timeout=10,
                       json={"model": "deepseek-chat", "messages": USER, "max_tokens": 4})
    assert again.status_code == 503
    assert "engine failure" in again.json()["error"]["message"]
