"""Abort storm: many requests against a live server, most cut off by the client at a random
moment (before the first token, mid-stream, mid-prefill, after the end), then an audit of the
engine: nothing running or waiting, every KV pool back to zero once the prefix-cache
checkpoints are evicted, and `check_integrity` clean.

    python -m bench.abort_storm --requests 1000 --concurrency 64

starts the embedded demo model behind a real HTTP server on 127.0.0.1 (one torch thread) and
prints one JSON line. tests/server/test_reliability.py runs the same storm at a small scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import httpx

WORDS = "the quick brown fox jumps over a lazy dog while seven tired wizards count stars".split()


@dataclass
class StormResult:
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    statuses: dict = field(default_factory=dict)  # HTTP status -> count, for answers received
    seconds: float = 0.0


def _body(rng: random.Random, stream: bool) -> dict:
    words = rng.choices(WORDS, k=rng.randint(1, 120))
    return {"model": "deepseek-chat", "stream": stream, "max_tokens": rng.randint(1, 256),
            "ignore_eos": rng.random() < 0.5, "temperature": rng.choice([0.0, 0.7, 1.0]),
            "messages": [{"role": "user", "content": " ".join(words)}]}


async def _one(client: httpx.AsyncClient, url: str, body: dict, result: StormResult) -> None:
    if body["stream"]:
        async with client.stream("POST", url, json=body) as resp:
            result.statuses[resp.status_code] = result.statuses.get(resp.status_code, 0) + 1
            async for _ in resp.aiter_lines():
                pass
    else:
        resp = await client.post(url, json=body)
        result.statuses[resp.status_code] = result.statuses.get(resp.status_code, 0) + 1


async def storm(base_url: str, requests: int, concurrency: int, seed: int = 0, headers: dict | None = None,
                disconnect_fraction: float = 0.8, max_wait: float = 1.5) -> StormResult:
    """`requests` chat requests, `concurrency` at a time; each one is cut off after a random
    wait in [0, max_wait) s with probability `disconnect_fraction` (closing its connection)."""
    rng = random.Random(seed)
    result = StormResult(requests=requests)
    url = base_url + "/v1/chat/completions"
    gate = asyncio.Semaphore(concurrency)
    start = time.monotonic()
    # One connection per request: a cut-off request closes its own socket, as a real client does.
    async with httpx.AsyncClient(headers=headers, timeout=120,
                                 limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)) as client:
        async def run(i: int) -> None:
            body = _body(rng, stream=rng.random() < 0.6)
            cut = rng.random() < disconnect_fraction
            wait = rng.uniform(0, max_wait)
            async with gate:
                try:
                    await asyncio.wait_for(_one(client, url, body, result), wait if cut else None)
                    result.completed += 1
                except asyncio.TimeoutError:
                    result.disconnected += 1

        await asyncio.gather(*(run(i) for i in range(requests)))
    result.seconds = round(time.monotonic() - start, 2)
    return result


def audit(core) -> dict:
    """On the engine thread (`AsyncEngine.run_in_engine_thread`): live usage, then evict the
    prefix-cache checkpoints and check every ref count; raises if the cache is inconsistent."""
    before = core.stats()
    core.kv_manager.evict_all_checkpoints()
    core.kv_manager.check_integrity()
    pools = core.stats()["kv_cache"]["pools"]
    return {"running": before["running"], "waiting": before["waiting"],
            "live_fraction": before["kv_cache"]["live_fraction"],
            "pools_after_eviction": {name: {"live": p["live"], "cached": p["cached"]} for name, p in pools.items()},
            "every_pool_zero": all(p["live"] == 0 and p["cached"] == 0 for p in pools.values())}


def wait_idle(engine, timeout: float = 60.0) -> None:
    """Until no request is in flight (aborts land at step boundaries)."""
    deadline = time.monotonic() + timeout
    while engine.num_in_flight or engine.stats()["running"] or engine.stats()["waiting"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"requests still in flight after {timeout} s: {engine.stats()}")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from engine.async_engine import AsyncEngine
    from engine.engine_config import EngineConfig
    from server.app import BackgroundServer, create_app
    from server.serve_config import ServeConfig

    engine = AsyncEngine(EngineConfig(model=None, max_num_seqs=args.max_num_seqs), max_queue=4096)
    server = BackgroundServer(create_app(engine, ServeConfig(stats_interval=0)))
    base = server.start()
    try:
        result = asyncio.run(storm(base, args.requests, args.concurrency, args.seed))
        wait_idle(engine)
        report = asyncio.run(engine.run_in_engine_thread(audit))
        print(json.dumps({"storm": asdict(result), "audit": report, "in_flight": engine.num_in_flight}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
