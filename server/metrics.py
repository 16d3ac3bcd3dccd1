"""Prometheus metrics: every `dsv4:*` series, fed from plain Python values.

The engine reports a `StepStats` (engine/outputs.py) after each step; the server reports a `RequestTimings` (and the
request's `CostBreakdown`) when a request ends. `Metrics` turns them into series with vLLM's names
and meanings (prefix `dsv4:` instead of `vllm:`, label `model_name`) plus V4 extras: per-pool KV
usage, prefix-cache misses by reason, tokens and cost by billing kind, tool-parse errors. Each
`Metrics` owns its registry, so several apps (or tests) in one process never collide.
`StatsLogger` formats the periodic one-line log. This is the only module that imports
prometheus_client.
"""

import math
import re
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.core.cache_layout import CachePool
from engine.outputs import StepStats
from server.pricing import PRICE_KINDS, CostBreakdown

# The request APIs (`api` label): OpenAI chat and text completions, Anthropic Messages, OpenAI Responses.
APIS = ("chat_completions", "completions", "anthropic_messages", "responses")

PREFIX = "dsv4:"
KV_POOLS = tuple(pool.value for pool in CachePool)
# Label values created up front so dashboards show zero-valued series before the first event.
KNOWN_FINISH_REASONS = ("stop", "length", "tool_calls", "abort", "error")
KNOWN_MISS_REASONS = ("cold", "partial_unit", "evicted", "disabled")
# Prefix-cache checkpoints: where they live, why they left the device (the pool that ran short;
# "reset" for an explicit offload, not created up front), their eviction class, why a lower-tier
# copy could not be loaded.
CHECKPOINT_TIERS = ("device", "host", "disk")
EVICTION_REASONS = KV_POOLS
UNIT_KINDS = ("superseded", "leaf", "shared")
LOAD_FAILURES = ("torn", "corrupt", "foreign", "missing")

_LABEL_VALUE = re.compile(r"^[a-z][a-z0-9_]*$")  # keeps label cardinality and spelling in check

# Latency buckets (seconds). V4 decode can run at ~3 ms per token, so the small end is dense.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                      0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def _one_two_five_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (token-count histograms, as vLLM does)."""
    buckets, scale = [], 1
    while True:
        for step in (1, 2, 5):
            if step * scale > max_value:
                return tuple(buckets)
            buckets.append(step * scale)
        scale *= 10


def _check_count(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_fraction(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")


def _check_label(value: Any, name: str) -> None:
    if not isinstance(value, str) or not _LABEL_VALUE.match(value):
        raise ValueError(f"{name} must be a lowercase identifier like 'stop' or 'partial_unit', got {value!r}")


def _check_time(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")


def check_step_stats(stats: StepStats) -> None:
    """ValueError unless `stats` is a consistent engine step record (checked before recording,
    so a bad record is logged and dropped, never half-counted)."""
    if not isinstance(stats, StepStats):
        raise ValueError(f"step stats must be engine.outputs.StepStats, got {type(stats).__name__}")
    for f in fields(stats):
        if f.type in (int, "int"):
            _check_count(getattr(stats, f.name), f.name)
    _check_fraction(stats.kv_cache_usage, "kv_cache_usage")
    if not isinstance(stats.spec_accepted_per_position, list):
        raise ValueError("spec_accepted_per_position must be a list")
    for position, n in enumerate(stats.spec_accepted_per_position):
        _check_count(n, f"spec_accepted_per_position[{position}]")
    if stats.spec_num_accepted_tokens > stats.spec_num_draft_tokens:
        raise ValueError("spec_num_accepted_tokens must not exceed spec_num_draft_tokens")
    if not isinstance(stats.pool_usage, Mapping):
        raise ValueError("pool_usage must be a mapping")
    for pool, usage in stats.pool_usage.items():
        if pool not in KV_POOLS:
            raise ValueError(f"pool_usage: unknown pool {pool!r}; pools are {KV_POOLS}")
        _check_fraction(usage, f"pool_usage[{pool!r}]")
    for name in ("prefix_cache_misses", "prefix_cache_hits_by_tier", "prefix_cache_load_failures",
                 "prefix_cache_checkpoints", "prefix_cache_checkpoint_bytes"):
        counts = getattr(stats, name)
        if not isinstance(counts, Mapping):
            raise ValueError(f"{name} must be a mapping")
        for label, n in counts.items():
            _check_label(label, f"{name} label (reason, tier or pool)")
            _check_count(n, f"{name}[{label!r}]")
    if not isinstance(stats.prefix_cache_evictions, Mapping):
        raise ValueError("prefix_cache_evictions must be a mapping")
    for labels, n in stats.prefix_cache_evictions.items():
        if not (isinstance(labels, tuple) and len(labels) == 2):
            raise ValueError(f"prefix_cache_evictions keys must be (reason, kind), got {labels!r}")
        for label in labels:
            _check_label(label, "prefix_cache_evictions key")
        _check_count(n, f"prefix_cache_evictions[{labels!r}]")
    if stats.prefix_cache_hits + sum(stats.prefix_cache_misses.values()) > stats.prefix_cache_queries:
        raise ValueError("prefix_cache_hits + sum(prefix_cache_misses) must not exceed prefix_cache_queries")


@dataclass(frozen=True)
class RequestTimings:
    """One ended request. Times are seconds on one clock (time.monotonic() or time.time()).

    arrival ──queue──▶ first_scheduled ──prefill──▶ first_token ──decode──▶ finished
    """

    arrival_time: float  # the server accepted the request
    finished_time: float  # the request ended (last token, abort or error)
    finish_reason: str  # stop | length | tool_calls | abort | error | ...
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_generation_tokens: int = 0
    first_scheduled_time: float | None = None  # None: never left the queue
    first_token_time: float | None = None  # None: no token was produced
    inter_token_latencies: tuple[float, ...] = ()  # seconds between successive output tokens

    def __post_init__(self):
        _check_label(self.finish_reason, "finish_reason")
        for name in ("num_prompt_tokens", "num_cached_tokens", "num_generation_tokens"):
            _check_count(getattr(self, name), name)
        if self.num_cached_tokens > self.num_prompt_tokens:
            raise ValueError("num_cached_tokens must not exceed num_prompt_tokens")
        if self.first_token_time is not None and self.first_scheduled_time is None:
            raise ValueError("first_token_time needs first_scheduled_time")
        ordered = [("arrival_time", self.arrival_time), ("first_scheduled_time", self.first_scheduled_time),
                   ("first_token_time", self.first_token_time), ("finished_time", self.finished_time)]
        ordered = [(name, t) for name, t in ordered if t is not None or name in ("arrival_time", "finished_time")]
        for name, t in ordered:
            _check_time(t, name)
        for (_, earlier), (name, later) in zip(ordered, ordered[1:]):
            if later < earlier:
                raise ValueError(f"{name} ({later}) is earlier than the previous timestamp ({earlier})")
        for gap in self.inter_token_latencies:
            _check_time(gap, "inter_token_latencies")
            if gap < 0:
                raise ValueError(f"inter_token_latencies must be >= 0, got {gap!r}")

    @property
    def e2e_latency(self) -> float:
        return self.finished_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def prefill_time(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.first_scheduled_time

    @property
    def decode_time(self) -> float | None:
        return None if self.first_token_time is None else self.finished_time - self.first_token_time

    @property
    def time_per_output_token(self) -> float | None:
        """Request-weighted TPOT: decode time over the tokens after the first."""
        if self.first_token_time is None or self.num_generation_tokens < 2:
            return None
        return self.decode_time / (self.num_generation_tokens - 1)


class Metrics:
    """All dsv4:* series for one served model, in a registry of its own."""

    def __init__(self, model_name: str, max_model_len: int = 1_048_576, max_num_batched_tokens: int = 8192):
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
        _check_count(max_model_len, "max_model_len")
        _check_count(max_num_batched_tokens, "max_num_batched_tokens")
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self._init_scheduler_series()
        self._init_token_series()
        self._init_latency_series(max_model_len, max_num_batched_tokens)
        self._init_billing_series()
        self._init_api_series()

    # ---- construction --------------------------------------------------------------------------

    def _metric(self, kind, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs):
        metric = kind(PREFIX + name, doc, ("model_name", *labels), registry=self.registry, **kwargs)
        if not labels:
            metric.labels(self.model_name)  # export zeros from the start, not only after the first event
        return metric

    def _init_scheduler_series(self):
        self.num_requests_running = self._metric(Gauge, "num_requests_running", "Requests in the running queue.")
        self.num_requests_waiting = self._metric(Gauge, "num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = self._metric(Gauge, "kv_cache_usage_perc", "KV cache usage, 1 = full.")
        self.kv_cache_pool_usage_perc = self._metric(
            Gauge, "kv_cache_pool_usage_perc", "KV cache usage per pool, 1 = full.", ("pool",))
        self.num_preemptions = self._metric(Counter, "num_preemptions", "Requests preempted.")
        # Speculative decoding, with vLLM's names (vllm:spec_decode_*).
        self.spec_decode_num_drafts = self._metric(Counter, "spec_decode_num_drafts", "Verify chunks run.")
        self.spec_decode_num_draft_tokens = self._metric(
            Counter, "spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.spec_decode_num_accepted_tokens = self._metric(
            Counter, "spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_decode_num_accepted_tokens_per_pos = self._metric(
            Counter, "spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by draft position.",
            ("position",))
        for pool in KV_POOLS:
            self.kv_cache_pool_usage_perc.labels(self.model_name, pool)

    def _init_token_series(self):
        self.prompt_tokens = self._metric(Counter, "prompt_tokens", "Prompt tokens of prefilled requests.")
        self.generation_tokens = self._metric(Counter, "generation_tokens", "Generated tokens.")
        self.prefix_cache_queries = self._metric(Counter, "prefix_cache_queries", "Prompt tokens looked up.")
        self.prefix_cache_hits = self._metric(Counter, "prefix_cache_hits", "Prompt tokens served from cache.")
        self.prefix_cache_misses = self._metric(
            Counter, "prefix_cache_misses", "Prompt tokens not served from cache, by reason.", ("reason",))
        self.prefix_cache_tier_hits = self._metric(
            Counter, "prefix_cache_tier_hits", "Prompt tokens served from cache, by the tier the checkpoint "
            "was in (device, host memory, disk).", ("tier",))
        self.prefix_cache_evictions = self._metric(
            Counter, "prefix_cache_evictions", "Checkpoints evicted from device memory, by the pool that ran "
            "short (or reset) and the checkpoint's class.", ("reason", "kind"))
        self.prefix_cache_load_failures = self._metric(
            Counter, "prefix_cache_load_failures", "Lower-tier checkpoints that could not be loaded (counted "
            "as misses), by reason.", ("reason",))
        self.prefix_cache_checkpoints = self._metric(
            Gauge, "prefix_cache_checkpoints", "Prefix-cache checkpoints, by tier.", ("tier",))
        self.prefix_cache_checkpoint_bytes = self._metric(
            Gauge, "prefix_cache_checkpoint_bytes", "Bytes held by prefix-cache checkpoints only, per device "
            "pool and lower tier.", ("pool",))
        self.request_success = self._metric(
            Counter, "request_success", "Ended requests, by finish reason.", ("finished_reason",))
        self.tool_parse_errors = self._metric(
            Counter, "tool_parse_errors", "Tool-call blocks the parser could not decode.", ("kind",))
        for reason in KNOWN_MISS_REASONS:
            self.prefix_cache_misses.labels(self.model_name, reason)
        for tier in CHECKPOINT_TIERS:
            self.prefix_cache_tier_hits.labels(self.model_name, tier)
            self.prefix_cache_checkpoints.labels(self.model_name, tier)
        for pool in (*KV_POOLS, *CHECKPOINT_TIERS[1:]):
            self.prefix_cache_checkpoint_bytes.labels(self.model_name, pool)
        for reason in EVICTION_REASONS:
            for kind in UNIT_KINDS:
                self.prefix_cache_evictions.labels(self.model_name, reason, kind)
        for reason in LOAD_FAILURES:
            self.prefix_cache_load_failures.labels(self.model_name, reason)
        for reason in KNOWN_FINISH_REASONS:
            self.request_success.labels(self.model_name, reason)

    def _init_latency_series(self, max_model_len: int, max_num_batched_tokens: int):
        def histogram(name, doc, buckets):
            return self._metric(Histogram, name, doc, buckets=buckets)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first token.", _TTFT_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Gap between successive tokens (one sample per token).", _TOKEN_GAP_BUCKETS)
        self.request_time_per_output_token = histogram(
            "request_time_per_output_token_seconds", "Decode time per token after the first (one sample per "
            "request).", _TOKEN_GAP_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Arrival to end.", _REQUEST_BUCKETS)
        self.request_queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.",
                                            _REQUEST_BUCKETS)
        self.request_prefill_time = histogram("request_prefill_time_seconds", "First scheduled to first token.",
                                              _REQUEST_BUCKETS)
        self.request_decode_time = histogram("request_decode_time_seconds", "First token to end.", _REQUEST_BUCKETS)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt length per request.", _one_two_five_buckets(max_model_len))
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per request.", _one_two_five_buckets(max_model_len))
        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Tokens per engine step.", _one_two_five_buckets(max_num_batched_tokens))

    def _init_billing_series(self):
        self.tokens = self._metric(Counter, "tokens", "Tokens by billing kind.", ("kind",))
        self.cost_usd = self._metric(Counter, "cost_usd", "Cost in USD by billing kind.", ("kind",))
        for kind in PRICE_KINDS:
            self.tokens.labels(self.model_name, kind)
            self.cost_usd.labels(self.model_name, kind)

    def _init_api_series(self):
        self.api_requests = self._metric(Counter, "api_requests", "Ended requests, by API.", ("api",))
        self.api_cost_usd = self._metric(Counter, "api_cost_usd", "Cost in USD billed, by API.", ("api",))
        for api in APIS:
            self.api_requests.labels(self.model_name, api)
            self.api_cost_usd.labels(self.model_name, api)

    # ---- feeding -------------------------------------------------------------------------------

    def observe_step(self, stats: StepStats) -> None:
        """Record one engine step (ValueError, recording nothing, if the record is inconsistent)."""
        check_step_stats(stats)
        name = self.model_name
        self.num_requests_running.labels(name).set(stats.num_running)
        self.num_requests_waiting.labels(name).set(stats.num_waiting)
        self.kv_cache_usage_perc.labels(name).set(stats.kv_cache_usage)
        for pool, usage in stats.pool_usage.items():
            self.kv_cache_pool_usage_perc.labels(name, pool).set(usage)
        self.num_preemptions.labels(name).inc(stats.num_preemptions)
        self.spec_decode_num_drafts.labels(name).inc(stats.spec_num_drafts)
        self.spec_decode_num_draft_tokens.labels(name).inc(stats.spec_num_draft_tokens)
        self.spec_decode_num_accepted_tokens.labels(name).inc(stats.spec_num_accepted_tokens)
        for position, n in enumerate(stats.spec_accepted_per_position):
            self.spec_decode_num_accepted_tokens_per_pos.labels(name, str(position)).inc(n)
        self.prompt_tokens.labels(name).inc(stats.num_prompt_tokens)
        self.generation_tokens.labels(name).inc(stats.num_generation_tokens)
        self.prefix_cache_queries.labels(name).inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.labels(name).inc(stats.prefix_cache_hits)
        for reason, tokens in stats.prefix_cache_misses.items():
            self.prefix_cache_misses.labels(name, reason).inc(tokens)
        for tier, tokens in stats.prefix_cache_hits_by_tier.items():
            self.prefix_cache_tier_hits.labels(name, tier).inc(tokens)
        for (reason, kind), count in stats.prefix_cache_evictions.items():
            self.prefix_cache_evictions.labels(name, reason, kind).inc(count)
        for reason, count in stats.prefix_cache_load_failures.items():
            self.prefix_cache_load_failures.labels(name, reason).inc(count)
        for tier, count in stats.prefix_cache_checkpoints.items():
            self.prefix_cache_checkpoints.labels(name, tier).set(count)
        for pool, nbytes in stats.prefix_cache_checkpoint_bytes.items():
            self.prefix_cache_checkpoint_bytes.labels(name, pool).set(nbytes)
        if stats.num_scheduled_tokens > 0:  # idle steps would drown the histogram in zeros
            self.iteration_tokens.labels(name).observe(stats.num_scheduled_tokens)

    def observe_finished(self, timings: RequestTimings, cost: CostBreakdown | None = None) -> None:
        """Record one ended request (any finish reason) and, when billed, its cost."""
        if not isinstance(timings, RequestTimings):
            raise ValueError(f"timings must be RequestTimings, got {type(timings).__name__}")
        if cost is not None and not isinstance(cost, CostBreakdown):
            raise ValueError(f"cost must be CostBreakdown or None, got {type(cost).__name__}")
        name = self.model_name
        self.request_success.labels(name, timings.finish_reason).inc()
        self.e2e_request_latency.labels(name).observe(timings.e2e_latency)
        self.request_prompt_tokens.labels(name).observe(timings.num_prompt_tokens)
        self.request_generation_tokens.labels(name).observe(timings.num_generation_tokens)
        optional = ((self.request_queue_time, timings.queue_time),
                    (self.time_to_first_token, timings.time_to_first_token),
                    (self.request_prefill_time, timings.prefill_time),
                    (self.request_decode_time, timings.decode_time),
                    (self.request_time_per_output_token, timings.time_per_output_token))
        for histogram, value in optional:
            if value is not None:
                histogram.labels(name).observe(value)
        itl = self.inter_token_latency.labels(name)
        for gap in timings.inter_token_latencies:
            itl.observe(gap)
        self.tokens.labels(name, "cache_hit_input").inc(timings.num_cached_tokens)
        self.tokens.labels(name, "cache_miss_input").inc(timings.num_prompt_tokens - timings.num_cached_tokens)
        self.tokens.labels(name, "output").inc(timings.num_generation_tokens)
        if cost is not None:
            for kind in PRICE_KINDS:
                self.cost_usd.labels(name, kind).inc(cost.usd(kind))

    def observe_api_request(self, api: str, cost: CostBreakdown | None) -> None:
        """One ended API request (whatever its number of choices) and what it was billed."""
        _check_label(api, "api")
        self.api_requests.labels(self.model_name, api).inc()
        if cost is not None:
            self.api_cost_usd.labels(self.model_name, api).inc(cost.total_usd)

    def count_tool_parse_error(self, kind: str) -> None:
        """One tool-call block the parser rejected; `kind` says why (e.g. `bad_json`, `unknown_tool`)."""
        _check_label(kind, "kind")
        self.tool_parse_errors.labels(self.model_name, kind).inc()

    # ---- exposition ----------------------------------------------------------------------------

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        """Prometheus text exposition of every series, for GET /metrics."""
        return generate_latest(self.registry)


class StatsLogger:
    """Formats vLLM's periodic log line from successive StepStats:

    Avg prompt throughput: 812.0 tokens/s, Avg generation throughput: 95.5 tokens/s, Running: 4 reqs,
    Waiting: 0 reqs, KV cache usage: 31.0% (window 12.5%, state 12.5%, c4 40.0%, c128 3.1%),
    Prefix cache hit rate: 62.5%

    Throughputs and the hit rate cover the window since the previous line; the rest is the latest step.
    """

    def __init__(self, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._clock = clock
        self._latest: StepStats | None = None
        self._start_window(clock())

    def _start_window(self, now: float) -> None:
        self._window_start = now
        self._prompt_tokens = self._generation_tokens = 0
        self._queries = self._hits = 0

    def record(self, stats: StepStats) -> None:
        check_step_stats(stats)
        self._latest = stats
        self._prompt_tokens += stats.num_prompt_tokens
        self._generation_tokens += stats.num_generation_tokens
        self._queries += stats.prefix_cache_queries
        self._hits += stats.prefix_cache_hits

    @property
    def window_is_idle(self) -> bool:
        """No tokens since the previous line and nothing running or waiting now."""
        latest = self._latest
        busy = latest is not None and (latest.num_running or latest.num_waiting)
        return not (busy or self._prompt_tokens or self._generation_tokens)

    def maybe_format(self) -> str | None:
        """The line, if `interval_s` has passed since the previous one; else None."""
        if self._clock() - self._window_start < self.interval_s:
            return None
        return self.format_line()

    def format_line(self) -> str:
        """The line for the window so far; starts a new window."""
        now = self._clock()
        elapsed = now - self._window_start
        prompt_tps = self._prompt_tokens / elapsed if elapsed > 0 else 0.0
        generation_tps = self._generation_tokens / elapsed if elapsed > 0 else 0.0
        hit_rate = f"{100 * self._hits / self._queries:.1f}%" if self._queries else "n/a"
        latest = self._latest or StepStats(num_running=0, num_waiting=0, kv_cache_usage=0.0)
        pools = ", ".join(f"{pool} {100 * latest.pool_usage[pool]:.1f}%"
                          for pool in KV_POOLS if pool in latest.pool_usage)
        kv = f"{100 * latest.kv_cache_usage:.1f}%" + (f" ({pools})" if pools else "")
        self._start_window(now)
        return (f"Avg prompt throughput: {prompt_tps:.1f} tokens/s, "
                f"Avg generation throughput: {generation_tps:.1f} tokens/s, "
                f"Running: {latest.num_running} reqs, Waiting: {latest.num_waiting} reqs, "
                f"KV cache usage: {kv}, Prefix cache hit rate: {hit_rate}")
