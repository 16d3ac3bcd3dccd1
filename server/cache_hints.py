"""What a chat request tells the prefix cache about its own reuse (`engine.core.request.CacheHints`).

- A unit at the end of the system + tools block (and the `<｜User｜>` marker that opens the first
  user turn), so sessions that share a system prompt share it whole instead of only up to the
  last every-N-tokens unit (DeepSeek: units where the system "detects a common prefix"); with
  tools, one more at the end of the system text alone, which sessions with the same system
  prompt but other tools (or none) share.
- No end-of-output unit when the next turn cannot match it: in thinking mode without tools the
  encoder drops earlier turns' reasoning, so the next prompt leaves this output right after its
  `<｜Assistant｜>` header — where the end-of-prompt unit already sits.

A hint is only given when the block's tokens are exactly the prompt's first tokens (a tokenizer
could merge across the boundary); otherwise the request simply gets none.
"""

from __future__ import annotations

from engine.core.request import CacheHints
from server.chat_template import USER, ChatTemplateError, render_messages

_SYSTEM_ROLES = ("system", "developer")


def chat_cache_hints(messages: list[dict], prompt_ids: list[int], tokenizer, *, thinking: bool,
                     tools: list[dict] | None, starts_in_reasoning: bool, **encode_options) -> CacheHints:
    """Hints for a chat prompt rendered by `render_messages(messages, thinking=..., tools=...,
    **encode_options)` and encoded by `tokenizer.encode_prompt` into `prompt_ids`."""
    keep_output = not (thinking and not tools and starts_in_reasoning)
    ends = [_system_block_end(messages, prompt_ids, tokenizer, thinking=thinking, tools=tools, **encode_options)]
    if tools or encode_options.get("response_format"):
        # Also the system text alone: sessions with the same system prompt but other (or no)
        # tools share that much.
        ends.append(_system_block_end(messages, prompt_ids, tokenizer, thinking=thinking, tools=None,
                                      **{**encode_options, "response_format": None}, text_only=True))
    return CacheHints(unit_ends=tuple(end for end in ends if end), keep_output=keep_output)


def _system_block_end(messages: list[dict], prompt_ids: list[int], tokenizer, text_only: bool = False,
                      **encode_options) -> int | None:
    leading = 0
    while leading < len(messages) and isinstance(messages[leading], dict) and \
            messages[leading].get("role") in _SYSTEM_ROLES:
        leading += 1
    if leading == len(messages):
        return None  # nothing after the system block: the end-of-prompt unit covers it
    system = messages[:leading] or [{"role": "system", "content": ""}]  # tools alone form a block
    if not leading and not encode_options.get("tools") and not encode_options.get("response_format"):
        return None  # no system block at all
    if text_only:
        if any(isinstance(m.get("tools"), list) for m in system):
            return None  # tools inside the system message: no tool-free prefix
        system = [{k: v for k, v in m.items() if k != "response_format"} for m in system]
    try:
        pieces = render_messages(system, add_generation_prompt=False, **encode_options)
    except ChatTemplateError:
        return None
    if text_only:
        # The text may end inside a token the prompt's next piece merges with ("." + "\n\n"):
        # the unit goes where the two token sequences part, still a prefix of both.
        return _common_prefix(tokenizer.encode_prompt(pieces), prompt_ids) or None
    opens_user = messages[leading].get("role") in ("user", "tool")
    for candidate in ((pieces + [USER], pieces) if opens_user else (pieces,)):
        ids = tokenizer.encode_prompt(candidate)  # as the prompt itself was encoded
        if 0 < len(ids) < len(prompt_ids) and prompt_ids[:len(ids)] == ids:
            return len(ids)
    return None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b) - 1)  # a unit must leave the prompt a token to compute
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k
