"""/metrics against a live server on the tiny checkpoint: scraped while a request runs and after
requests end. Names, the model_name label on every sample, gauges during a request (running,
per-pool KV usage), and counters that move by exactly what the clients were told in `usage`
(tokens, cost, finish reasons, histogram counts, prefix-cache hits and misses by reason).
Last: `dsv4 serve` as a subprocess logs the one-line stats and drains on SIGTERM."""

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.async_engine import AsyncEngine
from engine.engine_config import EngineConfig
from server.app import BackgroundServer, create_app
from server.metrics import KV_POOLS
from server.serve_config import ServeConfig

MODEL = "deepseek-v4-flash"  # the default served name: it has prices, so usage carries a cost
UNIT = 64  # prefix_cache_unit: checkpoints every 64 tokens
REPO = Path(__file__).resolve().parents[2]
HISTOGRAMS = ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds",
              "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens",
              "request_generation_tokens")


@pytest.fixture(scope="module")
def live(tiny_dir):
    engine = AsyncEngine(EngineConfig(model=tiny_dir, kv_cache_memory=16 << 20, max_num_seqs=4,
                                      prefix_cache_unit=UNIT), max_queue=16)
    config = ServeConfig(served_model_name=MODEL, keep_alive_interval=0.5, stats_interval=0.3)
    server = BackgroundServer(create_app(engine, config))
    server.start()
    yield server.base_url, engine
    server.stop()


def scrape(base: str) -> dict:
    """(sample name, labels other than model_name) -> value; every sample must carry model_name."""
    response = httpx.get(base + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("model_name", None) == MODEL, sample
            samples[(sample.name, frozenset(labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(f"dsv4:{name}", frozenset(labels.items()))]


def delta(after: dict, before: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def misses(after: dict, before: dict) -> dict:
    """Prefix-cache miss tokens by reason between two scrapes (reasons that moved)."""
    moved = {}
    for (name, labels), v in after.items():
        if name == "dsv4:prefix_cache_misses_total":
            grown = v - before.get((name, labels), 0.0)
            if grown:
                moved[dict(labels)["reason"]] = grown
    return moved


def wait_idle(engine, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["running"] == stats["waiting"] == stats["in_flight"] == 0:
            return
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)


def complete(base: str, prompt: str, max_tokens: int) -> dict:
    """A plain completion (prompt = BOS + text) that runs to max_tokens; its usage."""
    reply = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                        "ignore_eos": True}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] == "length"
    return reply.json()["usage"]


def stream_chat(base: str, content: str, max_tokens: int, on_chunk=None) -> dict:
    """A streamed chat completion that runs to max_tokens; the usage of its final chunk."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "thinking": {"type": "disabled"}}
    usage = None
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: "):])
                usage = chunk.get("usage") or usage
                if on_chunk is not None:
                    on_chunk(chunk)
    assert usage is not None
    return usage


def tokens_of(base: str, prompt: str) -> list[int]:
    """The ids /v1/completions sends to the engine for `prompt` (BOS + text)."""
    bos = "<｜begin▁of▁sentence｜>"
    return httpx.post(base + "/tokenize", json={"prompt": bos + prompt}).json()["tokens"]


def test_gauges_and_counters_while_a_request_runs(live, caplog):
    base, engine = live
    caplog.set_level(logging.INFO, logger="server.serve_config")
    wait_idle(engine)
    before = scrape(base)
    result, seen_chunks = {}, []
    worker = threading.Thread(target=lambda: result.update(usage=stream_chat(base, "Tell me a story.", 80,
                                                                             seen_chunks.append)))
    worker.start()
    during = None
    deadline = time.monotonic() + 30
    while worker.is_alive() and time.monotonic() < deadline:
        sample = scrape(base)
        if value(sample, "num_requests_running") >= 1 and delta(sample, before, "generation_tokens_total") >= 1:
            during = sample
            break
        time.sleep(0.01)
    worker.join(60)
    assert during is not None, "never scraped while the request was running"
    assert 0 < value(during, "kv_cache_pool_usage_perc", pool="window") <= 1
    assert 0 < value(during, "kv_cache_pool_usage_perc", pool="state") <= 1
    assert 0 < value(during, "kv_cache_usage_perc") <= 1
    assert delta(during, before, "prompt_tokens_total") > 0  # counted when its prefill ended
    assert delta(during, before, "request_success_total", finished_reason="length") == 0

    usage = result["usage"]
    after = scrape(base)
    assert value(after, "num_requests_running") == value(after, "num_requests_waiting") == 0
    assert delta(after, before, "request_success_total", finished_reason="length") == 1
    assert delta(after, before, "prompt_tokens_total") == usage["prompt_tokens"]
    assert delta(after, before, "generation_tokens_total") == usage["completion_tokens"] == 80
    assert delta(after, before, "inter_token_latency_seconds_count") == 80 - 1  # one gap per later token
    for name in HISTOGRAMS:
        assert delta(after, before, f"{name}_count") == 1, name
    assert delta(after, before, "request_generation_tokens_sum") == 80
    # The one-line stats log saw the request running.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Avg prompt throughput")]
    assert any("Running: 1 reqs" in line for line in lines), lines


def test_prefix_cache_counters_by_reason(live):
    base, engine = live
    rng = random.Random(7)
    words = [str(rng.randrange(10)) for _ in range(110)]
    text = " ".join(words)
    diverging = " ".join(words[:50] + [str((int(w) + 1) % 10) for w in words[50:]])
    ids, diverging_ids = tokens_of(base, text), tokens_of(base, diverging)
    shared = next(i for i, (a, b) in enumerate(zip(ids, diverging_ids)) if a != b)
    assert UNIT < shared < 2 * UNIT  # precondition: the second prompt leaves the first one mid-unit

    wait_idle(engine)
    scrapes = [scrape(base)]
    usages = []
    for prompt in (text, text, diverging):  # cold, a repeat, one that diverges inside the second unit
        usages.append(complete(base, prompt, 3))
        scrapes.append(scrape(base))
    cold, repeat, partial = [(scrapes[i + 1], scrapes[i]) for i in range(3)]

    assert usages[0]["prompt_cache_hit_tokens"] == 0
    assert delta(*cold, "prefix_cache_queries_total") == len(ids) == usages[0]["prompt_tokens"]
    assert delta(*cold, "prefix_cache_hits_total") == 0
    assert misses(*cold) == {"cold": len(ids)}

    # The repeat resumes from the end-of-prompt unit, one token short of the prompt's end.
    assert usages[1]["prompt_cache_hit_tokens"] == len(ids) - 1
    assert delta(*repeat, "prefix_cache_queries_total") == len(ids)
    assert delta(*repeat, "prefix_cache_hits_total") == len(ids) - 1
    assert sum(misses(*repeat).values()) == 1

    # The diverging prompt resumes from the 64-token unit. Reasons are per token: what a cached
    # prefix shares beyond the unit (known to page granularity: at least the next token) is a
    # partial-unit miss, the rest is cold.
    assert usages[2]["prompt_cache_hit_tokens"] == UNIT
    assert delta(*partial, "prefix_cache_queries_total") == len(diverging_ids)
    assert delta(*partial, "prefix_cache_hits_total") == UNIT
    split = misses(*partial)
    assert set(split) == {"partial_unit", "cold"} and sum(split.values()) == len(diverging_ids) - UNIT
    assert 1 <= split["partial_unit"] <= shared - UNIT

    first, last = scrapes[0], scrapes[-1]
    assert delta(last, first, "tokens_total", kind="cache_hit_input") == sum(
        u["prompt_cache_hit_tokens"] for u in usages)
    # Like vLLM's kv_cache_usage_perc, usage counts live requests only: checkpoints are evictable.
    assert value(last, "kv_cache_pool_usage_perc", pool="c4") == 0
    assert value(last, "kv_cache_usage_perc") == 0


def test_counters_match_the_usage_clients_got(live):
    base, engine = live
    wait_idle(engine)
    before = scrape(base)
    usages, errors = [], []
    jobs = [lambda i=i: complete(base, f"Request {i}: " + "lorem ipsum " * (5 + 7 * i), 4 + 3 * i) for i in range(4)]
    jobs += [lambda i=i: stream_chat(base, f"Question number {i}?", 6 + i) for i in range(3)]

    def run(job):
        try:
            usages.append(job())
        except Exception as err:  # surfaced below; a thread's assertion would be lost
            errors.append(err)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(usages) == len(jobs)
    wait_idle(engine)
    after = scrape(base)

    n = len(usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    hits = sum(u["prompt_cache_hit_tokens"] for u in usages)
    output = sum(u["completion_tokens"] for u in usages)
    assert delta(after, before, "num_preemptions_total") == 0
    assert delta(after, before, "request_success_total", finished_reason="length") == n
    assert delta(after, before, "prompt_tokens_total") == prompt
    assert delta(after, before, "generation_tokens_total") == output
    assert delta(after, before, "prefix_cache_queries_total") == prompt
    assert delta(after, before, "prefix_cache_hits_total") == hits
    assert delta(after, before, "tokens_total", kind="output") == output
    assert delta(after, before, "tokens_total", kind="cache_miss_input") == prompt - hits
    for name in HISTOGRAMS + ("request_time_per_output_token_seconds",):
        assert delta(after, before, f"{name}_count") == n, name
    assert delta(after, before, "inter_token_latency_seconds_count") == output - n
    # Each request computes its uncached prompt tokens, then feeds back every output token but the last.
    assert delta(after, before, "iteration_tokens_total_sum") == prompt - hits + output - n
    for kind in ("cache_hit_input", "cache_miss_input", "output"):
        billed = sum(u["cost_details"][kind] for u in usages)
        assert billed > 0 or kind == "cache_hit_input"
        assert delta(after, before, "cost_usd_total", kind=kind) == pytest.approx(billed, rel=1e-6, abs=1e-12)
    for pool in KV_POOLS:
        assert 0 <= value(after, "kv_cache_pool_usage_perc", pool=pool) <= 1


def test_client_disconnect_counts_as_abort(live):
    base, engine = live
    wait_idle(engine)
    before = scrape(base)
    received = 0
    body = {"model": MODEL, "prompt": "A very long story", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                received += 1
                if received == 3:
                    break  # leaving the block closes the connection mid-stream
    wait_idle(engine)
    after = scrape(base)
    assert delta(after, before, "request_success_total", finished_reason="abort") == 1
    assert delta(after, before, "request_success_total", finished_reason="length") == 0
    generated = delta(after, before, "generation_tokens_total")
    assert 3 <= generated < 400
    assert delta(after, before, "e2e_request_latency_seconds_count") == 1
    assert delta(after, before, "cost_usd_total", kind="output") == 0  # an abandoned request is not billed
    assert value(after, "num_requests_running") == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_logs_stats_and_drains_on_sigterm(tiny_dir):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", tiny_dir, "--port", str(port),
           "--kv-cache-memory", "16MiB", "--max-num-seqs", "4", "--stats-interval", "0.3", "--drain-timeout", "30"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "dsv4 serve did not come up"
            time.sleep(0.2)

        chunks, result = [], {}
        worker = threading.Thread(target=lambda: result.update(usage=stream_chat(base, "Go on.", 60, chunks.append)))
        worker.start()
        while len(chunks) < 3 and worker.is_alive():
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        # Draining: /health says 503 (never an error page) while the running stream finishes; once
        # drained the listener closes, so a probe may also meet a closed or closing connection.
        while worker.is_alive():
            try:
                status = httpx.get(base + "/health", timeout=1).status_code
            except httpx.TransportError:
                break
            assert status in (200, 503), status  # 200 only before the signal handler has run
            time.sleep(0.05)
        worker.join(60)
        assert result["usage"]["completion_tokens"] == 60  # drained to the end, not cut off
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = proc.stdout.read()
    stats_lines = [line for line in log.splitlines() if "Avg prompt throughput" in line]
    assert any("Running: 1 reqs" in line for line in stats_lines), log[-3000:]
    assert "engine stopped" in log
