"""Fuzz the nine POST routes of a live server: generated bodies, 0 x 5xx and 0 hangs wanted.

    python -m bench.fuzz --requests 10000 --concurrency 8 --seed 0

starts `dsv4 serve` (the embedded demo model, one torch thread) on 127.0.0.1 at a free port
and fires `--requests` requests at it; `--base-url http://127.0.0.1:PORT` fuzzes a server that
is already running instead (loopback only: this is a hostile-input generator). Each request is
a valid body for its route (taken from the shapes `/openapi.json` publishes) with 0-4
mutations: fields set to random JSON of any type, dropped, or added; messages, tools and their
JSON schemas, stop strings, logit_bias and response formats scrambled; plus raw-byte cases
(broken or deeply nested JSON, lone surrogates, NaN, wrong content types, truncated bodies).
Outputs are kept short (max_tokens stays small unless a mutation makes it invalid).

Checks per answer: status < 500; errors carry the `{"error": {message, type, param, code}}`
envelope; a 200 stream ends with `data: [DONE]`; no request takes longer than `--timeout`
(a hang). Prints one JSON line: counts by route and status, 5xx, hangs, envelope violations,
tracebacks in the server log, wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
CHAT_ROUTES = ("/chat/completions", "/v1/chat/completions", "/beta/chat/completions", "/v1/beta/chat/completions")
COMPLETION_ROUTES = ("/v1/completions", "/beta/completions", "/v1/beta/completions")
ROUTES = CHAT_ROUTES + COMPLETION_ROUTES + ("/tokenize", "/detokenize")
MODELS = ("deepseek-chat", "deepseek-reasoner", "deepseek-v4-flash", "deepseek-v4-pro", "gpt-4o", "")
SCHEMA_KEYWORDS = ("type", "properties", "required", "items", "enum", "anyOf", "additionalProperties", "const")
CONTROL = ("<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "</think>", "<think>", "｜DSML｜")


class Generator:
    """Random request bodies; every choice comes from one seeded `random.Random`."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    # ---- random JSON -------------------------------------------------------------------

    def text(self) -> str:
        r = self.rng
        kind = r.random()
        if kind < 0.5:
            return " ".join(r.choice(["hello", "weather", "Paris", "42", "{", "}", "\"", "🙂", "汉字", "\n"])
                            for _ in range(r.randint(0, 12)))
        if kind < 0.7:
            return "".join(chr(r.choice([r.randint(0, 0x7F), r.randint(0x80, 0xD7FF), r.randint(0xE000, 0x10FFFF)]))
                           for _ in range(r.randint(0, 40)))
        if kind < 0.85:
            return r.choice(CONTROL) * r.randint(1, 3) + "hi"
        return r.choice(["", " ", "x" * r.randint(100, 3000), "\u0000", "\u202e"])

    def number(self):
        r = self.rng
        return r.choice([0, 1, -1, 2, 7, 16, 17, 100, 10**6, 2**31, 2**63, 10**30, -(10**9), 0.5, -0.0, 1e308,
                         float("nan"), float("inf"), 1.5, 2.0000001, r.randint(-50, 50), r.random() * 4 - 1])

    def value(self, depth: int = 0):
        r = self.rng
        kind = r.randint(0, 7 if depth < 3 else 4)
        if kind == 0:
            return None
        if kind == 1:
            return r.choice([True, False])
        if kind in (2, 3):
            return self.number()
        if kind == 4:
            return self.text()
        if kind == 5:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        return {r.choice(["type", "x", "name", "role", "content", "", "0"]): self.value(depth + 1)
                for _ in range(r.randint(0, 4))}

    def schema(self, depth: int = 0):
        r = self.rng
        if depth > 3 or r.random() < 0.15:
            return r.choice([True, False, {"type": r.choice(["string", "integer", "number", "boolean", "null"])},
                             self.value(depth)])
        schema = {"type": r.choice(["object", "array", "string", ["string", "null"], "objekt", 5, {}, []])}
        for keyword in r.sample(SCHEMA_KEYWORDS, r.randint(0, 4)):
            if keyword == "properties":
                schema[keyword] = {f"p{i}": self.schema(depth + 1) for i in range(r.randint(0, 3))} \
                    if r.random() < 0.8 else self.value(depth)
            elif keyword in ("items", "additionalProperties"):
                schema[keyword] = self.schema(depth + 1) if r.random() < 0.8 else self.value(depth)
            elif keyword == "anyOf":
                schema[keyword] = [self.schema(depth + 1) for _ in range(r.randint(0, 3))] \
                    if r.random() < 0.8 else self.value(depth)
            elif keyword == "required":
                schema[keyword] = r.choice([["p0"], ["p0", "p1"], [{}], 5, None, [], ["zz"]])
            else:
                schema[keyword] = self.value(depth + 1)
        return schema

    # ---- valid bodies, then mutations ----------------------------------------------------

    def messages(self) -> list:
        r = self.rng
        messages = []
        if r.random() < 0.3:
            messages.append({"role": "system", "content": self.text()})
        for i in range(r.randint(1, 4)):
            messages.append({"role": "user", "content": self.text() or "hi"})
            if r.random() < 0.3:
                messages.append({"role": "assistant", "content": self.text(), "reasoning_content": self.text()})
        if r.random() < 0.15:
            call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": r.choice(["{}", "{", "[1]"])}}
            messages += [{"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": r.choice(["c1", "c2"]), "content": self.text()}]
        if messages[-1]["role"] == "user" and r.random() < 0.1:
            messages.append({"role": "assistant", "content": self.text(), "prefix": True})
        return messages

    def chat_body(self) -> dict:
        r = self.rng
        body = {"model": r.choice(MODELS[:4]), "messages": self.messages(), "max_tokens": r.randint(1, 12)}
        if r.random() < 0.4:
            body["stream"] = True
            if r.random() < 0.3:
                body["stream_options"] = {"include_usage": r.choice([True, False])}
        if r.random() < 0.4:
            body["thinking"] = {"type": r.choice(["enabled", "disabled"])}
        if r.random() < 0.2:
            body["reasoning_effort"] = r.choice(["low", "medium", "high", "max", "none", "xhigh"])
        if r.random() < 0.3:
            body["tools"] = [{"type": "function", "function": {"name": f"f{i}", "description": self.text(),
                                                               "parameters": self.schema()}}
                             for i in range(r.randint(1, 3))]
            if r.random() < 0.3:
                body["tool_choice"] = r.choice(["auto", "none", "required", {"type": "function",
                                                                             "function": {"name": "f0"}}])
        if r.random() < 0.2:
            body["response_format"] = {"type": r.choice(["json_object", "text", "json_schema"])}
        if r.random() < 0.2:
            body["logprobs"] = True
            body["top_logprobs"] = r.randint(0, 5)
        self._sampling(body)
        return body

    def completion_body(self) -> dict:
        r = self.rng
        body = {"model": r.choice(MODELS[:4]), "prompt": self.text() or "def f(", "max_tokens": r.randint(1, 12)}
        if r.random() < 0.4:
            body["suffix"] = self.text()
        if r.random() < 0.3:
            body["stream"] = True
        if r.random() < 0.2:
            body["echo"] = True
        if r.random() < 0.2:
            body["logprobs"] = r.randint(0, 5)
        self._sampling(body)
        return body

    def _sampling(self, body: dict) -> None:
        r = self.rng
        if r.random() < 0.4:
            body["temperature"] = r.choice([0, 0.7, 1.0, 2.0])
        if r.random() < 0.2:
            body["top_p"] = r.choice([0, 0.5, 1])
        if r.random() < 0.3:
            body["stop"] = r.choice([self.text() or "x", [self.text() or "y" for _ in range(r.randint(1, 4))]])
        if r.random() < 0.15:
            body["seed"] = r.randint(0, 2**31)
        if r.random() < 0.15:
            body["n"] = r.randint(1, 3)
        if r.random() < 0.1:
            body["logit_bias"] = {str(r.randint(0, 600)): r.choice([-100, -5, 5, 100]) for _ in range(r.randint(1, 3))}
        if r.random() < 0.1:
            body["user_id"] = r.choice(["alice", "bad id!", "u" * 600])

    def tokenize_body(self) -> dict:
        r = self.rng
        if r.random() < 0.5:
            return {"prompt": self.text()}
        return {"model": "deepseek-chat", "messages": self.messages(), "return_token_strs": r.choice([True, False])}

    def detokenize_body(self) -> dict:
        r = self.rng
        return {"tokens": [r.randint(0, 600) for _ in range(r.randint(0, 20))]}

    def mutate(self, body: dict) -> dict:
        r = self.rng
        for _ in range(r.choice([0, 0, 0, 1, 1, 2, 4])):
            keys = list(body)
            op = r.random()
            if op < 0.35 and keys:
                key = r.choice(keys)
                body[key] = self.value()
            elif op < 0.5 and keys:
                body.pop(r.choice(keys))
            elif op < 0.6:
                body[r.choice(["max_tokens", "n", "stream", "temperature", "stop", "logit_bias", "seed", "top_p",
                               "tools", "messages", "prompt", "suffix", "logprobs", "echo", "thinking"])] = self.value()
            elif op < 0.8 and isinstance(body.get("messages"), list) and body["messages"]:
                message = r.choice(body["messages"])
                if isinstance(message, dict):
                    message[r.choice(["role", "content", "tool_calls", "reasoning_content", "prefix", "name"])] = \
                        self.value()
            elif op < 0.9:
                body[f"unknown_{r.randint(0, 9)}"] = self.value()
            else:
                body["max_tokens"] = r.choice([0, -1, "8", True, 8.5, 10**9, None, 2**70])
        return body

    def raw(self) -> tuple[bytes, dict]:
        r = self.rng
        cases = [
            b"", b"hello", b"[]", b"null", b"{", b'{"model": "deepseek-chat", "messages": [',
            b"[" * 50_000 + b"]" * 50_000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
            b'{"model": "deepseek-chat", "messages": [{"role": "user", "content": "\\ud800"}]}',
            b'{"model": "deepseek-chat", "max_tokens": NaN, "messages": [{"role": "user", "content": "x"}]}',
            b'{"model": "deepseek-chat", "max_tokens": 1e999, "messages": [{"role": "user", "content": "x"}]}',
            b"\xff\xfe\x00garbage", json.dumps({"model": "deepseek-chat", "messages": [{"role": "user",
                                                 "content": "x"}], "max_tokens": 2}).encode(),
        ]
        content_type = r.choice(["application/json", "application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "", "application/json; charset=latin-1", "multipart/form-data"])
        headers = {"content-type": content_type} if content_type else {}
        return r.choice(cases), headers

    def request(self) -> tuple[str, bytes, dict, bool]:
        """(route, body bytes, headers, expects a stream)."""
        r = self.rng
        route = r.choice(ROUTES)
        if r.random() < 0.08:
            body, headers = self.raw()
            return route, body, headers, False
        if route in CHAT_ROUTES:
            body = self.chat_body()
        elif route in COMPLETION_ROUTES:
            body = self.completion_body()
        elif route == "/tokenize":
            body = self.tokenize_body()
        else:
            body = self.detokenize_body()
        body = self.mutate(body)
        data = json.dumps(body, allow_nan=True).encode()
        return route, data, {"content-type": "application/json"}, body.get("stream") is True


class Tally:
    def __init__(self):
        self.statuses: Counter = Counter()
        self.by_route: dict[str, Counter] = {}
        self.server_errors: list = []
        self.hangs: list = []
        self.bad_envelopes: list = []
        self.unfinished_streams: list = []

    def record(self, route: str, status: int) -> None:
        self.statuses[status] += 1
        self.by_route.setdefault(route, Counter())[status] += 1


async def _send(client: httpx.AsyncClient, route: str, body: bytes, headers: dict, tally: Tally, index: int) -> None:
    async with client.stream("POST", route, content=body, headers=headers) as resp:
        chunks = [chunk async for chunk in resp.aiter_bytes()]
    data = b"".join(chunks)
    tally.record(route, resp.status_code)
    sample = (index, route, body[:300].decode("utf-8", "replace"), data[:300].decode("utf-8", "replace"))
    if resp.status_code >= 500:
        tally.server_errors.append(sample)
    elif resp.status_code >= 400:
        try:
            error = json.loads(data)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
        except Exception:
            tally.bad_envelopes.append(sample)
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        if not data.rstrip().endswith(b"data: [DONE]"):
            tally.unfinished_streams.append(sample)


async def fuzz(base_url: str, requests: int, concurrency: int, seed: int, timeout: float,
               headers: dict | None = None) -> Tally:
    generator = Generator(seed)
    tally = Tally()
    queue = [generator.request() for _ in range(requests)]
    next_index = 0

    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout + 5,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker():
            nonlocal next_index
            while next_index < len(queue):
                index = next_index
                next_index += 1
                route, body, request_headers, _ = queue[index]
                try:
                    await asyncio.wait_for(_send(client, route, body, request_headers, tally, index), timeout)
                except asyncio.TimeoutError:
                    tally.hangs.append((index, route, body[:300].decode("utf-8", "replace")))
                except httpx.TransportError as err:  # the server closed on us: as bad as a 5xx
                    tally.server_errors.append((index, route, body[:300].decode("utf-8", "replace"), repr(err)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log_path: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--stats-interval", "0", "--log-level", "warning", *extra],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {Path(log_path).read_text()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("the server did not come up")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds after which a request is a hang")
    parser.add_argument("--base-url", default=None, help="a running server on 127.0.0.1 (default: start one)")
    # A short context keeps a mutated or missing max_tokens from turning into minutes of output.
    parser.add_argument("--server-args", default="--max-queue 4096 --max-model-len 512",
                        help="extra `dsv4 serve` flags")
    args = parser.parse_args(argv)

    proc, log_path = None, None
    if args.base_url is None:
        log_path = tempfile.mktemp(prefix="dsv4-fuzz-", suffix=".log")
        proc, base = start_server(log_path, args.server_args.split())
    else:
        if urlparse(args.base_url).hostname not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--base-url must be a loopback address")
        base = args.base_url.rstrip("/")
    start = time.monotonic()
    try:
        tally = asyncio.run(fuzz(base, args.requests, args.concurrency, args.seed, args.timeout))
        health = httpx.get(base + "/health", timeout=10).status_code
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    log = Path(log_path).read_text() if log_path else ""
    report = {
        "requests": args.requests, "answered": sum(tally.statuses.values()),
        "statuses": dict(sorted(tally.statuses.items())),
        "by_route": {route: dict(sorted(c.items())) for route, c in sorted(tally.by_route.items())},
        "server_errors_5xx": len(tally.server_errors), "hangs": len(tally.hangs),
        "bad_error_envelopes": len(tally.bad_envelopes), "streams_without_done": len(tally.unfinished_streams),
        "server_log_tracebacks": log.count("Traceback"), "health_after": health,
        "exit_status": None if proc is None else proc.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "samples": {"5xx": tally.server_errors[:5], "hangs": tally.hangs[:5], "envelopes": tally.bad_envelopes[:5],
                    "streams": tally.unfinished_streams[:5]},
    }
    print(json.dumps(report, ensure_ascii=False))


if __name__ == "__main__":
    main()
