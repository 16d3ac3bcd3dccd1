"""`POST /chat/completions`: messages -> prompt ids -> engine -> DeepSeek-shaped reply or chunks.

`plan_chat` validates the request and renders the prompt (thinking on by default, effort
aliases, `prefix` only under /beta, tools, JSON mode); `ChatRun` drives the engine requests
(one per choice) and turns their text into `reasoning_content` / `content` / `tool_calls`
with one `OutputParser` per choice.

Policies:
- finish_reason (server/runs.py): `length` when the engine hit max_tokens; `tool_calls` when at
  least one complete call was parsed; `insufficient_system_resource` when the engine aborted or
  failed the request (DeepSeek's "interrupted" reason); else `stop`.
- Tool calls are returned as generated (DeepSeek's non-strict behaviour). Arguments that do not
  match the tool's schema are logged and counted (`dsv4:tool_parse_errors{kind=
  "schema_violation"}`).
- Generated text is never dropped: tool-call markup the parser cannot decode (malformed DSML)
  and calls to a tool that was not offered come back as `content`, verbatim, with the reason
  in the extension field `tool_call_error: {"kind": "malformed_dsml" | "unknown_tool",
  "message": ...}` on the message (streams: on the finish chunk's delta), counted as
  `dsv4:tool_parse_errors{kind=...}`; calls closed before the bad markup are kept. A call cut
  mid-way is dropped from non-streaming replies (its markup is in the content). With
  `dsv4 serve --tool-parse-errors error` such replies fail instead (HTTP 500
  `invalid_tool_call`; in a stream: an error event, then `[DONE]`).
- Thinking mode (DeepSeek's rules): `tool_choice: "required"` or a named function is a 400
  ("Thinking mode does not support this tool_choice"); `temperature` / `top_p` are ignored;
  `logprobs` is supported and also covers the reasoning (`logprobs.reasoning_content`, as in
  DeepSeek's current schema).
- Structured outputs and strict tools (server/structured.py, xgrammar): `strict` functions and
  `tool_choice: "required"` / named constrain the DSML block to the offered names and argument
  schemas; `tool_choice: "none"` hides the tools from the prompt.
- Messages: `developer` is rendered as `system`; the encoder's internal keys (`task`, and
  `tools` / `response_format` inside a message) are ignored. Client text never becomes a
  control token (`Tokenizer.encode_prompt`).
- `response_format: json_object` / `json_schema` constrain the content with a grammar
  (server/grammar.py; reasoning stays free). DeepSeek answers `json_schema` with a 400; we
  support it, as `chat.completions.parse` and LangChain's `with_structured_output` send it.
- n > 1: choices are separate engine requests `<id>-<i>` (seed + i when seeded); usage counts
  the prompt once (choice 0's cache split) and every choice's output.
- Streams put usage on the final finish chunk always (DeepSeek); `include_usage` only turns
  the other chunks' missing `usage` key into `usage: null` (api-surface §3.3).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from engine.sampling_params import SamplingParams
from engine.tokenizer import Control
from server.cache_hints import chat_cache_hints
from server.chat_template import THINK_END, ends_inside_reasoning, render_messages
from server.errors import APIError, invalid_request
from server.grammar import GrammarProcessor
from server.json_schema import check_schema
from server.logit_bias import LogitBias, check_logit_bias
from server.parsers import Delta, OutputParser, validate_tool_arguments
from server.protocol import (
    DEFAULT_MAX_TOKENS_CHAT, DEFAULT_MAX_TOKENS_MAX_EFFORT, DEFAULT_MAX_TOKENS_THINKING, EFFORT_ALIASES,
    MAX_TOP_LOGPROBS, ChatCompletionRequest, cache_salt, check_n, check_sampling, check_stream_options,
    logprob_entry, resolve_max_tokens,
)
from server.runs import Choice, Run, RunPlan, envelope
from server.serve_config import ServerContext
from server.structured import request_constraint, response_format_kind

logger = logging.getLogger(__name__)

MAX_TOOLS = 128
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_OMIT = object()


@dataclass(kw_only=True)
class ChatPlan(RunPlan):
    """A validated chat request, ready for the engine."""

    thinking: bool
    tools: list[dict] | None  # offered to the model (and the parser)
    starts_in_reasoning: bool
    json_mode: bool  # content is constrained JSON: markup spellings in it are string text
    logprobs: bool
    top_logprobs: int


# ---------------------------------------------------------------------------- planning


def resolve_thinking(ctx: ServerContext, thinking_obj: dict | None, reasoning_effort: str | None,
                     model: str) -> tuple[bool, str | None]:
    """(thinking on?, encoder effort level) from `thinking`, `reasoning_effort` and the model
    name; a top-level `reasoning_effort` wins over one inside `thinking`."""
    thinking_obj = thinking_obj or {}
    kind = thinking_obj.get("type")
    if kind not in (None, "enabled", "disabled"):
        raise invalid_request(f"thinking.type must be 'enabled' or 'disabled', got {kind!r}", "thinking.type")
    effort_name = reasoning_effort if reasoning_effort is not None else thinking_obj.get("reasoning_effort")
    if effort_name is not None and (not isinstance(effort_name, str) or effort_name not in EFFORT_ALIASES):
        raise invalid_request(f"reasoning_effort must be one of low, high, max (aliases: {sorted(EFFORT_ALIASES)}), "
                              f"got {effort_name!r}", "reasoning_effort")
    thinking = ctx.config.thinking_default(model) if kind is None else kind == "enabled"
    if effort_name == "none" and kind is None:  # the Responses-format spelling of "thinking off"
        thinking = False
    return thinking, EFFORT_ALIASES.get(effort_name) if effort_name is not None else None


THINKING_TOOL_CHOICE_ERROR = "Thinking mode does not support this tool_choice"
_INTERNAL_MESSAGE_KEYS = ("task", "tools", "response_format")


def api_messages(messages: list) -> list:
    """The request's messages as the public API means them: `developer` is `system`, and the
    encoder's internal per-message keys are not client features."""
    out = []
    for message in messages:
        if isinstance(message, dict):
            message = {k: v for k, v in message.items() if k not in _INTERNAL_MESSAGE_KEYS}
            if message.get("role") == "developer":
                message["role"] = "system"
        out.append(message)
    return out


def _check_thinking_tool_choice(tool_choice, thinking: bool) -> None:
    forced = tool_choice == "required" or (isinstance(tool_choice, dict) and tool_choice.get("type") == "function")
    if thinking and forced:
        raise invalid_request(THINKING_TOOL_CHOICE_ERROR, "tool_choice")


def _check_tools(tools: list[dict] | None, tool_choice) -> list[dict] | None:
    """Validated tools as offered to the model (None: no tools in the prompt)."""
    if tools is not None and len(tools) > MAX_TOOLS:
        raise invalid_request(f"tools accepts at most {MAX_TOOLS} functions, got {len(tools)}", "tools")
    names = []
    for i, tool in enumerate(tools or []):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise invalid_request(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise invalid_request(f"tools[{i}].function.name must match [a-zA-Z0-9_-]{{1,64}}, got {name!r}",
                                  f"tools[{i}].function.name")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise invalid_request(f"tools[{i}].function.parameters must be a JSON Schema object",
                                  f"tools[{i}].function.parameters")
        try:
            check_schema(parameters)  # every depth, so the call the model makes later can be checked
        except ValueError as err:
            raise invalid_request(f"tools[{i}].function.parameters is not a valid JSON Schema: {err}",
                                  f"tools[{i}].function.parameters") from None
        names.append(name)
    if tool_choice is None or tool_choice in ("auto", "required"):
        return tools or None
    if tool_choice == "none":
        return None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        wanted = function.get("name") if isinstance(function, dict) else None
        if wanted not in names:
            raise invalid_request(f"tool_choice names function {wanted!r}, which is not in tools", "tool_choice")
        return tools
    raise invalid_request("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                          "'function': {'name': ...}}", "tool_choice")


def _check_prefix(messages: list[dict], is_beta: bool) -> None:
    for i, message in enumerate(messages):
        if message.get("prefix") and not is_beta:
            raise invalid_request("Chat prefix completion (`prefix: true`) is a Beta feature: use the "
                                  "/beta base URL", f"messages[{i}].prefix")


def plan_chat(ctx: ServerContext, req: ChatCompletionRequest, is_beta: bool) -> ChatPlan:
    model = ctx.resolve_model(req.model)
    thinking, effort = resolve_thinking(ctx, req.thinking, req.reasoning_effort, model)
    ctx.config.limits.check_messages(req.messages)
    _check_prefix(req.messages, is_beta)
    tools = _check_tools(req.tools, req.tool_choice)
    _check_thinking_tool_choice(req.tool_choice, thinking)
    json_mode = response_format_kind(req.response_format) != "text"
    n = check_n(req.n)
    sampling = check_sampling(req, thinking, ctx.engine.generation_defaults, ctx.config.limits)
    logit_bias = check_logit_bias(req.logit_bias, ctx.engine.tokenizer.vocab_size)
    include_usage = check_stream_options(req.stream, req.stream_options)
    salt = cache_salt(req.user_id, req.user)
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise invalid_request("top_logprobs requires logprobs to be true", "top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise invalid_request(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}",
                                  "top_logprobs")

    render_options = dict(thinking=thinking, reasoning_effort=effort, tools=tools,
                          response_format=req.response_format if json_mode else None)
    messages = api_messages(req.messages)
    prompt = render_messages(messages, replay=ctx.tool_call_replay.generated_pieces, **render_options)
    prompt_ids = ctx.encode_prompt(prompt, "messages")
    starts_in_reasoning = ends_inside_reasoning(prompt)
    hints = chat_cache_hints(messages, prompt_ids, ctx.engine.tokenizer, starts_in_reasoning=starts_in_reasoning,
                             **render_options)

    if req.max_tokens is not None:
        requested, param = req.max_tokens, "max_tokens"
    else:
        requested, param = req.max_completion_tokens, "max_completion_tokens"
    default = (DEFAULT_MAX_TOKENS_MAX_EFFORT if effort == "max" else DEFAULT_MAX_TOKENS_THINKING) \
        if thinking else DEFAULT_MAX_TOKENS_CHAT
    max_tokens = resolve_max_tokens(requested, param, default, len(prompt_ids), ctx.engine.max_model_len)

    think_end_id = ctx.engine.tokenizer.token_to_id(THINK_END)
    constraint = request_constraint(ctx.grammar, tools=tools, tool_choice=req.tool_choice,
                                    response_format=req.response_format)
    params = []
    for i in range(n):
        processors = [LogitBias(logit_bias)] if logit_bias else []
        if constraint is not None:  # last: the grammar mask has the final word
            processors.append(GrammarProcessor(constraint, think_end_id if starts_in_reasoning else None))
        try:
            params.append(SamplingParams(
                max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                seed=None if sampling.seed is None else sampling.seed + i, stop=sampling.stop,
                ignore_eos=req.ignore_eos, skip_special_tokens=False,  # the parser reads </think> and DSML
                logprobs=(req.top_logprobs or 0) if req.logprobs else None, logits_processors=processors))
        except ValueError as err:
            raise invalid_request(str(err)) from None
    return ChatPlan(model=req.model, thinking=thinking, tools=tools, prompt_ids=prompt_ids,
                    starts_in_reasoning=starts_in_reasoning, json_mode=json_mode, params=params, cache_salt=salt,
                    cache_hints=hints,
                    stream=req.stream, include_usage=include_usage, logprobs=bool(req.logprobs),
                    top_logprobs=req.top_logprobs or 0)


# ---------------------------------------------------------------------------- one choice


@dataclass(kw_only=True)
class ChatChoice(Choice):
    """The parse and the token accounting of one choice."""

    parser: OutputParser
    in_reasoning: bool
    think_end_id: int | None
    eos_id: int
    num_reasoning_tokens: int = 0
    has_started: bool = False
    generated_ids: list[int] = field(default_factory=list)  # every sampled token (tool-call replay)
    logprobs: dict = field(default_factory=lambda: {"content": [], "reasoning_content": []})
    pending_logprobs: dict = field(default_factory=lambda: {"content": [], "reasoning_content": []})

    def feed(self, out, token_table, top_n: int) -> list[Delta]:
        """Fold one engine output in; the parser's deltas (plus its final ones when finished)."""
        self.observe(out)
        entries = out.logprobs or []
        for position, token_id in enumerate(out.new_token_ids):
            part = "reasoning_content" if self.in_reasoning else "content"
            if self.in_reasoning:
                self.num_reasoning_tokens += 1
                self.in_reasoning = token_id != self.think_end_id
            if position < len(entries) and token_id != self.eos_id:
                e = entries[position]
                item = logprob_entry(token_table, e.token_id, e.logprob, e.top, top_n)
                self.logprobs[part].append(item)
                self.pending_logprobs[part].append(item)
        self.generated_ids += out.new_token_ids
        deltas = self.parser.feed(out.new_text)
        if out.finished:
            deltas += self.parser.finish()
        return deltas

    def take_pending_logprobs(self, thinking: bool) -> dict:
        taken = {"content": self.pending_logprobs["content"]}
        if thinking:
            taken["reasoning_content"] = self.pending_logprobs["reasoning_content"]
        self.pending_logprobs = {"content": [], "reasoning_content": []}
        return taken

    @property
    def complete_calls(self) -> list:
        return [call for call in self.parser.tool_calls if call.is_complete]

    def generated_after_reasoning(self, starts_in_reasoning: bool, tokenizer) -> list[str] | None:
        """Prompt pieces for what the model generated after `</think>` (all of it outside
        thinking), EOS excluded: its control tokens as `Control`s, the text between them plain,
        so `encode_prompt` gives the generated ids back. None when the reasoning never closed."""
        ids = self.generated_ids
        if starts_in_reasoning:
            if self.think_end_id not in ids:
                return None
            ids = ids[ids.index(self.think_end_id) + 1:]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        pieces, run = [], []
        for token_id in ids:
            if token_id in tokenizer.control_ids:
                if run:
                    pieces.append(tokenizer.decode(run))
                    run = []
                pieces.append(Control(tokenizer.id_to_token(token_id)))
            else:
                run.append(token_id)
        if run:
            pieces.append(tokenizer.decode(run))
        return pieces

    def natural_finish(self) -> str:
        return "tool_calls" if self.complete_calls else "stop"


# ---------------------------------------------------------------------------- wire shapes


@dataclass(frozen=True)
class ChunkFormat:
    """DeepSeek's `chat.completion.chunk` shapes for one request (api-surface §3.2)."""

    id: str
    created: int
    model: str
    system_fingerprint: str
    thinking: bool
    include_usage: bool

    def chunk(self, index: int, delta: dict, finish_reason: str | None = None, logprobs=None,
              usage=_OMIT) -> dict:
        chunk = envelope("chat.completion.chunk", self.id, self.created, self.model, self.system_fingerprint,
                         [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])
        if usage is not _OMIT:
            chunk["usage"] = usage
        elif self.include_usage:  # DeepSeek: include_usage only turns the absent key into null
            chunk["usage"] = None
        return chunk

    def role_delta(self) -> dict:
        """The first delta: thinking mode opens with an empty `reasoning_content`."""
        if self.thinking:
            return {"role": "assistant", "content": None, "reasoning_content": ""}
        return {"role": "assistant", "content": ""}

    def delta(self, delta: Delta) -> dict:
        if delta.reasoning is not None:
            return {"content": None, "reasoning_content": delta.reasoning}
        if delta.content is not None:
            return {"content": delta.content, "reasoning_content": None} if self.thinking else {"content": delta.content}
        call = delta.tool_call
        piece: dict = {"index": call.index}
        if call.id is not None:
            piece.update(id=call.id, type="function", function={"name": call.name, "arguments": call.arguments})
        else:
            piece["function"] = {"arguments": call.arguments}
        return {"tool_calls": [piece]}


def tool_call_problems(parser: OutputParser, tools: list[dict] | None) -> list[str]:
    """Metric kinds of what went wrong with one choice's tool calls: the parse error's kind
    (`malformed_dsml` / `unknown_tool`) once, `schema_violation` per complete call whose
    arguments miss its schema."""
    problems = []
    if parser.error is not None:
        logger.warning("tool-call markup returned as content (%s): %s", parser.error.kind, parser.error.message)
        problems.append(parser.error.kind)
    by_name = {t["function"]["name"]: t for t in tools or []}
    for call in parser.tool_calls:
        if not call.is_complete:
            continue
        try:
            errors = validate_tool_arguments(by_name[call.name], json.loads(call.arguments))
        except (ValueError, KeyError) as err:
            errors = [str(err)]
        if errors:
            logger.warning("tool call %s(%s) does not match its schema: %s", call.name, call.arguments, errors)
            problems.append("schema_violation")
    return problems


# ---------------------------------------------------------------------------- the run


class ChatRun(Run):
    """One chat request in flight: its choices' parses, and the reply they turn into."""

    def __init__(self, ctx: ServerContext, plan: ChatPlan):
        tokenizer = ctx.engine.tokenizer
        think_end_id = tokenizer.token_to_id(THINK_END)
        fail_on_bad_markup = ctx.config.tool_parse_errors == "error"
        choices = [
            ChatChoice(index=i, parser=OutputParser(plan.thinking, plan.tools,
                                                    starts_in_reasoning=plan.starts_in_reasoning,
                                                    markup_as_content=not fail_on_bad_markup,
                                                    json_content=plan.json_mode),
                       in_reasoning=plan.starts_in_reasoning, think_end_id=think_end_id, eos_id=tokenizer.eos_id)
            for i in range(len(plan.params))]
        super().__init__(ctx, plan, choices)
        self.fail_on_bad_markup = fail_on_bad_markup
        self.format = ChunkFormat(self.id, self.created, plan.model, ctx.system_fingerprint, plan.thinking,
                                  plan.include_usage)

    # ---- accounting ------------------------------------------------------------------------

    def reasoning_tokens(self) -> int:
        return sum(c.num_reasoning_tokens for c in self.choices) if self.plan.thinking else 0

    def before_settle(self) -> None:
        for choice in self.choices:
            for kind in tool_call_problems(choice.parser, self.plan.tools):
                self.ctx.count_tool_parse_error(kind)
            self._remember_tool_calls(choice)

    def _remember_tool_calls(self, choice: ChatChoice) -> None:
        """Let a later request that passes these calls back render the generated tokens."""
        calls = choice.complete_calls
        pieces = choice.generated_after_reasoning(self.plan.starts_in_reasoning, self.ctx.engine.tokenizer) \
            if calls else None
        if pieces is not None:
            self.ctx.tool_call_replay.remember(_wire_calls(calls), choice.parser.content, pieces)

    # ---- non-streaming ---------------------------------------------------------------------

    def consume(self, index: int, out) -> None:
        self.choices[index].feed(out, self.ctx.token_table, self.plan.top_logprobs)

    def _markup_error(self, choice: ChatChoice) -> dict | None:
        """The `tool_call_error` extension of one finished choice (or the error-mode failure)."""
        error = choice.parser.error
        if error is None:
            return None
        if self.fail_on_bad_markup:
            self.settle()
            raise APIError(500, f"the model's tool call could not be parsed ({error.kind}): {error.message}",
                           type="server_error", code="invalid_tool_call")
        return {"kind": error.kind, "message": error.message}

    def body(self) -> dict:
        choices = []
        for choice in self.choices:
            message = {"role": "assistant", "content": choice.parser.content}
            if self.plan.thinking:
                message["reasoning_content"] = choice.parser.reasoning
            markup_error = self._markup_error(choice)
            if markup_error is not None:
                message["tool_call_error"] = markup_error
            calls = choice.complete_calls
            if calls:
                message["tool_calls"] = _wire_calls(calls)
            logprobs = None
            if self.plan.logprobs:
                logprobs = {"content": choice.logprobs["content"]}
                if self.plan.thinking:
                    logprobs["reasoning_content"] = choice.logprobs["reasoning_content"]
            choices.append({"index": choice.index, "message": message, "logprobs": logprobs,
                            "finish_reason": choice.finish_reason})
        return {**self.envelope("chat.completion", choices), "usage": self.settle()}

    # ---- streaming -------------------------------------------------------------------------

    def render(self, index: int, out) -> list[dict]:
        """Chunks for one engine output of choice `index`."""
        choice = self.choices[index]
        chunks = []
        if not choice.has_started:
            choice.has_started = True
            chunks.append(self.format.chunk(index, self.format.role_delta(), usage=None))
        for delta in choice.feed(out, self.ctx.token_table, self.plan.top_logprobs):
            logprobs = choice.take_pending_logprobs(self.plan.thinking) if self.plan.logprobs else None
            chunks.append(self.format.chunk(index, self.format.delta(delta), logprobs=logprobs))
        if out.finished:
            logprobs = choice.take_pending_logprobs(self.plan.thinking) if self.plan.logprobs else None
            final_delta = {"content": "", "role": None}
            markup_error = self._markup_error(choice)
            if markup_error is not None:
                final_delta["tool_call_error"] = markup_error
            usage = self.settle() if self.job.is_done else _OMIT
            chunks.append(self.format.chunk(index, final_delta, choice.finish_reason, logprobs, usage))
        return chunks


def _wire_calls(calls: list) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


async def create_chat_completion(ctx: ServerContext, request: Request, req: ChatCompletionRequest,
                                 is_beta: bool) -> Response:
    plan = await asyncio.to_thread(plan_chat, ctx, req, is_beta)  # tokenizing is slow for big prompts
    return await ChatRun(ctx, plan).respond(request)
