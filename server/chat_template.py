"""DeepSeek-V4 chat encoder: OpenAI-style messages -> the exact prompt string (BOS included).

Reproduces the rendering rules of DeepSeek's `encoding/encoding_dsv4.py` (no Jinja): roles,
thinking vs chat mode, dropping old reasoning, reasoning-effort prefixes, the tools block,
DSML tool-call history and merged tool results. Text only: no tokenizer, no HTTP. Request
fields that are policy rather than rendering (model aliases, effort aliases such as
`medium`, the `/beta` check for `prefix`) are resolved by the caller.

Policies where the reference is silent or the public API differs:
- `developer` messages are rendered as `system` (the public API has no developer role).
- `content` may be a list of parts: text parts are joined with "\n\n" (the encoder's own
  block separator); any other part type is rejected (V4 is text-only). Tool results keep
  the reference rule: non-text parts render as `[Unsupported {type}]`.
- Request-level `tools` / `response_format` are attached to a leading system message, or to
  a new empty system message inserted at index 0 (what vLLM does for V4).
- `reasoning_effort` None means the encoder default. On the preview table `low` is treated
  as that default (no prefix) because the preview encoder has no lower tier.
- Tool-call `arguments` that are valid JSON but not an object, like non-JSON text, become a
  single `arguments` parameter holding the raw string; an already-decoded dict is accepted.
- A `prefix` assistant turn in thinking mode whose content is empty and which has no tool
  calls leaves `<think>` open, so the model continues the given reasoning.
- `task` and other internal message keys are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_OPEN = f"<{DSML}parameter"
PARAMETER_CLOSE = f"</{DSML}parameter>"

EFFORT_ABSOLUTE_MAXIMUM = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)
EFFORT_BEYOND_MAXIMUM = (
    "Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: "
    "exhaustively decompose the problem into its most fundamental components, trace every causal "
    "chain to its root, and resolve the underlying cause rather than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple "
    "angles and are certain that no assumption remains unchecked and no error remains "
    "undiscovered.\n\n"
)

# effort -> prefix text, per encoder revision (None = the encoder's default tier).
EFFORT_TABLES: dict[str, dict[str | None, str]] = {
    "preview": {None: "", "low": "", "high": "", "max": EFFORT_ABSOLUTE_MAXIMUM},
    "0731": {None: "", "low": "", "high": EFFORT_ABSOLUTE_MAXIMUM, "max": EFFORT_BEYOND_MAXIMUM},
}

_TOOLS_TEMPLATE = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools "
    'by writing a "<{dsml}tool_calls>" block like the following:\n\n'
    "<{dsml}tool_calls>\n"
    '<{dsml}invoke name="$TOOL_NAME">\n'
    '<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>\n'
    "...\n"
    "</{dsml}invoke>\n"
    '<{dsml}invoke name="$TOOL_NAME2">\n'
    "...\n"
    "</{dsml}invoke>\n"
    "</{dsml}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types '
    '(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by {think_start}), you MUST output your complete "
    "reasoning inside {think_start}...{think_end} BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after {think_end} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)
_RESPONSE_FORMAT_TEMPLATE = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
)

_ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")


class ChatTemplateError(ValueError):
    """A request the encoder cannot render; `param` names the offending field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class _ToolCall:
    id: str
    name: str
    arguments: str | dict


@dataclass
class _Block:
    """One piece of a user turn: plain text or a tool result."""

    is_tool_result: bool
    text: str
    tool_call_id: str = ""


@dataclass
class _Turn:
    """A message after validation and merging; roles: system, user, assistant, latest_reminder."""

    role: str
    text: str = ""
    blocks: list[_Block] = field(default_factory=list)
    reasoning: str | None = None
    tool_calls: list[_ToolCall] = field(default_factory=list)
    is_prefix: bool = False
    tools: list[dict] | None = None
    response_format: dict | None = None


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _call_order(calls: list[_ToolCall]) -> dict[str, int]:
    return {call.id: idx for idx, call in enumerate(calls) if call.id}


# ----------------------------------------------------------------------------- validation

def _parts_to_text(content: Any, where: str) -> str:
    """`content` as one string: str, None (-> ""), or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(f"{where} must be a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ChatTemplateError(
                f"{where}[{j}].type {kind!r} is not supported (text-only model)", f"{where}[{j}].type")
        if not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"{where}[{j}].text must be a string", f"{where}[{j}].text")
        texts.append(part["text"])
    return "\n\n".join(texts)


def _tool_result_text(content: Any, where: str) -> str:
    """Tool content: str, or a list where non-text parts render as `[Unsupported {type}]`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(f"{where} must be a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise ChatTemplateError(f"{where}[{j}] must be an object", f"{where}[{j}]")
        if part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        else:
            texts.append(f"[Unsupported {part.get('type')}]")
    return "\n\n".join(texts)


def _parse_tool_calls(raw: Any, where: str) -> list[_ToolCall]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ChatTemplateError(f"{where} must be a list", where)
    calls = []
    for j, call in enumerate(raw):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise ChatTemplateError(f"{at} must be an object", at)
        if call.get("type", "function") != "function":
            raise ChatTemplateError(f"{at}.type must be 'function'", f"{at}.type")
        function = call.get("function")
        if not isinstance(function, dict):
            raise ChatTemplateError(f"{at}.function is required", f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ChatTemplateError(f"{at}.function.name is required", f"{at}.function.name")
        arguments = function.get("arguments")
        if not isinstance(arguments, (str, dict)):
            raise ChatTemplateError(
                f"{at}.function.arguments must be a JSON string", f"{at}.function.arguments")
        call_id = call.get("id") or ""
        if not isinstance(call_id, str):
            raise ChatTemplateError(f"{at}.id must be a string", f"{at}.id")
        calls.append(_ToolCall(id=call_id, name=name, arguments=arguments))
    return calls


def _validate_message(i: int, msg: Any, *, thinking: bool, is_last: bool) -> dict:
    """Check one message and return it with `role` normalised; raises ChatTemplateError."""
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise ChatTemplateError(f"{where} must be an object", where)
    role = msg.get("role")
    if role not in _ROLES:
        raise ChatTemplateError(f"{where}.role {role!r} is not supported", f"{where}.role")
    if msg.get("prefix") and not (role == "assistant" and is_last):
        raise ChatTemplateError(
            f"{where}.prefix is only allowed on the last message, which must be an assistant message",
            f"{where}.prefix")
    if role in ("user", "tool", "latest_reminder") and msg.get("content") is None:
        raise ChatTemplateError(f"{where}.content is required", f"{where}.content")
    if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
        raise ChatTemplateError(f"{where}.tool_call_id is required", f"{where}.tool_call_id")
    if role == "assistant":
        reasoning = msg.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ChatTemplateError(
                f"{where}.reasoning_content must be a string", f"{where}.reasoning_content")
        # DeepSeek's passback rule: tool-call turns keep their reasoning in thinking mode.
        if thinking and msg.get("tool_calls") and reasoning is None:
            raise ChatTemplateError(
                "The `reasoning_content` in the thinking mode must be passed back to the API "
                f"({where}.reasoning_content is required for assistant tool-call turns in "
                "thinking mode)", f"{where}.reasoning_content")
    return {**msg, "role": "system" if role == "developer" else role}


def _validate_tools(tools: Any) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ChatTemplateError("tools must be a list", "tools")
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ChatTemplateError(f"tools[{i}].type must be 'function'", f"tools[{i}].type")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ChatTemplateError(f"tools[{i}].function.name is required", f"tools[{i}].function.name")
        functions.append(function)
    return functions


def _check_options(reasoning_effort: Any, effort_table: Any, response_format: Any) -> None:
    if effort_table not in EFFORT_TABLES:
        raise ChatTemplateError(
            f"effort_table must be one of {sorted(EFFORT_TABLES)}, got {effort_table!r}", "effort_table")
    if not (reasoning_effort is None or isinstance(reasoning_effort, str)) or (
            reasoning_effort not in EFFORT_TABLES[effort_table]):
        raise ChatTemplateError(
            f"reasoning_effort must be one of low, high, max, got {reasoning_effort!r}",
            "reasoning_effort")
    if response_format is not None and not (
            isinstance(response_format, dict) and isinstance(response_format.get("type", "text"), str)):
        raise ChatTemplateError("response_format must be an object with a string `type`", "response_format")


# ----------------------------------------------------------------------------- building turns

def _build_turns(messages: list[dict], prefix_continuation: bool) -> list[_Turn]:
    """Merge tool and consecutive user messages into user turns (the reference merge rule)."""
    turns: list[_Turn] = []
    for i, msg in enumerate(messages):
        role, where = msg["role"], f"messages[{i}]"
        if role in ("user", "tool"):
            if role == "user":
                block = _Block(False, _parts_to_text(msg["content"], f"{where}.content"))
            else:
                block = _Block(True, _tool_result_text(msg["content"], f"{where}.content"),
                               msg["tool_call_id"])
            if turns and turns[-1].role == "user":
                turns[-1].blocks.append(block)
            else:
                turns.append(_Turn(role="user", blocks=[block]))
        elif role == "assistant":
            is_prefix = bool(msg.get("prefix")) or (prefix_continuation and i == len(messages) - 1)
            calls = _parse_tool_calls(msg.get("tool_calls"), f"{where}.tool_calls")
            if is_prefix and calls:
                raise ChatTemplateError(
                    f"{where}.tool_calls cannot be combined with prefix continuation", f"{where}.tool_calls")
            turns.append(_Turn(role="assistant", text=_parts_to_text(msg.get("content"), f"{where}.content"),
                               reasoning=msg.get("reasoning_content"), tool_calls=calls, is_prefix=is_prefix))
        else:
            turns.append(_Turn(role=role, text=_parts_to_text(msg.get("content"), f"{where}.content")))
    return turns


def _order_tool_results(turns: list[_Turn]) -> None:
    """Reorder tool results in each user turn to the preceding assistant's tool_call order."""
    order: dict[str, int] = {}
    for turn in turns:
        if turn.role == "assistant" and turn.tool_calls:
            order = _call_order(turn.tool_calls)
        elif turn.role == "user" and order:
            results = [b for b in turn.blocks if b.is_tool_result]
            if len(results) < 2:
                continue
            # NOTE: unknown ids sort as position 0 (stable), exactly like the reference.
            ordered = iter(sorted(results, key=lambda b: order.get(b.tool_call_id, 0)))
            turn.blocks = [next(ordered) if b.is_tool_result else b for b in turn.blocks]


def _attach_request_extras(turns: list[_Turn], tools: list[dict], response_format: dict | None) -> None:
    wants_format = response_format is not None and response_format.get("type", "text") != "text"
    if not tools and not wants_format:
        return
    if not turns or turns[0].role != "system":
        turns.insert(0, _Turn(role="system"))
    turns[0].tools = tools or None
    turns[0].response_format = response_format if wants_format else None


# ----------------------------------------------------------------------------- rendering

def render_tools_block(functions: list[dict]) -> str:
    """The `## Tools` section for OpenAI `function` objects (one JSON object per line)."""
    return _TOOLS_TEMPLATE.format(
        dsml=DSML, think_start=THINK_START, think_end=THINK_END,
        schemas="\n".join(_to_json(f) for f in functions))


def _arguments_as_mapping(arguments: str | dict) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        decoded = json.loads(arguments)
    except ValueError:
        decoded = None
    return decoded if isinstance(decoded, dict) else {"arguments": arguments}


def _render_tool_calls(calls: list[_ToolCall]) -> str:
    """DSML block for an assistant turn's calls, starting with the "\\n\\n" separator."""
    invokes = []
    for call in calls:
        params = []
        for key, value in _arguments_as_mapping(call.arguments).items():
            is_str = isinstance(value, str)
            params.append(f'{PARAMETER_OPEN} name="{key}" string="{"true" if is_str else "false"}">'
                          f"{value if is_str else _to_json(value)}{PARAMETER_CLOSE}")
        invokes.append(f'{INVOKE_OPEN} name="{call.name}">\n' + "\n".join(params) + f"\n{INVOKE_CLOSE}")
    return "\n\n" + TOOL_CALLS_OPEN + "\n" + "\n".join(invokes) + "\n" + TOOL_CALLS_CLOSE


def _render_system(turn: _Turn) -> str:
    text = turn.text
    if turn.tools:
        text += "\n\n" + render_tools_block(turn.tools)
    if turn.response_format:
        text += "\n\n" + _RESPONSE_FORMAT_TEMPLATE.format(schema=_to_json(turn.response_format))
    return text


def _render_user(turn: _Turn) -> str:
    pieces = [f"<tool_result>{b.text}</tool_result>" if b.is_tool_result else b.text for b in turn.blocks]
    return USER + "\n\n".join(pieces)


def _render_assistant(turn: _Turn, *, thinking: bool, keeps_reasoning: bool) -> str:
    reasoning = ""
    if thinking and keeps_reasoning:
        continues_reasoning = turn.is_prefix and not turn.text and not turn.tool_calls
        reasoning = (turn.reasoning or "") + ("" if continues_reasoning else THINK_END)
    calls = _render_tool_calls(turn.tool_calls) if turn.tool_calls else ""
    return reasoning + turn.text + calls + ("" if turn.is_prefix else EOS)


def encode_messages(
    messages: list[dict],
    *,
    thinking: bool,
    reasoning_effort: str | None = None,
    tools: list[dict] | None = None,
    response_format: dict | None = None,
    add_generation_prompt: bool = True,
    prefix_continuation: bool = False,
    drop_thinking: bool = True,
    effort_table: str = "preview",
) -> str:
    """Render `messages` (OpenAI chat format) into the V4 prompt string, starting with BOS.

    `thinking` picks thinking vs chat mode; `drop_thinking` removes reasoning of turns before
    the last user message (forced off when `tools` are given); `prefix_continuation` (or
    `prefix: true` on the last message) renders the last assistant message without EOS so the
    model continues it. Raises ChatTemplateError (a ValueError) naming the bad field.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must contain at least one message", "messages")
    _check_options(reasoning_effort, effort_table, response_format)
    functions = _validate_tools(tools)
    checked = [_validate_message(i, m, thinking=thinking, is_last=i == len(messages) - 1)
               for i, m in enumerate(messages)]
    if prefix_continuation and checked[-1]["role"] != "assistant":
        raise ChatTemplateError(
            f"messages[{len(messages) - 1}] must be an assistant message for prefix continuation",
            f"messages[{len(messages) - 1}].role")

    turns = _build_turns(checked, prefix_continuation)
    _order_tool_results(turns)
    _attach_request_extras(turns, functions, response_format)

    keep_all_reasoning = not drop_thinking or bool(functions)
    last_user = max((i for i, t in enumerate(turns) if t.role == "user"), default=-1)
    prompt = [BOS, EFFORT_TABLES[effort_table][reasoning_effort] if thinking else ""]
    for i, turn in enumerate(turns):
        if turn.role == "system":
            prompt.append(_render_system(turn))
        elif turn.role == "latest_reminder":
            prompt.append(LATEST_REMINDER + turn.text)
        elif turn.role == "assistant":
            prompt.append(_render_assistant(
                turn, thinking=thinking, keeps_reasoning=keep_all_reasoning or i > last_user))
        else:
            prompt.append(_render_user(turn))
            is_last = i == len(turns) - 1
            # The assistant header follows a user turn only when an assistant (or reminder) comes next.
            if (is_last and add_generation_prompt) or (
                    not is_last and turns[i + 1].role in ("assistant", "latest_reminder")):
                opens_reasoning = thinking and (keep_all_reasoning or i >= last_user)
                prompt.append(ASSISTANT + (THINK_START if opens_reasoning else THINK_END))
    return "".join(prompt)


def ends_inside_reasoning(prompt: str) -> bool:
    """True when generation continues inside `<think>` (for `OutputParser(starts_in_reasoning=)`)."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)
