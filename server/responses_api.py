"""OpenAI Responses (`POST /responses`, `/v1/responses`), stateless.

Like the Anthropic route, a Responses request is translated into the chat request it means
(`to_chat_request`) and planned by the chat endpoint; `ResponsesRun` reads the chat parse and
answers with a `response` whose `output` holds `reasoning`, `message` (`output_text`) and
`function_call` items, or streams the lifecycle: `response.created`, `response.in_progress`,
per item `response.output_item.added`, `response.content_part.added`,
`response.reasoning_text.delta` / `.done`, `response.output_text.delta` / `.done`,
`response.function_call_arguments.delta` / `.done`, `response.content_part.done`,
`response.output_item.done`, then `response.completed` (or `response.incomplete` when
`max_output_tokens` cut it). Every event carries `sequence_number`.

Policies:
- Stateless, as DeepSeek's Responses API: nothing is stored whatever `store` says (replies say
  `store: false`); `previous_response_id`, `conversation` and `item_reference` inputs are a
  400 — send the whole history as input items (what `store: false` clients do).
- Input items: messages (string or `input_text` / `output_text` parts; `developer` = system),
  `function_call`, `function_call_output` and `reasoning` (its `reasoning_text` content, else
  its summary, is the next assistant turn's reasoning; a replayed function call without one
  replays empty reasoning). `instructions` is a leading system message.
- `reasoning.effort` is the V4 effort (`none` turns thinking off; absent: the model's
  default, thinking on); `reasoning.summary` is ignored — the reasoning is returned as
  `reasoning_text` content with an empty `summary`.
- Tools: `function` tools only (others are a 400); `tool_choice` auto / none / required /
  `{"type": "function", "name"}`. `text.format` is the chat `response_format` (text,
  json_object, json_schema).
- A `seed` field (an extension, as on the chat route) makes sampling reproducible.
- usage: `input_tokens` (cached ones in `input_tokens_details.cached_tokens`), `output_tokens`
  with `output_tokens_details.reasoning_tokens`.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from server.chat import ChatRun, plan_chat
from server.errors import invalid_request
from server.protocol import ChatCompletionRequest, _Body
from server.serve_config import ServerContext
from server.streaming import SseDialect

_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class ResponsesRequest(_Body):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------- request translation


def _part_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request(f"{where} must be a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise invalid_request(f"{where}[{j}].type {kind!r} is not supported (text-only model)",
                                  f"{where}[{j}].type")
        texts.append(str(part.get("text", part.get("refusal", ""))))
    return "\n\n".join(texts)


def _reasoning_text(item: dict) -> str:
    parts = item.get("content") or item.get("summary") or []
    return "\n\n".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))


class _History:
    """Input items folded into chat messages (function calls join their assistant turn)."""

    def __init__(self):
        self.messages: list[dict] = []
        self.pending_reasoning: str | None = None

    def _assistant(self, content: str) -> dict:
        message = {"role": "assistant", "content": content}
        if self.pending_reasoning is not None:
            message["reasoning_content"], self.pending_reasoning = self.pending_reasoning, None
        self.messages.append(message)
        return message

    def add(self, item: dict, where: str) -> None:
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid_request(f"{where}.role must be user, assistant, system or developer", f"{where}.role")
            text = _part_text(item.get("content", ""), f"{where}.content")
            if role == "assistant":
                self._assistant(text)
            else:
                self.messages.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str):
                raise invalid_request(f"{where}: function_call needs call_id and name", where)
            last = self.messages[-1] if self.messages else None
            if last is None or last["role"] != "assistant" or self.pending_reasoning is not None:
                last = self._assistant("")
            last.setdefault("tool_calls", []).append({
                "id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}})
            last.setdefault("reasoning_content", "")
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise invalid_request(f"{where}.call_id is required", f"{where}.call_id")
            output = item.get("output", "")
            self.messages.append({"role": "tool", "tool_call_id": item["call_id"],
                                  "content": _part_text(output, f"{where}.output")})
        elif kind == "reasoning":
            self.pending_reasoning = (self.pending_reasoning or "") + _reasoning_text(item)
        elif kind == "item_reference":
            raise invalid_request("item_reference inputs need stored responses; this server is stateless "
                                  "(send the items themselves)", f"{where}.type")
        else:
            raise invalid_request(f"{where}.type {kind!r} is not supported", f"{where}.type")


def chat_messages(instructions: str | None, items: str | list) -> list[dict]:
    history = _History()
    if instructions:
        history.messages.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        history.messages.append({"role": "user", "content": items})
        return history.messages
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise invalid_request(f"input[{i}] must be an object", f"input[{i}]")
        history.add(item, f"input[{i}]")
    return history.messages


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    if tools is None:
        return None
    converted = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise invalid_request(f"tools[{i}].type {kind!r} is not supported (function tools only)",
                                  f"tools[{i}].type")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice):
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise invalid_request("tool_choice must be auto, none, required or {'type': 'function', 'name': ...}",
                                  "tool_choice")
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def chat_response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise invalid_request("text.format must be an object", "text.format")
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description")
                                                       if k in fmt}}
    return {"type": fmt.get("type")}


def to_chat_request(ctx: ServerContext, req: ResponsesRequest) -> ChatCompletionRequest:
    if req.previous_response_id is not None or req.conversation is not None:
        raise invalid_request("this server keeps no responses (stateless, as with store: false): send the whole "
                              "conversation as input items instead of previous_response_id / conversation",
                              "previous_response_id" if req.previous_response_id is not None else "conversation")
    effort = (req.reasoning or {}).get("effort")
    return ChatCompletionRequest(
        model=req.model, messages=chat_messages(req.instructions, req.input), max_tokens=req.max_output_tokens,
        stream=req.stream, temperature=req.temperature, top_p=req.top_p, tools=chat_tools(req.tools),
        tool_choice=chat_tool_choice(req.tool_choice), reasoning_effort=effort,
        response_format=chat_response_format(req.text), user=req.safety_identifier or req.user,
        seed=(req.model_extra or {}).get("seed"))


# ---------------------------------------------------------------------------- the reply


def _reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if text or status == "completed" else []}


def _output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None, status: str) -> dict:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [] if text is None else [_output_text(text)]}


def _call_item(item_id: str, call, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" or call.arguments else "", "status": status}


class ResponsesRun(ChatRun):
    """One Responses request: the chat run's parse, the Responses items and lifecycle."""
    api = "responses"

    dialect = SseDialect(named=True, done=None,
                         error=lambda err: {"type": "error", "code": err.code, "message": err.message,
                                            "param": err.param, "sequence_number": 0})

    def __init__(self, ctx: ServerContext, req: ResponsesRequest, chat_req: ChatCompletionRequest):
        plan = plan_chat(ctx, chat_req, is_beta=False)
        super().__init__(ctx, plan)
        self.id = _new_id("resp")
        self.req = req
        self.response_format = chat_req.response_format
        self.sequence = 0
        self.items: list[dict] = []  # finished output items, in order
        self.open: tuple[str, str, object] | None = None  # (kind, item id, tool call) of the streamed item
        self.text = ""  # text of the open reasoning / message item

    # ---- shared pieces -----------------------------------------------------------------------

    def responses_usage(self) -> dict:
        self.settle()  # bills once and feeds the metrics
        counts = self.usage()
        return {"input_tokens": counts.prompt_tokens,
                "input_tokens_details": {"cached_tokens": counts.cache_hit_tokens},
                "output_tokens": counts.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": counts.reasoning_tokens},
                "total_tokens": counts.prompt_tokens + counts.completion_tokens}

    def response(self, status: str, output: list[dict], usage: dict | None) -> dict:
        req = self.req
        text = req.text or {"format": {"type": "text"}}
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": req.model, "output": output, "usage": usage, "error": None,
                "incomplete_details": incomplete, "instructions": req.instructions, "metadata": req.metadata or {},
                "max_output_tokens": req.max_output_tokens, "parallel_tool_calls": req.parallel_tool_calls is not False,
                "temperature": req.temperature, "top_p": req.top_p, "tools": req.tools or [],
                "tool_choice": req.tool_choice or "auto", "text": text, "store": False,
                "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
                "truncation": "disabled", "previous_response_id": None}

    def final_status(self) -> str:
        return "incomplete" if self.choices[0].finish_reason == "length" else "completed"

    # ---- non-streaming -------------------------------------------------------------------------

    def body(self) -> dict:
        choice = self.choices[0]
        parser = choice.parser
        output = []
        if self.plan.thinking and parser.reasoning:
            output.append(_reasoning_item(_new_id("rs"), parser.reasoning, "completed"))
        if parser.content or not choice.complete_calls:
            output.append(_message_item(_new_id("msg"), parser.content, "completed"))
        output += [_call_item(_new_id("fc"), call, "completed") for call in choice.complete_calls]
        return self.response(self.final_status(), output, self.responses_usage())

    # ---- streaming -----------------------------------------------------------------------------

    def event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _item_now(self, status: str) -> dict:
        kind, item_id, call = self.open
        if kind == "reasoning":
            return _reasoning_item(item_id, self.text, status)
        if kind == "message":
            return _message_item(item_id, self.text if status == "completed" else None, status)
        return _call_item(item_id, call, status)

    def _open_item(self, kind: str, call=None) -> list[dict]:
        events = self._close_item()
        prefix = {"reasoning": "rs", "message": "msg"}.get(kind, "fc")
        self.open, self.text = (kind, _new_id(prefix), call), ""
        where = {"output_index": len(self.items), "item_id": self.open[1]}
        events.append(self.event("response.output_item.added", output_index=len(self.items),
                                 item=self._item_now("in_progress")))
        if kind == "reasoning":
            events.append(self.event("response.content_part.added", **where, content_index=0,
                                     part={"type": "reasoning_text", "text": ""}))
        elif kind == "message":
            events.append(self.event("response.content_part.added", **where, content_index=0, part=_output_text("")))
        return events

    def _close_item(self) -> list[dict]:
        if self.open is None:
            return []
        kind, item_id, call = self.open
        where = {"output_index": len(self.items), "item_id": item_id}
        events = []
        if kind == "reasoning":
            events += [self.event("response.reasoning_text.done", **where, content_index=0, text=self.text),
                       self.event("response.content_part.done", **where, content_index=0,
                                  part={"type": "reasoning_text", "text": self.text})]
        elif kind == "message":
            events += [self.event("response.output_text.done", **where, content_index=0, text=self.text, logprobs=[]),
                       self.event("response.content_part.done", **where, content_index=0,
                                  part=_output_text(self.text))]
        else:
            events.append(self.event("response.function_call_arguments.done", **where, name=call.name,
                                     arguments=call.arguments))
        status = "incomplete" if kind == "function_call" and not call.is_complete else "completed"
        item = self._item_now(status)
        events.append(self.event("response.output_item.done", output_index=len(self.items), item=item))
        self.items.append(item)
        self.open = None
        return events

    def _delta_events(self, delta) -> list[dict]:
        if delta.tool_call is not None:
            piece = delta.tool_call
            calls = self.choices[0].parser.tool_calls
            events = self._open_item("function_call", calls[piece.index]) if piece.id is not None else []
            where = {"output_index": len(self.items), "item_id": self.open[1]}
            return events + [self.event("response.function_call_arguments.delta", **where, delta=piece.arguments)]
        kind, text = ("reasoning", delta.reasoning) if delta.reasoning is not None else ("message", delta.content)
        events = [] if self.open is not None and self.open[0] == kind else self._open_item(kind)
        self.text += text
        where = {"output_index": len(self.items), "item_id": self.open[1], "content_index": 0}
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return events + [self.event(name, **where, delta=text, **extra)]

    def render(self, index: int, out) -> list[dict]:
        choice = self.choices[0]
        events = []
        if not choice.has_started:
            choice.has_started = True
            started = self.response("in_progress", [], None)
            events += [self.event("response.created", response=started),
                       self.event("response.in_progress", response=started)]
        for delta in choice.feed(out, self.ctx.token_table, 0):
            events += self._delta_events(delta)
        if out.finished:
            events += self._close_item()
            status = self.final_status()
            name = "response.completed" if status == "completed" else "response.incomplete"
            events.append(self.event(name, response=self.response(status, self.items, self.responses_usage())))
        return events


async def create_response(ctx: ServerContext, request: Request, req: ResponsesRequest) -> Response:
    return await ResponsesRun(ctx, req, to_chat_request(ctx, req)).respond(request)
