"""What the engine hands back: per request per step (incremental outputs), and per step (stats)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), most likely first


@dataclass(frozen=True)  # shared by a request's outputs (EngineCore._metrics): replace, never mutate
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """One increment of a request's generation.

    ``new_text`` is the newly stable detokenized text (control tokens dropped unless
    ``SamplingParams.skip_special_tokens`` is off, as for chat; stop strings
    already applied and cut); concatenating every ``new_text`` gives the full output text. The
    engine core leaves it empty: the request's ``TextStream`` (engine/text_stream.py) fills it
    where the stream is consumed (``AsyncEngine`` sinks, ``LLM``)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # matched stop token id / stop string / error message
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit tokens (DeepSeek prompt_cache_hit_tokens)
    miss_reason: str | None = None
    num_output_tokens: int = 0  # total so far
    logprobs: list[TokenLogprob] | None = None  # one per new token when requested
    metrics: RequestMetrics | None = None


@dataclass
class CompletionOutput:
    """Final result of ``LLM.generate`` for one prompt."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class StepStats:
    """What the engine knows after one step, for metrics: counts are this step's deltas, the rest
    is the state after it. The server records it as is (server/metrics.py checks it first)."""

    num_running: int  # requests in the running queue after the step
    num_waiting: int  # requests waiting to be scheduled (new and preempted) after the step
    # Like vLLM, usage counts what live requests hold; prefix-cache checkpoints are evictable.
    kv_cache_usage: float  # fraction [0, 1] of all KV cache memory in use (CacheUsage.live_fraction)
    pool_usage: dict[str, float] = field(default_factory=dict)  # pool name (CachePool) -> fraction in use
    num_scheduled_tokens: int = 0  # tokens the forward ran over this step (prefill chunks + decodes)
    num_prompt_tokens: int = 0  # full prompt lengths (cached included) of requests whose prefill ended this step
    num_generation_tokens: int = 0  # tokens sampled this step
    num_preemptions: int = 0  # requests preempted this step
    prefix_cache_queries: int = 0  # prompt tokens looked up this step (first scheduling of a request only)
    prefix_cache_hits: int = 0  # of those, tokens served from the prefix cache
    prefix_cache_misses: dict[str, int] = field(default_factory=dict)  # reason -> tokens not served
    prefix_cache_hits_by_tier: dict[str, int] = field(default_factory=dict)  # device|host|disk -> hit tokens
    prefix_cache_evictions: dict[tuple[str, str], int] = field(default_factory=dict)  # (pool short, kind) -> n
    prefix_cache_load_failures: dict[str, int] = field(default_factory=dict)  # torn|corrupt|foreign|missing -> n
    # State after the step: checkpoints per tier; bytes held by checkpoints only, per pool and tier.
    prefix_cache_checkpoints: dict[str, int] = field(default_factory=dict)
    prefix_cache_checkpoint_bytes: dict[str, int] = field(default_factory=dict)
    # Speculative decoding this step (vLLM's spec_decode counters): verify chunks, drafts in
    # them, drafts accepted, and drafts accepted at each draft position.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = field(default_factory=list)
