"""SamplingParams: how one request picks tokens and when it stops (pure Python, no torch).

The engine's public request type (``from engine import SamplingParams``); the server builds one
per request, the scheduler reads its stop rules, the worker's sampler its filters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_TEMPERATURE = 2.0


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick tokens for one request, and when to stop.

    `top_k` of -1 or 0 and `top_p` of 1.0 switch those filters off; `temperature` 0 means greedy.
    `logprobs=None` returns no logprobs; `logprobs=N` returns the sampled token's logprob plus the
    N most likely tokens (N in 0..20).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    # Drop control tokens (EOS, `</think>`, DSML, FIM, ... every added token) from the text.
    # The chat server turns this off: its parser needs `</think>` and DSML in the text.
    skip_special_tokens: bool = True
    # Callables ``(output_token_ids, logits[V]) -> logits[V]`` applied before sampling, e.g. the
    # server's grammar constraints. They see only this request's row. A processor may also have
    # ``prepare(output_token_ids)``, called before the forward so its work overlaps the forward.
    logits_processors: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Normalise first so that validation sees the final shape.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not is_number(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature!r}")
        if not is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (-1 or 0 = off), got {self.top_k!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.logprobs is not None and (
                not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(
                f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                f"got {self.min_tokens!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(
                f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def top_k_active(self) -> bool:
        return self.top_k > 0

    @property
    def top_p_active(self) -> bool:
        return self.top_p < 1.0
