"""`dsv4 bench serve` against a small real HTTP server (FastAPI + uvicorn in a thread) that streams
OpenAI-shaped SSE chunks and a DeepSeek-style `usage` with cache-hit counts."""

import argparse
import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench import bench_serve

MODEL = "fake-model"
FLAKY_MODEL = "flaky-model"  # every third request of this model gets HTTP 500
STOP_AFTER = 3  # without ignore_eos the fake model "emits eos" after this many tokens


class FakeServer:
    """What the fake server saw and answered; read by the tests after a run."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.generated: set[str] = set()
        self.checkpoints: set[tuple[str, ...]] = set()  # word sequences that later prompts may hit
        self.prompt_tokens = self.hit_tokens = 0
        self.in_flight = self.peak_in_flight = 0
        self.requests = 0

    def cache_lookup(self, words: tuple[str, ...]) -> int:
        """Longest checkpoint that is a strict prefix of `words` (the V4 'full unit' rule)."""
        return max((len(c) for c in self.checkpoints if len(c) < len(words) and words[: len(c)] == c), default=0)


def _prompt_words(messages: list[dict]) -> tuple[str, ...]:
    return tuple(word for message in messages for word in message["content"].split())


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def make_app(state: FakeServer) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state.bodies.append(body)
        state.requests += 1
        number = state.requests
        if body["model"] not in (MODEL, FLAKY_MODEL):
            return JSONResponse({"error": {"message": "Model Not Exist", "type": "invalid_request_error"}}, 404)
        if body["model"] == FLAKY_MODEL and number % 3 == 0:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)

        words = _prompt_words(body["messages"])
        hits = state.cache_lookup(words)
        state.prompt_tokens += len(words)
        state.hit_tokens += hits
        system = [m for m in body["messages"] if m["role"] == "system"]
        if system:
            state.checkpoints.add(_prompt_words(system))
        state.checkpoints.add(words)
        num_tokens = body["max_tokens"] if body.get("ignore_eos") else min(body["max_tokens"], STOP_AFTER)
        pieces = [f"r{number}t{i}" for i in range(num_tokens)]
        answer = " ".join(pieces)
        state.generated.add(answer)

        async def stream():
            base = {"id": f"chatcmpl-{number}", "object": "chat.completion.chunk", "model": body["model"]}
            state.in_flight += 1
            state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
            try:
                yield ": keep-alive\n\n"
                yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None}]})
                for i, piece in enumerate(pieces):
                    await asyncio.sleep(0.002)
                    text = piece if i == 0 else " " + piece
                    yield _sse({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
            finally:
                state.in_flight -= 1  # before the client can see the end and send its next request
            state.checkpoints.add(words + tuple(answer.split()))
            usage = {"prompt_tokens": len(words), "completion_tokens": num_tokens,
                     "total_tokens": len(words) + num_tokens, "prompt_cache_hit_tokens": hits,
                     "prompt_cache_miss_tokens": len(words) - hits}
            reason = "length" if num_tokens == body["max_tokens"] else "stop"
            yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}], "usage": usage})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server_url():
    state_holder = {"state": FakeServer()}

    class Proxy:  # lets each test swap in a fresh FakeServer without restarting uvicorn
        def __getattr__(self, name):
            return getattr(state_holder["state"], name)

        def __setattr__(self, name, value):
            setattr(state_holder["state"], name, value)

    app = make_app(Proxy())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}/v1", state_holder
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def fake(server_url):
    url, holder = server_url
    holder["state"] = FakeServer()
    return url, holder["state"]


def _args(base_url: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    return parser.parse_args(["--base-url", base_url, "--no-progress", "--seed", "7", *extra])


def _assert_ordered(distribution: dict) -> None:
    assert distribution["mean"] > 0
    assert 0 < distribution["p50"] <= distribution["p90"] <= distribution["p99"]


def test_random_dataset_counts_percentiles_and_json(fake, tmp_path, capsys):
    url, state = fake
    out = tmp_path / "result.json"
    report = bench_serve.run(_args(url, "--model", MODEL, "--num-prompts", "12", "--input-len", "20",
                                   "--output-len", "5", "--ignore-eos", "--max-concurrency", "3",
                                   "--output-json", str(out)))
    assert report["num_requests"] == report["completed"] == 12
    assert report["errors"] == 0 and report["error_samples"] == []
    assert report["total_output_tokens"] == 12 * 5
    assert report["total_input_tokens"] == state.prompt_tokens == 12 * 20
    assert report["requests_without_usage"] == 0
    assert all(len(b["messages"]) == 1 and len(b["messages"][0]["content"].split()) == 20 for b in state.bodies)
    assert all(b["ignore_eos"] is True and b["stream_options"] == {"include_usage": True} and b["stream"]
               for b in state.bodies)
    assert 1 <= report["peak_concurrency"] <= 3 and state.peak_in_flight <= 3
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        _assert_ordered(report[key])
    assert report["e2e_ms"]["mean"] > report["ttft_ms"]["mean"]
    assert report["itl_ms"]["p99"] < report["e2e_ms"]["p99"]
    assert report["output_token_throughput"] == pytest.approx(60 / report["duration_s"])
    assert report["request_throughput"] == pytest.approx(12 / report["duration_s"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert "Successful requests" in capsys.readouterr().out


def test_ignore_eos_is_sent_only_when_asked_and_model_comes_from_models(fake):
    url, state = fake
    report = bench_serve.run(_args(url, "--num-prompts", "4", "--input-len", "3", "--output-len", "8"))
    assert report["config"]["model"] == MODEL
    assert all("ignore_eos" not in b for b in state.bodies)
    assert report["total_output_tokens"] == 4 * STOP_AFTER  # the fake model stopped early


def test_shared_prefix_resends_answers_and_hit_rate_matches_usage(fake):
    url, state = fake
    report = bench_serve.run(_args(url, "--model", MODEL, "--dataset", "shared-prefix", "--num-prompts", "7",
                                   "--num-turns", "3", "--prefix-len", "50", "--input-len", "5",
                                   "--output-len", "4", "--ignore-eos", "--request-rate", "500"))
    assert report["completed"] == 7 and report["errors"] == 0
    systems = {b["messages"][0]["content"] for b in state.bodies}
    assert len(systems) == 1 and len(next(iter(systems)).split()) == 50
    turns = sorted(sum(m["role"] == "user" for m in b["messages"]) for b in state.bodies)
    assert turns == [1, 1, 1, 2, 2, 3, 3]  # conversations of 3, 3 and 1 turns
    resent = [m["content"] for b in state.bodies for m in b["messages"] if m["role"] == "assistant"]
    assert len(resent) == 1 + 1 + 2 + 2 and set(resent) <= state.generated
    assert report["total_cache_hit_tokens"] == state.hit_tokens > 0
    assert report["cache_hit_rate"] == pytest.approx(state.hit_tokens / state.prompt_tokens)


def test_http_errors_are_counted_not_raised(fake):
    url, state = fake
    report = bench_serve.run(_args(url, "--model", FLAKY_MODEL, "--num-prompts", "9", "--input-len", "4",
                                   "--output-len", "2", "--max-concurrency", "1"))
    assert report["num_requests"] == 9
    assert report["errors"] == 3 and report["completed"] == 6
    assert report["error_samples"][0].startswith("HTTP 500")


def test_failed_turn_skips_the_rest_of_its_conversation(fake):
    url, state = fake
    report = bench_serve.run(_args(url, "--model", "no-such-model", "--dataset", "shared-prefix",
                                   "--num-prompts", "5", "--num-turns", "2", "--prefix-len", "3",
                                   "--input-len", "2", "--output-len", "2"))
    assert report["num_requests"] == 5 and report["errors"] == 5 and report["completed"] == 0
    assert len(state.bodies) == 3  # first turn of each of the 3 conversations, then skipped
    assert report["cache_hit_rate"] is None and report["ttft_ms"]["p50"] is None
    assert any(e.startswith("HTTP 404") for e in report["error_samples"])


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert bench_serve._percentile(values, 50) == 2.5
    assert bench_serve._percentile(values, 90) == pytest.approx(3.7)
    assert bench_serve._percentile([5.0], 99) == 5.0


@pytest.mark.parametrize("flag, value", [("--request-rate", "0"), ("--num-prompts", "0"),
                                         ("--max-concurrency", "0"), ("--output-len", "-1")])
def test_bad_arguments_raise_value_error_naming_the_flag(flag, value):
    with pytest.raises(ValueError, match=flag):
        bench_serve.run(_args("http://127.0.0.1:9", "--model", MODEL, flag, value))


def test_conversations_total_num_prompts_and_are_seeded():
    args = _args("http://x", "--dataset", "shared-prefix", "--num-prompts", "10", "--num-turns", "4")
    conversations = bench_serve.build_conversations(args)
    assert [len(c.user_turns) for c in conversations] == [4, 4, 2]
    assert bench_serve.build_conversations(args) == conversations
    other = bench_serve.build_conversations(_args("http://x", "--seed", "8", "--num-prompts", "10"))
    assert other != bench_serve.build_conversations(_args("http://x", "--num-prompts", "10"))


def test_progress_bar_writes_one_line_to_stderr(capsys):
    progress = bench_serve._Progress(total=3, enabled=True, width=6)
    for ok in (True, False, True):
        progress.advance(ok)
    err = capsys.readouterr().err
    assert err.endswith("\r[######] 3/3 requests, 1 errors\n")
    assert "[##....] 1/3 requests, 0 errors" in err


def test_unreachable_models_endpoint_is_a_value_error():
    with pytest.raises(ValueError, match="--model"):
        bench_serve.run(_args("http://127.0.0.1:9", "--num-prompts", "1", "--timeout", "2"))
