"""Anthropic Messages (`POST /anthropic/v1/messages`, `/v1/messages`, `…/count_tokens`).

A Messages request is translated into the chat request it means (`to_chat_request`) and
planned by the chat endpoint, so prompt rendering, validation, sampling, tools and billing are
the chat ones; `MessagesRun` reads the same parse (reasoning, content, DSML tool calls) and
answers in Anthropic's shapes: a `message` with `thinking` / `text` / `tool_use` blocks, or the
event stream `message_start`, `ping`, `content_block_start` / `_delta` (`thinking_delta`,
`signature_delta`, `text_delta`, `input_json_delta`) / `_stop`, `message_delta` (stop_reason
and usage), `message_stop`.

Policies (DeepSeek's Anthropic guide, api-surface §5.4):
- Model names: served names pass through; `claude-opus*` means deepseek-v4-pro and any other
  name deepseek-v4-flash (all answered by the one loaded model; `model` is echoed).
- `thinking: {type: enabled|disabled}` switches V4 reasoning (absent: the model's default, on);
  `budget_tokens` is ignored; `output_config.effort` is the reasoning effort. Replayed
  `thinking` blocks are the turn's `reasoning_content`; an assistant `tool_use` turn without
  one replays empty reasoning (Anthropic clients may drop thinking blocks).
- `tool_choice`: auto, any (= required), tool (= named), none; `disable_parallel_tool_use`,
  `cache_control`, `citations`, `top_k` 0 and `metadata` other than `user_id` are ignored;
  image / document blocks are a 400 (text-only model). A `seed` field (an extension, as on
  the chat route) makes sampling reproducible. `tool_result.is_error` prefixes
  "Error: " to the result text.
- Thinking signatures are a digest of the thinking text (nothing is verified on the way back).
- stop_reason: end_turn, max_tokens, stop_sequence (with the matched string), tool_use.
- usage: `input_tokens` are the uncached prompt tokens, `cache_read_input_tokens` the prefix
  cache hits, `cache_creation_input_tokens` 0 (caching is automatic); `output_tokens` include
  the reasoning.
- Auth: `x-api-key` or `Authorization: Bearer`; `anthropic-version` / `anthropic-beta` ignored.
  Errors use Anthropic's envelope (server/errors.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from server.chat import ChatRun, api_messages, plan_chat, resolve_thinking
from server.chat_template import render_messages
from server.errors import anthropic_error_body, invalid_request
from server.protocol import ChatCompletionRequest, _Body
from server.serve_config import ServerContext
from server.streaming import SseDialect

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


class MessagesRequest(_Body):
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


class CountTokensRequest(_Body):
    model: str
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


# ---------------------------------------------------------------------------- request translation


def chat_model_name(ctx: ServerContext, model: str) -> str:
    if model in ctx.config.model_names:
        return model
    return "deepseek-v4-pro" if model.startswith("claude-opus") else "deepseek-v4-flash"


def _text_of(blocks: str | list, where: str) -> str:
    """Text blocks joined (the chat encoder's separator); other block types are a 400."""
    if isinstance(blocks, str):
        return blocks
    texts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise invalid_request(f"{where}[{j}]: block type {kind!r} is not supported here (text-only model)",
                                  f"{where}[{j}].type")
        texts.append(block["text"])
    return "\n\n".join(texts)


def _tool_result(block: dict, where: str) -> dict:
    if not isinstance(block.get("tool_use_id"), str):
        raise invalid_request(f"{where}.tool_use_id is required", f"{where}.tool_use_id")
    text = _text_of(block.get("content") or "", f"{where}.content")
    if block.get("is_error"):
        text = "Error: " + text
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _user_messages(content: list, where: str) -> list[dict]:
    """Tool results become tool messages, text runs user messages, in block order."""
    messages: list[dict] = []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        if isinstance(block, dict) and block.get("type") == "tool_result":
            messages.append(_tool_result(block, at))
        else:
            text = _text_of([block], where)
            if messages and messages[-1]["role"] == "user":
                messages[-1]["content"] += "\n\n" + text
            else:
                messages.append({"role": "user", "content": text})
    return messages


def _assistant_message(content: list, where: str) -> dict:
    texts, reasoning, calls = [], None, []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text_of([block], where))
        elif kind == "thinking":
            reasoning = (reasoning or "") + str(block.get("thinking", ""))
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise invalid_request(f"{at}: tool_use needs an id and a name", at)
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": json.dumps(block.get("input") or {},
                                                                                      ensure_ascii=False)}})
        else:
            raise invalid_request(f"{at}: block type {kind!r} is not supported in assistant turns", f"{at}.type")
    message = {"role": "assistant", "content": "\n\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
        message["reasoning_content"] = reasoning or ""
    elif reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def chat_messages(system, messages: list[dict]) -> list[dict]:
    """Anthropic system + turns as OpenAI chat messages."""
    out = [] if system is None else [{"role": "system", "content": _text_of(system, "system")}]
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise invalid_request(f"{where}.role must be 'user' or 'assistant'", f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
        elif isinstance(content, list):
            where = f"{where}.content"
            out += _user_messages(content, where) if message["role"] == "user" else [
                _assistant_message(content, where)]
        else:
            raise invalid_request(f"{where}.content must be a string or a list of blocks", f"{where}.content")
    return out


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    if tools is None:
        return None
    converted = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or tool.get("type") not in (
                None, "custom"):
            raise invalid_request(f"tools[{i}] must be a custom tool with a name and an input_schema "
                                  "(server tools are not supported)", f"tools[{i}]")
        function = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
        if tool.get("description"):
            function["description"] = tool["description"]
        if tool.get("strict"):
            function["strict"] = True
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: dict | None):
    if choice is None:
        return None
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise invalid_request("tool_choice.type must be auto, any, tool or none", "tool_choice.type")


def _thinking(req) -> tuple[dict | None, str | None]:
    thinking = req.thinking
    if thinking is not None and thinking.get("type") not in ("enabled", "disabled", "adaptive"):
        raise invalid_request("thinking.type must be 'enabled' or 'disabled'", "thinking.type")
    kind = None if thinking is None else ("disabled" if thinking["type"] == "disabled" else "enabled")
    effort = (req.output_config or {}).get("effort")
    return (None if kind is None else {"type": kind}), effort


def to_chat_request(ctx: ServerContext, req: MessagesRequest) -> ChatCompletionRequest:
    if req.top_k is not None and req.top_k < 0:
        raise invalid_request(f"top_k must be >= 0, got {req.top_k}", "top_k")
    thinking, effort = _thinking(req)
    user_id = (req.metadata or {}).get("user_id")
    return ChatCompletionRequest(
        model=chat_model_name(ctx, req.model), messages=chat_messages(req.system, req.messages),
        max_tokens=req.max_tokens, stop=req.stop_sequences, stream=req.stream, temperature=req.temperature,
        top_p=req.top_p, tools=chat_tools(req.tools), tool_choice=chat_tool_choice(req.tool_choice),
        thinking=thinking, reasoning_effort=effort, user_id=user_id if isinstance(user_id, str) else None,
        seed=(req.model_extra or {}).get("seed"))


# ---------------------------------------------------------------------------- the reply


def signature(thinking: str) -> str:
    return hashlib.sha256(thinking.encode()).hexdigest()[:32]


class MessagesRun(ChatRun):
    """One Messages request: the chat run's parse, Anthropic's message and events."""

    dialect = SseDialect(named=True, done=None, error=anthropic_error_body)
    api = "anthropic_messages"

    def __init__(self, ctx: ServerContext, req: MessagesRequest, chat_req: ChatCompletionRequest):
        plan = plan_chat(ctx, chat_req, is_beta=False)
        for params in plan.params:
            params.top_k = req.top_k or -1
        super().__init__(ctx, plan)
        self.id = "msg_" + self.id.replace("-", "")
        self.request_model = req.model
        self.stop_sequences = set(req.stop_sequences or ())
        self.open_kind: str | None = None  # the streamed block still open: thinking, text, tool_use:<i>
        self.num_blocks = 0

    # ---- shared pieces -----------------------------------------------------------------------

    def anthropic_usage(self) -> dict:
        self.settle()  # bills once and feeds the metrics
        counts = self.usage()
        return {"input_tokens": counts.cache_miss_tokens, "output_tokens": counts.completion_tokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": counts.cache_hit_tokens}

    def stop(self) -> tuple[str, str | None]:
        choice = self.choices[0]
        reason = STOP_REASONS.get(choice.finish_reason, "end_turn")
        matched = choice.last_output.stop_reason if choice.last_output else None
        if reason == "end_turn" and isinstance(matched, str) and matched in self.stop_sequences:
            return "stop_sequence", matched
        return reason, None

    def message(self, content: list[dict], stop_reason: str | None, stop_sequence: str | None,
                usage: dict) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.request_model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}

    # ---- non-streaming -------------------------------------------------------------------------

    def body(self) -> dict:
        choice = self.choices[0]
        parser = choice.parser
        content = []
        if self.plan.thinking and parser.reasoning:
            content.append({"type": "thinking", "thinking": parser.reasoning,
                            "signature": signature(parser.reasoning)})
        if parser.content:
            content.append({"type": "text", "text": parser.content})
        for call in choice.complete_calls:
            content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)})
        return self.message(content, *self.stop(), self.anthropic_usage())

    # ---- streaming -----------------------------------------------------------------------------

    def _open(self, kind: str, block: dict) -> list[dict]:
        events = self._close_open_block()
        self.open_kind = kind
        self.num_blocks += 1
        events.append({"type": "content_block_start", "index": self.num_blocks - 1, "content_block": block})
        return events

    def _close_open_block(self) -> list[dict]:
        if self.open_kind is None:
            return []
        index = self.num_blocks - 1
        events = []
        if self.open_kind == "thinking":  # Anthropic sends the signature last, then stops the block
            reasoning = self.choices[0].parser.reasoning
            events.append({"type": "content_block_delta", "index": index,
                           "delta": {"type": "signature_delta", "signature": signature(reasoning)}})
        self.open_kind = None
        events.append({"type": "content_block_stop", "index": index})
        return events

    def _delta_events(self, delta) -> list[dict]:
        if delta.reasoning is not None:
            kind, block, piece = "thinking", {"type": "thinking", "thinking": "", "signature": ""}, {
                "type": "thinking_delta", "thinking": delta.reasoning}
        elif delta.content is not None:
            kind, block, piece = "text", {"type": "text", "text": ""}, {"type": "text_delta", "text": delta.content}
        else:
            call = delta.tool_call
            kind, block, piece = f"tool_use:{call.index}", {
                "type": "tool_use", "id": call.id, "name": call.name, "input": {}}, {
                "type": "input_json_delta", "partial_json": call.arguments}
        events = [] if self.open_kind == kind else self._open(kind, block)
        events.append({"type": "content_block_delta", "index": self.num_blocks - 1, "delta": piece})
        return events

    def render(self, index: int, out) -> list[dict]:
        choice = self.choices[0]
        events = []
        if not choice.has_started:
            choice.has_started = True
            usage = {"input_tokens": out.num_prompt_tokens - out.num_cached_tokens, "output_tokens": 0,
                     "cache_creation_input_tokens": 0, "cache_read_input_tokens": out.num_cached_tokens}
            events += [{"type": "message_start", "message": self.message([], None, None, usage)},
                       {"type": "ping"}]
        for delta in choice.feed(out, self.ctx.token_table, 0):
            events += self._delta_events(delta)
        if out.finished:
            events += self._close_open_block()
            stop_reason, stop_sequence = self.stop()
            events += [{"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                        "usage": self.anthropic_usage()},
                       {"type": "message_stop"}]
        return events


async def create_message(ctx: ServerContext, request: Request, req: MessagesRequest) -> Response:
    return await MessagesRun(ctx, req, to_chat_request(ctx, req)).respond(request)


def count_tokens(ctx: ServerContext, req: CountTokensRequest) -> dict:
    """`{"input_tokens": N}`: the prompt a Messages request with these fields would send."""
    thinking_obj, effort = _thinking(req)
    model = chat_model_name(ctx, req.model)
    thinking, effort = resolve_thinking(ctx, thinking_obj, effort, model)
    choice = chat_tool_choice(req.tool_choice)
    tools = None if choice == "none" else chat_tools(req.tools)
    prompt = render_messages(api_messages(chat_messages(req.system, req.messages)), thinking=thinking,
                             reasoning_effort=effort, tools=tools)
    return {"input_tokens": len(ctx.engine.tokenizer.encode_prompt(prompt))}
