"""Wire models: request bodies (pydantic) and the response pieces shared by the endpoints.

Request models check types only (a mismatch is a 422); value rules live in the `check_*`
functions and raise 400s naming the parameter. Unknown fields are accepted and ignored, as
OpenAI SDK users expect (`extra="allow"`).

Parameter policies (DeepSeek V4, api-surface §2.3–§2.4):
- `max_completion_tokens` is an alias of `max_tokens` (max_tokens wins). Defaults: 8K
  non-thinking, 64K thinking, 128K at effort `max`, capped by the context left after the prompt;
  an explicit value that does not fit is a 400 naming both numbers.
- `temperature`/`top_p` are validated but ignored in thinking mode; `top_p: 0` means greedy.
- `frequency_penalty`/`presence_penalty` are accepted and have no effect (deprecated in V4).
- `user_id` (`[A-Za-z0-9_-]{1,512}`, 400 otherwise) or else OpenAI's `user` becomes the
  prefix-cache salt, isolating users' KV caches.
- `n` in [1, 16]; `stop` at most `--max-stop-strings` strings of at most `--max-stop-length`
  characters (server/limits.py); `top_logprobs` in [0, 20] and needs `logprobs`.
- Types are strict: `max_tokens: "8"` or `true` is a 422, not coerced (an int is accepted where a
  float is expected).
- `logit_bias` (`{"<token id>": bias}`, bias in [-100, 100], at most 300 entries) is added to
  the logits before sampling.
- `stream_options` without `stream: true` is a 400.
- `ignore_eos` (a vLLM extension, used by `dsv4 bench serve`) keeps generating past EOS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from server.errors import from_validation_error, invalid_request
from server.limits import RequestLimits
from server.pricing import CostBreakdown

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_OUTPUT_TOKENS = 393_216  # DeepSeek's documented ceiling (384K)
DEFAULT_MAX_TOKENS_CHAT = 8_192
DEFAULT_MAX_TOKENS_THINKING = 65_536
DEFAULT_MAX_TOKENS_MAX_EFFORT = 131_072
DEFAULT_MAX_TOKENS_FIM = 4_096  # DeepSeek's FIM guide caps output at 4K
_USER_ID = re.compile(r"[A-Za-z0-9_-]{1,512}")
# Public effort names -> the encoder's levels (None = thinking off).
EFFORT_ALIASES = {"low": "low", "minimal": "low", "medium": "high", "high": "high", "xhigh": "high",
                  "max": "max", "ultra": "max", "none": None}


class _Body(BaseModel):
    # strict: no "8" -> 8 or true -> 1 coercion; a wrong type is the client's bug, said so.
    model_config = ConfigDict(extra="allow", strict=True)


class _GenerationBody(_Body):
    """Fields chat and text completions share."""

    model: str
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    user_id: str | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    n: int | None = 1
    seed: int | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None


class ChatCompletionRequest(_GenerationBody):
    messages: list[dict[str, Any]]
    thinking: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    max_completion_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


class CompletionRequest(_GenerationBody):
    prompt: str | list[str]
    suffix: str | None = None
    echo: bool | None = False
    logprobs: int | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    thinking: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def parse_body(data: Any, model: type[BaseModel]):
    """Validate decoded JSON against `model`; shape problems become a 422 naming the field."""
    if not isinstance(data, dict):
        raise invalid_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise from_validation_error(err) from None


# ---------------------------------------------------------------------------- value checks


@dataclass(frozen=True)
class SamplingChoice:
    """The sampling fields of a request after validation and mode rules."""

    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]


def check_sampling(req: ChatCompletionRequest | CompletionRequest, thinking: bool,
                   defaults: tuple[float, float] = (1.0, 1.0),
                   limits: RequestLimits = RequestLimits()) -> SamplingChoice:
    """``defaults``: (temperature, top_p) from the checkpoint's generation_config.json, used when
    the request leaves them out and always in thinking mode (as vLLM applies a model's defaults)."""
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise invalid_request(f"temperature must be in [0, 2], got {req.temperature}", "temperature")
    if req.top_p is not None and not 0.0 <= req.top_p <= 1.0:
        raise invalid_request(f"top_p must be in [0, 1], got {req.top_p}", "top_p")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise invalid_request(f"{name} must be in [-2, 2], got {value}", name)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    limits.check_stop(stop)
    if any(not s for s in stop):
        raise invalid_request("stop strings must be non-empty", "stop")
    if thinking:  # DeepSeek ignores these in thinking mode (no error)
        temperature, top_p = defaults
    else:
        temperature = defaults[0] if req.temperature is None else req.temperature
        top_p = defaults[1] if req.top_p is None else req.top_p
        if top_p == 0.0:
            temperature, top_p = 0.0, 1.0
    return SamplingChoice(temperature=temperature, top_p=top_p, seed=req.seed, stop=stop)


def check_n(n: int | None) -> int:
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise invalid_request(f"n must be in [1, {MAX_N}], got {n}", "n")
    return n


def check_stream_options(stream: bool, stream_options: dict | None) -> bool:
    """Whether `include_usage` was asked for."""
    if stream_options is None:
        return False
    if not stream:
        raise invalid_request("stream_options is only allowed when stream is true", "stream_options")
    include = stream_options.get("include_usage", False)
    if not isinstance(include, bool):
        raise invalid_request("stream_options.include_usage must be a boolean", "stream_options.include_usage")
    return include


def cache_salt(user_id: str | None, user: str | None) -> str:
    if user_id is not None:
        if not _USER_ID.fullmatch(user_id):
            raise invalid_request("Invalid 'user_id': string does not match pattern. Expected a string "
                                  "that matches the pattern '^[a-zA-Z0-9_-]{1,512}$'.", "user_id")
        return user_id
    return user or ""


def resolve_max_tokens(requested: int | None, param: str, default: int, prompt_len: int,
                       max_model_len: int) -> int:
    """The output budget: `requested` or `default`, checked against what the context leaves."""
    if prompt_len >= max_model_len:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt is {prompt_len} tokens, which leaves no room for output.", "messages")
    room = max_model_len - prompt_len
    if requested is None:
        return min(default, room)
    if not 1 <= requested <= MAX_OUTPUT_TOKENS:
        raise invalid_request(f"Invalid {param} value, the valid range of {param} is [1, {MAX_OUTPUT_TOKENS}]",
                              param)
    if requested > room:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
            f"completion). Please reduce the length of the prompt or {param}.", param)
    return requested


# ---------------------------------------------------------------------------- usage


@dataclass
class UsageCounts:
    prompt_tokens: int = 0
    cache_hit_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def cache_miss_tokens(self) -> int:
        return self.prompt_tokens - self.cache_hit_tokens

    def to_dict(self, cost: CostBreakdown | None) -> dict:
        """DeepSeek's usage object (every field, api-surface §3.4) plus `cost` (a number, USD;
        null when the model has no prices) and its breakdown `cost_details`."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_cache_hit_tokens": self.cache_hit_tokens,
            "prompt_cache_miss_tokens": self.cache_miss_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cache_hit_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "cost": None if cost is None else cost.total_usd,
            "cost_details": None if cost is None else cost.details(),
        }


MIN_LOGPROB = -9999.0  # OpenAI's value for a token that cannot be sampled


def wire_logprob(logprob: float) -> float:
    """A logprob JSON can carry: a masked token's -inf (JSON mode, logit_bias) becomes
    MIN_LOGPROB; JSON has no infinities and a strict encoder refuses them."""
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB  # NaN compares false: floored too


def logprob_entry(table, token_id: int, logprob: float, top: list[tuple[int, float]], num_top: int) -> dict:
    """One OpenAI chat logprobs item: token text, logprob, UTF-8 bytes and the top alternatives."""
    def item(tid: int, lp: float) -> dict:
        data = table.token_bytes[tid] if 0 <= tid < table.vocab_size else b""
        return {"token": data.decode("utf-8", errors="replace"), "logprob": wire_logprob(lp), "bytes": list(data)}

    return {**item(token_id, logprob), "top_logprobs": [item(t, lp) for t, lp in top[:num_top]]}
