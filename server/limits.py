"""Request limits: what one request may ask of the server, checked before the expensive work.

`RequestLimits` is the operator's knobs (`dsv4 serve --max-body-bytes ...`, see `dsv4 serve
--help`); the defaults are safe for a daemon reachable by untrusted clients. Order of the
checks, cheapest first:

1. HTTP (server/http_guard.py): connection count, header and body read timeouts, body bytes
   (413 before the body is parsed).
2. Shape (here, after JSON decoding): stop string count and length, message count, `n`.
3. Prompt size: a lower bound on the token count from the prompt's UTF-8 size (no
   tokenization), then the exact count against `max_prompt_tokens` (at most the context minus
   one token, so there is room for output) before anything reaches the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# No module-level server imports: `dsv4 serve --help` reads the defaults without loading FastAPI.

MiB = 1 << 20


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 8 * MiB
    max_stop_strings: int = 16  # DeepSeek documents up to 16
    max_stop_length: int = 1024  # characters per stop string
    max_messages: int = 2048
    max_prompt_tokens: int | None = None  # None: the context window minus one
    max_connections: int = 1024  # open HTTP connections; beyond, uvicorn answers 503
    header_timeout: float = 10.0  # seconds for a client to send its request line and headers
    body_timeout: float = 30.0  # seconds for a client to send its whole body

    def __post_init__(self):
        for name in ("max_body_bytes", "max_stop_strings", "max_stop_length", "max_messages", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_prompt_tokens is not None and (
                isinstance(self.max_prompt_tokens, bool) or not isinstance(self.max_prompt_tokens, int)
                or self.max_prompt_tokens < 1):
            raise ValueError(f"max_prompt_tokens must be a positive integer, got {self.max_prompt_tokens!r}")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")

    def prompt_token_limit(self, max_model_len: int) -> int:
        """The most prompt tokens a request may have (output needs at least one more)."""
        context_limit = max_model_len - 1
        return context_limit if self.max_prompt_tokens is None else min(self.max_prompt_tokens, context_limit)

    def check_stop(self, stop: list[str]) -> None:
        from server.errors import invalid_request

        if len(stop) > self.max_stop_strings:
            raise invalid_request(f"stop accepts at most {self.max_stop_strings} strings, got {len(stop)}", "stop")
        for s in stop:
            if len(s) > self.max_stop_length:
                raise invalid_request(f"stop strings may be at most {self.max_stop_length} characters long, "
                                      f"got one of {len(s)}", "stop")

    def check_messages(self, messages: list) -> None:
        from server.errors import invalid_request

        if len(messages) > self.max_messages:
            raise invalid_request(f"messages accepts at most {self.max_messages} entries, got {len(messages)}",
                                  "messages")


def too_long(num_tokens: int | str, limit: int, max_model_len: int, param: str) -> Exception:
    from server.errors import invalid_request

    where = "the context window" if limit == max_model_len - 1 else "this server's prompt limit"
    return invalid_request(
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt is "
        f"{num_tokens} tokens, over {where} ({limit} tokens, one token must be left for output).", param)


class PromptEncoder:
    """Prompt -> ids under the token limit, cheapest refusal first.

    A prompt whose UTF-8 size divided by the longest token's size already exceeds the limit is
    refused without tokenizing. Tokenization runs without the GIL (`encode_prompt` and
    `encode_many` batch on the Rust side), so a big prompt encoded on a worker thread does not
    stall the event loop. A prompt is the chat encoder's pieces (control tokens only where the
    encoder put them) or one raw string (raw completions may spell control tokens).
    """

    def __init__(self, tokenizer, max_token_bytes: int):
        self._tokenizer = tokenizer
        self._max_token_bytes = max(1, max_token_bytes)

    def encode(self, prompt: str | Sequence[str], limit: int, max_model_len: int, param: str) -> list[int]:
        pieces = [prompt] if isinstance(prompt, str) else list(prompt)
        num_bytes = sum(len(piece.encode("utf-8", errors="surrogatepass")) for piece in pieces)
        lower_bound = -(-num_bytes // self._max_token_bytes)
        if lower_bound > limit:
            raise too_long(f"at least {lower_bound}", limit, max_model_len, param)
        if isinstance(prompt, str):
            ids = self._tokenizer.encode_many([prompt])[0]
        else:
            ids = self._tokenizer.encode_prompt(pieces)
        if len(ids) > limit:
            raise too_long(len(ids), limit, max_model_len, param)
        return ids
