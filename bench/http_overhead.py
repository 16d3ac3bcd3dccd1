"""What the HTTP front end costs: bare ``LLM.generate`` vs ``dsv4 serve`` ``/v1/completions``.

One checkpoint (default: the embedded demo model), the same text prompts, ``--gen`` greedy tokens
each (``ignore_eos``). For each concurrency C, rounds alternate
  bare    — ``LLM.generate`` on C prompts in this process
  http    — C concurrent non-streaming ``/v1/completions`` against a ``dsv4 serve`` subprocess
  stream  — the same with ``stream: true`` (SSE, every chunk read)
``--rounds`` times each (bare, http, stream, bare, http, stream, ...), then compares medians of the
generated tokens/s. The server runs in its own process (its own interpreter, as in production),
both sides with ``--threads`` torch threads; the client (raw asyncio sockets, every byte read)
runs here and is idle during bare rounds.

    python bench/http_overhead.py [--concurrency 1 32 128] [--rounds 3] [--gen 64] [--server-arg=--flag ...]

``--compare-server-arg FLAG`` (repeatable) adds a second server started with those extra flags to
the same alternation ("alt http" / "alt stream" columns), e.g. to compare two serving layouts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT_WORDS = ("the", "river", "stone", "light", "small", "garden", "morning", "over", "quiet", "road")


def text_prompts(n: int) -> list[str]:
    """n distinct short English-like prompts (distinct, so the prefix cache does not serve them)."""
    return [" ".join(PROMPT_WORDS[(i * 7 + j * 3) % len(PROMPT_WORDS)] for j in range(12)) + f" {i}"
            for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, env: dict, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--log-level", "warning",
           "--max-num-seqs", str(args.max_num_seqs), "--max-queue", "4096", *args.server_arg, *extra]
    if args.model:
        cmd += ["--model", args.model]
    return subprocess.Popen(cmd, cwd=ROOT, env=env)


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} during startup")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server did not become healthy")


def run_bare(llm, prompts: list[str], gen: int) -> float:
    from engine import SamplingParams

    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    return sum(len(o.token_ids) for o in outs) / dt


COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')


async def one_request(host: str, port: int, prompt: str, gen: int, stream: bool) -> int:
    """One /v1/completions over a raw socket (HTTP/1.1, Connection: close), the whole body read.
    The client shares the box's 2 cores with the server: a full HTTP client library would cost
    more CPU than the server work being measured, so this one only reads bytes and, at the end,
    finds the usage's completion_tokens."""
    body = {"model": "deepseek-v4-flash", "prompt": prompt, "max_tokens": gen, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % (host.encode(), len(payload)) + payload)
    await writer.drain()
    tail = b""
    status = None
    while True:
        data = await reader.read(65536)
        if not data:
            break
        if status is None:
            status = data[9:12]
        tail = (tail + data)[-4096:]  # usage arrives in the last chunk
    writer.close()
    if status != b"200":
        raise RuntimeError(f"HTTP {status!r}: {tail[-300:]!r}")
    found = COMPLETION_TOKENS.findall(tail)
    if not found:
        raise RuntimeError(f"no usage in the reply: {tail[-300:]!r}")
    return int(found[-1])


async def run_http(base: str, prompts: list[str], gen: int, stream: bool) -> float:
    host, port = base.removeprefix("http://").split(":")
    t = time.perf_counter()
    counts = await asyncio.gather(*(one_request(host, int(port), p, gen, stream) for p in prompts))
    dt = time.perf_counter() - t
    if any(c != gen for c in counts):
        raise RuntimeError(f"expected {gen} tokens per request, got {sorted(set(counts))}")
    return sum(counts) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded demo model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds per mode (>= 3)")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on each side")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `dsv4 serve` flag (repeatable)")
    ap.add_argument("--compare-server-arg", action="append", default=[],
                    help="start a second server with this extra flag (repeatable), in the same alternation")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=ROOT)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from engine import LLM

    servers = {"": (free_port(), [])}
    if args.compare_server_arg:
        servers["alt "] = (free_port(), list(args.compare_server_arg))
    procs = {label: start_server(args, port, env, extra) for label, (port, extra) in servers.items()}
    bases = {label: f"http://127.0.0.1:{port}" for label, (port, _) in servers.items()}
    try:
        llm = LLM(args.model, max_num_seqs=args.max_num_seqs)
        for label, base in bases.items():
            wait_healthy(base, procs[label])
        # Warm every side (first-call allocations, lazy imports) before anything is timed.
        run_bare(llm, text_prompts(4), 8)
        for base in bases.values():
            asyncio.run(run_http(base, text_prompts(4), 8, stream=False))
            asyncio.run(run_http(base, text_prompts(4), 8, stream=True))
        results = {}
        for c in args.concurrency:
            prompts = text_prompts(c)
            rates: dict[str, list[float]] = {"bare": []}
            for _ in range(args.rounds):
                rates["bare"].append(run_bare(llm, prompts, args.gen))
                for label, base in bases.items():
                    for stream in (False, True):
                        rate = asyncio.run(run_http(base, prompts, args.gen, stream=stream))
                        rates.setdefault(label + ("stream" if stream else "http"), []).append(rate)
            med = {k: statistics.median(v) for k, v in rates.items()}
            results[c] = {"rounds": rates, "median": med}
            print(f"C={c:4d}  bare {med['bare']:7.1f} tok/s" + "".join(
                f"   {k} {m:7.1f} ({m / med['bare']:.2f}x)" for k, m in med.items() if k != "bare")
                + "   rounds: " + "; ".join(f"{k} " + " ".join(f"{x:.0f}" for x in v) for k, v in rates.items()),
                flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=1)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
