"""Load generator behind `dsv4 bench serve`.

Streams chat completions from any OpenAI-compatible server and reports latency percentiles,
throughput and the prefix-cache hit rate read from `usage`. Client side only: it knows nothing
about the engine. Definitions follow the vLLM/SGLang bench tools:

  TTFT  request sent -> first token-carrying chunk (content, reasoning or tool call)
  TPOT  (e2e - TTFT) / (output tokens - 1), one value per request
  ITL   gaps between successive token-carrying chunks, pooled over all requests
  e2e   request sent -> end of stream

Datasets: `random` (one prompt of --input-len random words per request) and `shared-prefix`
(conversations that share one long system prompt; turn k resends turns 1..k-1 with the answers
the server gave, so later turns can hit the cache). --request-rate paces request starts (for
shared-prefix, conversation starts) as a Poisson process; --max-concurrency caps requests in
flight. The run always stops after --num-prompts requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import httpx
except ImportError:  # `dsv4 bench serve --help` works without it; a run says what to install
    httpx = None

# Plain words so the token count per word stays near that of ordinary English text.
_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact be have do say get make go know take see come think look "
    "want give use find tell ask seem feel try leave call good new first last long great little own other "
    "old right big high different small large next early young important few public bad same able river "
    "mountain window garden kitchen market letter doctor village engine network signal memory answer "
    "question story music paper water light stone summer winter morning evening reason matter system "
    "program history method result model table chapter ocean forest bridge castle harbor island valley"
).split()

_PERCENTILES = (50, 90, 99)


@dataclass
class Conversation:
    """User turns sent one after another; each turn resends the earlier turns and answers."""

    system_prompt: str | None
    user_turns: list[str]


@dataclass
class RequestResult:
    """What the client saw for one request. Times are seconds."""

    ok: bool
    error: str | None = None
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0
    num_cache_hit_tokens: int = 0
    has_usage: bool = False
    text: str = ""  # generated content, resent as the assistant turn in later turns
    finished_at: float = 0.0

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.num_output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.num_output_tokens - 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                        help="OpenAI-compatible base URL (the part before /chat/completions)")
    parser.add_argument("--model", default=None, help="model name; default: the first one GET /models lists")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--dataset", choices=("random", "shared-prefix"), default="random")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send in total")
    parser.add_argument("--input-len", type=int, default=256,
                        help="words per prompt (per user turn for shared-prefix)")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send 'ignore_eos: true' so every request generates --output-len tokens")
    parser.add_argument("--prefix-len", type=int, default=1024,
                        help="shared-prefix: words in the system prompt all conversations share")
    parser.add_argument("--num-turns", type=int, default=4, help="shared-prefix: user turns per conversation")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests (shared-prefix: conversations) per second, Poisson; inf = all at once")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts and arrival times")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one request is given up")
    parser.add_argument("--output-json", default=None, help="write the results to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by `args`; print a summary; return (and maybe save) the results."""
    if httpx is None:
        raise SystemExit("dsv4 bench serve needs httpx: pip install -e \".[client]\" (or pip install httpx)")
    _validate(args)
    base_url = args.base_url.rstrip("/")
    model = args.model or _first_served_model(base_url, args.api_key, args.timeout)
    conversations = build_conversations(args)
    results, timing = asyncio.run(_run_all(args, base_url, model, conversations))
    report = summarize(results, timing)
    report["config"] = {
        "base_url": base_url, "model": model, "dataset": args.dataset, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len, "ignore_eos": args.ignore_eos,
        "prefix_len": args.prefix_len if args.dataset == "shared-prefix" else None,
        "num_turns": args.num_turns if args.dataset == "shared-prefix" else None,
        "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency, "seed": args.seed,
    }
    print(format_summary(report))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="dsv4 bench serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _validate(args: argparse.Namespace) -> None:
    positive_ints = ["num_prompts", "input_len", "output_len", "num_turns", "prefix_len"]
    for name in positive_ints:
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency!r}")
    if math.isnan(args.request_rate) or args.request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (inf = all at once), got {args.request_rate!r}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout!r}")
    if not args.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {args.base_url!r}")


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _first_served_model(base_url: str, api_key: str | None, timeout: float) -> str:
    try:
        response = httpx.get(f"{base_url}/models", headers=_headers(api_key), timeout=timeout)
        response.raise_for_status()
        models = response.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        raise ValueError(f"cannot list models at {base_url}/models ({exc}); pass --model") from exc
    if not models:
        raise ValueError(f"{base_url}/models lists no models; pass --model")
    return models[0]["id"]


# ---- dataset -----------------------------------------------------------------------------------


def _random_text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


def build_conversations(args: argparse.Namespace) -> list[Conversation]:
    """Exactly `num_prompts` user turns in total, deterministic for a given --seed."""
    rng = random.Random(args.seed)
    if args.dataset == "random":
        return [Conversation(None, [_random_text(rng, args.input_len)]) for _ in range(args.num_prompts)]
    system_prompt = _random_text(rng, args.prefix_len)
    conversations, remaining = [], args.num_prompts
    while remaining > 0:
        turns = min(args.num_turns, remaining)
        conversations.append(Conversation(system_prompt, [_random_text(rng, args.input_len) for _ in range(turns)]))
        remaining -= turns
    return conversations


# ---- sending -----------------------------------------------------------------------------------


class _Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = total, enabled, width
        self.done = self.errors = 0

    def advance(self, ok: bool) -> None:
        self.done += 1
        self.errors += not ok
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if self.done == self.total else ""
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} requests, {self.errors} errors{end}")
        sys.stderr.flush()


class _Runner:
    """Sends the conversations and collects one RequestResult per user turn."""

    def __init__(self, args, client: httpx.AsyncClient, model: str, total: int):
        self.args, self.client, self.model = args, client, model
        self.limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        self.progress = _Progress(total, enabled=not args.no_progress)
        self.in_flight = self.peak_in_flight = 0

    async def conversation(self, conversation: Conversation) -> list[RequestResult]:
        messages = [{"role": "system", "content": conversation.system_prompt}] if conversation.system_prompt else []
        results = []
        for i, turn in enumerate(conversation.user_turns):
            messages.append({"role": "user", "content": turn})
            result = await self._limited(messages)
            results.append(result)
            self.progress.advance(result.ok)
            if not result.ok:
                # The next turn would resend an answer we never got: count the rest as failed.
                for _ in conversation.user_turns[i + 1:]:
                    results.append(RequestResult(ok=False, error="skipped: an earlier turn failed",
                                                 finished_at=time.perf_counter()))
                    self.progress.advance(False)
                break
            messages.append({"role": "assistant", "content": result.text})
        return results

    async def _limited(self, messages: list[dict]) -> RequestResult:
        if self.limit is None:
            return await self._tracked(messages)
        async with self.limit:
            return await self._tracked(messages)

    async def _tracked(self, messages: list[dict]) -> RequestResult:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._send(messages)
        finally:
            self.in_flight -= 1

    def _body(self, messages: list[dict]) -> dict:
        body = {
            "model": self.model,
            "messages": list(messages),
            "max_tokens": self.args.output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.args.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def _send(self, messages: list[dict]) -> RequestResult:
        sent_at = time.perf_counter()
        result = RequestResult(ok=False)
        try:
            await self._stream_into(result, self._body(messages), sent_at)
        except (httpx.HTTPError, json.JSONDecodeError, ValueError) as exc:
            result.ok, result.error = False, f"{type(exc).__name__}: {exc}"
        result.finished_at = time.perf_counter()
        result.e2e = result.finished_at - sent_at
        return result

    async def _stream_into(self, result: RequestResult, body: dict, sent_at: float) -> None:
        pieces, last_token_at, usage, finished = [], None, None, False
        async with self.client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank lines, `: keep-alive` comments, event names
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError(f"stream chunk is not a JSON object: {data[:100]}")
                if chunk.get("error"):
                    result.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    return
                now = time.perf_counter()
                usage = chunk.get("usage") or usage  # last usage wins (finish chunk or trailing chunk)
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    pieces.append(delta.get("content") or "")
                    if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                        if last_token_at is None:
                            result.ttft = now - sent_at
                        else:
                            result.itl.append(now - last_token_at)
                        last_token_at = now
                        result.num_output_tokens += 1
                    finished = finished or choice.get("finish_reason") is not None
        if not finished:
            result.error = "stream ended without a finish_reason or [DONE]"
            return
        result.ok, result.text = True, "".join(pieces)
        if usage:
            result.has_usage = True
            result.num_output_tokens = usage.get("completion_tokens", result.num_output_tokens)
            result.num_prompt_tokens = usage.get("prompt_tokens", 0)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            result.num_cache_hit_tokens = usage.get("prompt_cache_hit_tokens", cached) or 0


async def _run_all(args, base_url: str, model: str, conversations: list[Conversation]):
    total = sum(len(c.user_turns) for c in conversations)
    arrivals = random.Random(f"arrivals:{args.seed}")
    # Unlimited pool unless capped: a pool smaller than the offered load would add client queueing to TTFT.
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=_headers(args.api_key), limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        runner = _Runner(args, client, model, total)
        started = time.perf_counter()
        tasks = []
        for conversation in conversations:
            tasks.append(asyncio.create_task(runner.conversation(conversation)))
            if not math.isinf(args.request_rate):
                await asyncio.sleep(arrivals.expovariate(args.request_rate))
        per_conversation = await asyncio.gather(*tasks)
    results = [result for results in per_conversation for result in results]
    ended = max((r.finished_at for r in results), default=started)
    return results, {"duration_s": ended - started, "peak_concurrency": runner.peak_in_flight}


# ---- reporting ---------------------------------------------------------------------------------


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(sorted_values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _distribution_ms(values_s: list[float]) -> dict:
    if not values_s:
        return {"mean": None, **{f"p{q}": None for q in _PERCENTILES}}
    values = sorted(v * 1000 for v in values_s)
    return {"mean": sum(values) / len(values), **{f"p{q}": _percentile(values, q) for q in _PERCENTILES}}


def summarize(results: list[RequestResult], timing: dict) -> dict:
    """The report: counts, token totals, throughputs, hit rate and latency distributions (ms).
    `timing` holds `duration_s` (first send to last completion) and `peak_concurrency`."""
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    duration = timing["duration_s"]
    input_tokens = sum(r.num_prompt_tokens for r in ok)
    output_tokens = sum(r.num_output_tokens for r in ok)
    hit_tokens = sum(r.num_cache_hit_tokens for r in ok)

    def per_second(amount: float) -> float:
        return amount / duration if duration > 0 else 0.0

    return {
        "num_requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": list(dict.fromkeys(errors))[:5],
        "requests_without_usage": sum(1 for r in ok if not r.has_usage),
        "duration_s": duration,
        "peak_concurrency": timing["peak_concurrency"],
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "total_cache_hit_tokens": hit_tokens,
        "cache_hit_rate": hit_tokens / input_tokens if input_tokens else None,
        "request_throughput": per_second(len(ok)),
        "input_token_throughput": per_second(input_tokens),
        "output_token_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(input_tokens + output_tokens),
        "ttft_ms": _distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _distribution_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _distribution_ms([gap for r in ok for gap in r.itl]),
        "e2e_ms": _distribution_ms([r.e2e for r in ok]),
    }


def format_summary(report: dict) -> str:
    def number(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    rows = [
        ("Successful requests", report["completed"]),
        ("Failed requests", report["errors"]),
        ("Benchmark duration (s)", number(report["duration_s"])),
        ("Peak concurrent requests", report["peak_concurrency"]),
        ("Total input tokens", report["total_input_tokens"]),
        ("Total generated tokens", report["total_output_tokens"]),
        ("Prefix cache hit rate (%)", number(None if report["cache_hit_rate"] is None
                                             else 100 * report["cache_hit_rate"])),
        ("Request throughput (req/s)", number(report["request_throughput"])),
        ("Input token throughput (tok/s)", number(report["input_token_throughput"])),
        ("Output token throughput (tok/s)", number(report["output_token_throughput"])),
        ("Total token throughput (tok/s)", number(report["total_token_throughput"])),
    ]
    lines = [" Serving benchmark result ".center(56, "=")]
    lines += [f"{label:<40}{value:>16}" for label, value in rows]
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency")):
        lines.append(f" {title} (ms) ".center(56, "-"))
        lines += [f"{stat:<40}{number(value):>16}" for stat, value in report[key].items()]
    if report["error_samples"]:
        lines.append(" First errors ".center(56, "-"))
        lines += report["error_samples"]
    lines.append("=" * 56)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
