"""One generation request as the scheduler sees it: token ids, progress and lifecycle.

Pure Python (no torch). The request stores the minimum — prompt ids, output ids and
`num_computed_tokens` — and derives the rest. It knows nothing about cache blocks; the
`KVCacheManager` keeps those, keyed by `request_id`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any


class FinishReason(str, Enum):
    """Why a request stopped, spelled as the OpenAI `finish_reason` strings."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class RequestStatus(IntEnum):
    """Lifecycle states; ordered so that every finished state compares >= FINISHED_STOPPED."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4
    FINISHED_ERROR = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _STATUS_TO_REASON.get(self)

    @classmethod
    def for_reason(cls, reason: FinishReason | str) -> RequestStatus:
        """The terminal status for a finish reason ("stop", "length", "abort", "error")."""
        try:
            return _REASON_TO_STATUS[FinishReason(reason)]
        except ValueError:
            raise ValueError(
                f"reason must be one of {[r.value for r in FinishReason]}, got {reason!r}"
            ) from None


_STATUS_TO_REASON = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}
_REASON_TO_STATUS = {reason: status for status, reason in _STATUS_TO_REASON.items()}


@dataclass(frozen=True)
class CacheHints:
    """What the caller knows about a prompt's reuse (the chat server sets these).

    `unit_ends`: extra cache-unit positions inside the prompt, e.g. the end of the system +
    tools block, which other sessions share. `keep_output`: False when the next turn cannot
    match the end of this output (thinking chats whose reasoning the encoder drops), so no
    end-of-output unit is kept for it."""

    unit_ends: tuple[int, ...] = ()
    keep_output: bool = True

    def __post_init__(self) -> None:
        ends = tuple(self.unit_ends)
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in ends):
            raise ValueError(f"unit_ends must be positive ints, got {self.unit_ends!r}")
        object.__setattr__(self, "unit_ends", tuple(sorted(set(ends))))


@dataclass(eq=False)  # identity semantics: two requests are never "equal"
class Request:
    """A prompt plus the tokens generated so far.

    `sampling_params` is duck-typed: anything with `max_tokens` (None = unbounded),
    `min_tokens`, `ignore_eos` and `stop_token_ids` (engine/sampling_params.py).
    Timestamps use whatever clock the scheduler was built with (monotonic by default).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any
    eos_token_id: int | None
    arrival_time: float
    cache_salt: str = ""
    cache_hints: CacheHints = field(default_factory=CacheHints)

    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache. The last sampled token is never computed until the
    # next step feeds it, so for a running decode num_tokens - num_computed_tokens == 1.
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # Prefix-cache hit length at the first admission (-1 until then); what usage reports.
    num_cached_tokens: int = -1
    miss_reason: str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    finish_reason: FinishReason | None = None
    # Extra detail on the finish: the stop token id, the stop string, or an error message.
    stop_reason: int | str | None = None
    # Speculative decoding: tokens a drafter proposed to follow the last known token; the next
    # step feeds them after it as a verify chunk (the engine sets them after each step).
    draft_token_ids: list[int] = field(default_factory=list)
    # The engine's last RequestMetrics of these stamps, shared by outputs until one changes.
    metrics_snapshot: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if not isinstance(self.prompt_token_ids, (list, tuple)) or not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must be a non-empty list of token ids")
        for token in self.prompt_token_ids:
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise ValueError(
                    f"prompt_token_ids must hold non-negative ints, found {token!r}"
                )
        self.prompt_token_ids = list(self.prompt_token_ids)
        if not isinstance(self.cache_salt, str):
            raise ValueError(f"cache_salt must be a string, got {type(self.cache_salt).__name__}")
        if not isinstance(self.cache_hints, CacheHints):
            raise ValueError(f"cache_hints must be CacheHints, got {type(self.cache_hints).__name__}")
        if self.eos_token_id is not None and not isinstance(self.eos_token_id, int):
            raise ValueError(f"eos_token_id must be an int or None, got {self.eos_token_id!r}")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by outputs (a new list; use `token_ids_slice` for a window)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt+outputs without building the whole list."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]
