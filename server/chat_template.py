"""DeepSeek-V4 chat encoder: OpenAI-style messages -> the exact prompt string (BOS included).

Reproduces the rendering rules of DeepSeek's `encoding/encoding_dsv4.py` (no Jinja): roles,
thinking vs chat mode, dropping old reasoning, reasoning-effort prefixes, the tools block,
DSML tool-call history and merged tool results. Text only: no tokenizer, no HTTP. Request
fields that are policy rather than rendering (model aliases, effort aliases such as
`medium`, the `/beta` check for `prefix`) are resolved by the caller.

Policies where the reference is silent or the public API differs:
- `developer` messages render as the reference renders them (`<｜User｜>` + content, dropped
  before the last user turn when old reasoning is dropped); the chat endpoint maps them to
  `system` first because the public API has no developer role.
- Quick-instruction `task` keys follow the reference (task token after the turn; `action`
  opens the assistant turn first); the chat endpoint strips them (internal feature).
- `content` may be a list of parts: text parts are joined with "\n\n" (the encoder's own
  block separator); any other part type is rejected (V4 is text-only). Tool results keep
  the reference rule: non-text parts render as `[Unsupported {type}]`.
- Request-level `tools` / `response_format` are attached to a leading system message, or to
  a new empty system message inserted at index 0 (what vLLM does for V4).
- `reasoning_effort` None means the encoder default. On the preview table `low` is treated
  as that default (no prefix) because the preview encoder has no lower tier.
- Tool-call `arguments` that are valid JSON but not an object, like non-JSON text, become a
  single `arguments` parameter holding the raw string; an already-decoded dict is accepted;
  `null` renders as the reference renders it: one `arguments` parameter, `string="false"`,
  value `null`. A `tool` message may omit `tool_call_id` (the reference allows it).
- Control tokens come only from the encoder: `render_messages` returns pieces where the
  encoder's own tokens are `Control` strings; client text (any role, tool schemas, call
  arguments) is plain, so `Tokenizer.encode_prompt` never maps it to control ids.
- A `prefix` assistant turn in thinking mode whose content is empty and which has no tool
  calls leaves `<think>` open, so the model continues the given reasoning.
- Other internal message keys (`mask`, `wo_eos`, ...) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from engine.tokenizer import Control



BOS = Control("<｜begin▁of▁sentence｜>")
EOS = Control("<｜end▁of▁sentence｜>")
PAD = Control("<｜▁pad▁｜>")
USER = Control("<｜User｜>")
ASSISTANT = Control("<｜Assistant｜>")
THINK_START = Control("<think>")
THINK_END = Control("</think>")
DSML = Control("｜DSML｜")
LATEST_REMINDER = Control("<｜latest_reminder｜>")
TASK_TOKENS = {name: Control(f"<｜{name}｜>")
               for name in ("action", "query", "authority", "domain", "title", "read_url")}
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
    arguments: str | dict | None


@dataclass
class _Block:
    """One piece of a user turn: plain text or a tool result."""

    is_tool_result: bool
    text: str
    tool_call_id: str = ""


@dataclass
class _Turn:
    """A message after validation and merging; roles: system, developer, user, assistant,
    latest_reminder."""

    role: str
    text: str = ""
    blocks: list[_Block] = field(default_factory=list)
    reasoning: str | None = None
    tool_calls: list[_ToolCall] = field(default_factory=list)
    is_prefix: bool = False
    task: str | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None
    generated: list[str] | None = None  # pieces of a passed-back tool-call turn as generated (replace text + calls)


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
        if arguments is not None and not isinstance(arguments, (str, dict)):
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
    if role in ("user", "tool", "latest_reminder", "developer") and msg.get("content") is None:
        raise ChatTemplateError(f"{where}.content is required", f"{where}.content")
    if role == "tool" and not isinstance(msg.get("tool_call_id", ""), str):
        raise ChatTemplateError(f"{where}.tool_call_id must be a string", f"{where}.tool_call_id")
    task = msg.get("task")
    if task is not None and task not in TASK_TOKENS:
        raise ChatTemplateError(f"{where}.task must be one of {sorted(TASK_TOKENS)}, got {task!r}", f"{where}.task")
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
    return msg


def _validate_tools(tools: Any, where: str = "tools") -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ChatTemplateError(f"{where} must be a list", where)
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ChatTemplateError(f"{where}[{i}].type must be 'function'", f"{where}[{i}].type")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ChatTemplateError(f"{where}[{i}].function.name is required", f"{where}[{i}].function.name")
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

def _build_turns(messages: list[dict], prefix_continuation: bool, replay=None) -> list[_Turn]:
    """Merge tool and consecutive user messages into user turns (the reference merge rule:
    a user message joins the previous user turn unless that turn carries a task)."""
    turns: list[_Turn] = []
    for i, msg in enumerate(messages):
        role, where = msg["role"], f"messages[{i}]"
        task = msg.get("task")
        if role in ("user", "tool"):
            if role == "user":
                block = _Block(False, _parts_to_text(msg["content"], f"{where}.content"))
            else:
                block = _Block(True, _tool_result_text(msg["content"], f"{where}.content"),
                               msg.get("tool_call_id") or "")
            previous = turns[-1] if turns else None
            if previous is not None and previous.role == "user" and (role == "tool" or previous.task is None):
                previous.blocks.append(block)
            else:
                turns.append(_Turn(role="user", blocks=[block], task=task))
        elif role == "assistant":
            is_prefix = bool(msg.get("prefix")) or (prefix_continuation and i == len(messages) - 1)
            calls = _parse_tool_calls(msg.get("tool_calls"), f"{where}.tool_calls")
            if is_prefix and calls:
                raise ChatTemplateError(
                    f"{where}.tool_calls cannot be combined with prefix continuation", f"{where}.tool_calls")
            turns.append(_Turn(role="assistant", text=_parts_to_text(msg.get("content"), f"{where}.content"),
                               reasoning=msg.get("reasoning_content"), tool_calls=calls, is_prefix=is_prefix,
                               task=task, generated=replay(msg) if replay is not None and calls else None))
        else:
            turn = _Turn(role=role, text=_parts_to_text(msg.get("content"), f"{where}.content"), task=task)
            if role in ("system", "developer"):  # the reference also reads tools from these messages
                turn.tools = _validate_tools(msg.get("tools"), f"{where}.tools") or None
                turn.response_format = msg.get("response_format")
            turns.append(turn)
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
    turns[0].tools = (turns[0].tools or []) + tools or None
    if wants_format:
        turns[0].response_format = response_format


def _last_user_index(turns: list[_Turn]) -> int:
    return max((i for i, t in enumerate(turns) if t.role in ("user", "developer")), default=-1)


def _drop_old_turns(turns: list[_Turn]) -> list[_Turn]:
    """Reference drop rule: developer turns before the last user/developer turn go away."""
    last_user = _last_user_index(turns)
    return [t for i, t in enumerate(turns) if not (t.role == "developer" and i < last_user)]


# ----------------------------------------------------------------------------- rendering
# Pieces: `Control` strings are the encoder's tokens, every other string is plain text.

_TEMPLATE_CONTROLS = (DSML, THINK_START, THINK_END)


def _markup(template: str) -> list[str]:
    """Encoder-owned template text as pieces, its control-token spellings as `Control`s.
    Never call this on client text."""
    pieces, rest = [], template
    while rest:
        hits = [(rest.find(c), c) for c in _TEMPLATE_CONTROLS if c in rest]
        if not hits:
            pieces.append(rest)
            break
        pos, control = min(hits)
        if pos:
            pieces.append(rest[:pos])
        pieces.append(control)
        rest = rest[pos + len(control):]
    return pieces


def render_tools_block(functions: list[dict]) -> list[str]:
    """The `## Tools` section for OpenAI `function` objects (one JSON object per line)."""
    before, after = _TOOLS_TEMPLATE.split("{schemas}")
    fill = dict(dsml=DSML, think_start=THINK_START, think_end=THINK_END)
    schemas = "\n".join(_to_json(f) for f in functions)
    return _markup(before.format(**fill)) + [schemas] + _markup(after.format(**fill))


def _arguments_as_mapping(arguments: str | dict | None) -> dict:
    if isinstance(arguments, dict):
        return arguments
    if arguments is None:  # the reference: json.loads fails, the raw value becomes `arguments`
        return {"arguments": None}
    try:
        decoded = json.loads(arguments)
    except ValueError:
        decoded = None
    return decoded if isinstance(decoded, dict) else {"arguments": arguments}


def _render_tool_calls(calls: list[_ToolCall]) -> list[str]:
    """DSML block for an assistant turn's calls, starting with the "\\n\\n" separator."""
    out = ["\n\n<", DSML, "tool_calls>\n"]
    for n, call in enumerate(calls):
        if n:
            out.append("\n")
        out += ["<", DSML, 'invoke name="', call.name, '">\n']
        for k, (key, value) in enumerate(_arguments_as_mapping(call.arguments).items()):
            is_str = isinstance(value, str)
            out += ["\n" if k else "", "<", DSML, 'parameter name="', key,
                    f'" string="{"true" if is_str else "false"}">', value if is_str else _to_json(value),
                    "</", DSML, "parameter>"]
        out += ["\n</", DSML, "invoke>"]
    out += ["\n</", DSML, "tool_calls>"]
    return out


def _render_instructions(turn: _Turn) -> list[str]:
    """System/developer text plus the request's tools block and response format."""
    out = [turn.text]
    if turn.tools:
        out += ["\n\n"] + render_tools_block(turn.tools)
    if turn.response_format:
        out += ["\n\n" + _RESPONSE_FORMAT_TEMPLATE.format(schema=""), _to_json(turn.response_format)]
    return out


def _render_user(turn: _Turn) -> list[str]:
    out: list[str] = [USER]
    for n, block in enumerate(turn.blocks):
        if n:
            out.append("\n\n")
        out += ["<tool_result>", block.text, "</tool_result>"] if block.is_tool_result else [block.text]
    return out


def _render_assistant(turn: _Turn, *, thinking: bool, keeps_reasoning: bool) -> list[str]:
    out: list[str] = []
    if thinking and keeps_reasoning:
        continues_reasoning = turn.is_prefix and not turn.text and not turn.tool_calls
        out += [turn.reasoning or ""] + ([] if continues_reasoning else [THINK_END])
    if turn.generated is not None:
        out += turn.generated
    else:
        out.append(turn.text)
        if turn.tool_calls:
            out += _render_tool_calls(turn.tool_calls)
    if not turn.is_prefix:
        out.append(EOS)
    return out


def _render_tail(turn: _Turn, *, thinking: bool, opens_reasoning: bool) -> list[str]:
    """What follows a turn that an assistant turn (or the generation) comes after."""
    if turn.task == "action":
        return [ASSISTANT, THINK_START if thinking else THINK_END, TASK_TOKENS["action"]]
    if turn.task is not None:
        return [TASK_TOKENS[turn.task]]
    if turn.role in ("user", "developer"):
        return [ASSISTANT, THINK_START if opens_reasoning else THINK_END]
    return []


def render_messages(
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
    replay=None,
) -> list[str]:
    """Render `messages` (OpenAI chat format) into prompt pieces starting with BOS.

    `"".join(pieces)` is the prompt text; pieces that are `Control` instances are the
    encoder's control tokens, all other pieces are plain text (see `Tokenizer.encode_prompt`).
    `thinking` picks thinking vs chat mode; `drop_thinking` removes reasoning of turns before
    the last user message (forced off when `tools` are given); `prefix_continuation` (or
    `prefix: true` on the last message) renders the last assistant message without EOS so the
    model continues it. `replay(message)` may return the pieces the model generated for a
    passed-back assistant tool-call message (server/tool_call_replay.py: its control tokens as
    `Control`s); they are rendered in place of the message's content and re-serialised calls. Raises ChatTemplateError (a
    ValueError) naming the bad field.
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

    turns = _build_turns(checked, prefix_continuation, replay)
    _order_tool_results(turns)
    _attach_request_extras(turns, functions, response_format)

    keep_all_reasoning = not drop_thinking or any(t.tools for t in turns)
    if thinking and not keep_all_reasoning:
        turns = _drop_old_turns(turns)
    last_user = _last_user_index(turns)
    prompt: list[str] = [BOS, EFFORT_TABLES[effort_table][reasoning_effort] if thinking else ""]
    for i, turn in enumerate(turns):
        if turn.role in ("system", "developer"):
            prompt += ([USER] if turn.role == "developer" else []) + _render_instructions(turn)
        elif turn.role == "latest_reminder":
            prompt += [LATEST_REMINDER, turn.text]
        elif turn.role == "assistant":
            after_task = i > 0 and turns[i - 1].task is not None
            prompt += _render_assistant(
                turn, thinking=thinking and not after_task, keeps_reasoning=keep_all_reasoning or i > last_user)
        else:
            prompt += _render_user(turn)
        is_last = i == len(turns) - 1
        # The tail follows a turn only when an assistant (or reminder) comes next, or at the end.
        if (is_last and (add_generation_prompt or turn.task is not None)) or (
                not is_last and turns[i + 1].role in ("assistant", "latest_reminder")):
            prompt += _render_tail(turn, thinking=thinking,
                                   opens_reasoning=thinking and (keep_all_reasoning or i >= last_user))
    return [piece for piece in prompt if piece]


def encode_messages(messages: list[dict], **options) -> str:
    """The prompt text of `render_messages` (same arguments)."""
    return "".join(render_messages(messages, **options))


def ends_inside_reasoning(prompt: list[str] | str) -> bool:
    """True when generation continues inside `<think>` (for `OutputParser(starts_in_reasoning=)`).

    Pass the pieces of `render_messages`: only the encoder's own think tokens count, so client
    text spelling `<think>` cannot flip the parse."""
    if isinstance(prompt, str):
        return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)
    for piece in reversed(prompt):
        if isinstance(piece, Control) and piece in (THINK_START, THINK_END):
            return piece == THINK_START
    return False
