"""What the engine hands back per request per step (incremental)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), most likely first


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """One increment of a request's generation.

    ``new_text`` is the newly stable detokenized text (special tokens kept, stop strings
    already applied and cut); concatenating every ``new_text`` gives the full output text."""

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
