"""Soak: a live server kept saturated for a fixed time; its RSS sampled throughout.

    python -m bench.soak --minutes 30 --concurrency 24 --max-num-seqs 8

starts `dsv4 serve` (the embedded demo model, one torch thread, 127.0.0.1) and keeps
`--concurrency` clients busy (more than `--max-num-seqs`, so requests queue: saturation):
a mix of streamed and plain chat requests of varied prompt and output lengths, some cut off
mid-way, some prompts shared (prefix-cache hits), a few invalid. Every `--sample-seconds` it
records the server's RSS (from /proc) and the engine's queue and KV gauges (from /metrics).
Prints one JSON line: RSS at start (after a warm-up), minimum, maximum and end, the slope of a
least-squares line through the samples after warm-up (MiB per 10 minutes), request counts by
outcome, and whether /health is still 200. The box is shared, so the engine runs one torch
thread; the duration is bounded by `--minutes`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.fuzz import start_server

WORDS = "the quick brown fox jumps over a lazy dog while seven tired wizards count stars in Paris".split()
SHARED_SYSTEM = "You are a helpful assistant. " * 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def gauges(base: str) -> dict:
    text = httpx.get(base + "/metrics", timeout=10).text
    wanted = ("dsv4:num_requests_running", "dsv4:num_requests_waiting", "dsv4:kv_cache_usage_perc")
    values = {}
    for line in text.splitlines():
        for name in wanted:
            if line.startswith(name + "{"):
                values[name.split(":")[1]] = float(line.rsplit(" ", 1)[1])
    return values


def _body(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": SHARED_SYSTEM}] if rng.random() < 0.5 else []
    messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 200)))})
    body = {"model": rng.choice(["deepseek-chat", "deepseek-reasoner"]), "messages": messages,
            "max_tokens": rng.randint(8, 160), "stream": rng.random() < 0.6}
    if rng.random() < 0.05:
        body["max_tokens"] = "many"  # an invalid one now and then: 422
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(WORDS)]
    return body


async def load(base: str, seconds: float, concurrency: int, seed: int, outcomes: Counter) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        async def one(body: dict) -> None:
            if body["stream"]:
                async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    async for _ in resp.aiter_lines():
                        pass
            else:
                resp = await client.post("/v1/chat/completions", json=body)
            outcomes[str(resp.status_code)] += 1

        async def worker() -> None:
            while time.monotonic() < deadline:
                body = _body(rng)
                cut = rng.random() < 0.15
                try:
                    await asyncio.wait_for(one(body), rng.uniform(0.1, 3.0) if cut else None)
                except asyncio.TimeoutError:
                    outcomes["cut_by_client"] += 1
                except httpx.TransportError:
                    outcomes["transport_error"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def sample(pid: int, base: str, seconds: float, every: float, samples: list) -> None:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        point = {"t": round(time.monotonic() - start, 1), "rss_mib": round(rss_mib(pid), 1)}
        try:
            point.update(await asyncio.to_thread(gauges, base))
        except httpx.HTTPError:
            pass
        samples.append(point)
        await asyncio.sleep(every)


def slope_per_10_min(points: list[dict]) -> float:
    ts = [p["t"] for p in points]
    ys = [p["rss_mib"] for p in points]
    mean_t, mean_y = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mean_t) ** 2 for t in ts)
    return 0.0 if var == 0 else sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys)) / var * 600


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0, help="excluded from the RSS slope")
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-out", default=None, help="write every sample here as JSON")
    parser.add_argument("--server-args", default="", help="extra `dsv4 serve` flags (e.g. --no-prefix-cache)")
    args = parser.parse_args(argv)

    log_path = "/tmp/dsv4-soak.log"
    proc, base = start_server(log_path, ["--max-num-seqs", str(args.max_num_seqs), "--max-queue", "4096",
                                         "--max-model-len", "4096", *args.server_args.split()])
    outcomes: Counter = Counter()
    samples: list[dict] = []
    seconds = args.minutes * 60

    async def run():
        await asyncio.gather(load(base, seconds, args.concurrency, args.seed, outcomes),
                             sample(proc.pid, base, seconds, args.sample_seconds, samples))

    try:
        asyncio.run(run())
        time.sleep(2)
        end_rss = rss_mib(proc.pid)
        health = httpx.get(base + "/health", timeout=10).status_code
        idle = gauges(base)
    finally:
        proc.terminate()
        proc.wait(60)
    steady = [p for p in samples if p["t"] >= args.warmup_minutes * 60] or samples
    report = {
        "minutes": args.minutes, "concurrency": args.concurrency, "max_num_seqs": args.max_num_seqs,
        "rss_mib": {"first_sample": samples[0]["rss_mib"], "after_warmup": steady[0]["rss_mib"],
                    "min": min(p["rss_mib"] for p in steady), "max": max(p["rss_mib"] for p in steady),
                    "end_idle": round(end_rss, 1)},
        "rss_slope_mib_per_10min_after_warmup": round(slope_per_10_min(steady), 2),
        "mean_waiting": round(sum(p.get("num_requests_waiting", 0) for p in steady) / len(steady), 1),
        "mean_running": round(sum(p.get("num_requests_running", 0) for p in steady) / len(steady), 1),
        "outcomes": dict(outcomes), "health_after": health, "idle_gauges_after": idle,
        "exit_status": proc.returncode, "server_log_tracebacks": Path(log_path).read_text().count("Traceback"),
    }
    if args.samples_out:
        Path(args.samples_out).write_text(json.dumps(samples))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
