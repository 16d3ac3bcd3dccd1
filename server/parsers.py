"""Incremental parser for DeepSeek-V4 output text: reasoning, content and DSML tool calls.

Input is decoded text with special tokens kept, fed in arbitrary pieces; output is a list of
`Delta`s per piece. Markers may be split anywhere: the parser holds back only a suffix that
could still be the start of a marker and releases it as soon as it cannot. Tool-call
arguments stream while they are generated, as the OpenAI JSON string `{"K": V, ...}`
(`", "` / `": "` separators): `string="true"` values are JSON-escaped piece by piece,
`string="false"` values pass through raw. The first delta of a call carries `id`, `name` and
the opening `{`.

Grammar (spec §5.6): [reasoning `</think>`] content [`\\n\\n<｜DSML｜tool_calls>` invocations
`</｜DSML｜tool_calls>`] [EOS]. Whitespace between DSML tags is accepted in any amount (the
reference wants exactly one newline); nothing after EOS is read.

Policies:
- Missing `</think>` in thinking mode: everything is reasoning and content stays empty (what
  a length-capped thinking reply looks like); `reasoning_unterminated` reports it.
- A complete `<｜DSML｜tool_calls>` opener inside reasoning (no `</think>` yet) ends the
  reasoning and starts tool calls (vLLM's V4 reasoning parser does the same); other DSML
  text inside reasoning stays reasoning.
- Think markers never reach content: a stray `</think>` (or `<think>` inside reasoning) is
  dropped; a second `<think>...</think>` block after the answer began is reasoning again in
  thinking mode, and in chat mode its markers are dropped and its text stays content.
- Generated text is never dropped. Malformed DSML (unexpected tag or text, bad attributes,
  duplicate parameter, EOS inside a call, a block cut off by the end of text) and calls to a
  tool that was not offered stop tool-call parsing: `error` records why (`kind`
  "malformed_dsml" or "unknown_tool"), and the unparsed markup — from the block opener, or
  from the end of the last call that closed — is emitted verbatim as content, followed by
  the rest of the output. Calls closed before the error are valid; a call cut by the error
  stays open (`ParsedToolCall.is_complete` False, its arguments not valid JSON), so
  non-streaming responses drop it (its markup is in the content). With
  `markup_as_content=False` the rest is dropped instead (the server's error mode).
- `json_content=True` (JSON mode): content is read up to EOS only, as JSON text.
- `finish_reason` is "tool_calls" once any call was started, else "stop"; the caller
  replaces it with "length" when generation hit its token limit.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Callable

from server.chat_template import (
    DSML, EOS, INVOKE_CLOSE, INVOKE_OPEN, PARAMETER_CLOSE, PARAMETER_OPEN, THINK_END, THINK_START,
    TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN,
)
from server.json_schema import validate

_DSML_START = f"<{DSML}"
# Content: any DSML tag starts the block (anything but `tool_calls>` is then malformed); a
# closing tag or a bare DSML token there is malformed markup; think markers are filtered.
_CONTENT_MARKERS = (EOS, "\n\n" + _DSML_START, _DSML_START, "</" + DSML, DSML, THINK_START, THINK_END)
# Reasoning: only a complete block opener ends it early; other DSML text stays reasoning.
_REASONING_MARKERS = (THINK_END, EOS, "\n\n" + TOOL_CALLS_OPEN, TOOL_CALLS_OPEN, THINK_START)
_RAW_MARKERS = (EOS,)  # also the content markers of JSON mode
_VALUE_MARKERS = (PARAMETER_CLOSE, EOS)
_MAX_TAG_CHARS = 1024
_INVOKE_ATTRS = re.compile(r'\s*name="([^"]+)"\s*')
_PARAMETER_ATTRS = re.compile(r'\s*name="([^"]+)"\s+string="(true|false)"\s*')
_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of tool call `index`; `id` and `name` are set on its first piece only."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Delta:
    """Exactly one of: reasoning text, content text, or a tool-call piece."""

    reasoning: str | None = None
    content: str | None = None
    tool_call: ToolCallDelta | None = None

    def __post_init__(self):
        if sum(x is not None for x in (self.reasoning, self.content, self.tool_call)) != 1:
            raise ValueError("Delta needs exactly one of reasoning, content, tool_call")


@dataclass
class ParsedToolCall:
    """Accumulated state of one call, for non-streaming responses."""

    index: int
    id: str
    name: str
    is_complete: bool = False
    # Pieces joined on demand: repeated `str +=` on an attribute is quadratic.
    argument_pieces: list[str] = field(default_factory=list, repr=False)

    @property
    def arguments(self) -> str:
        return "".join(self.argument_pieces)


class _State(Enum):
    REASONING = auto()
    CONTENT = auto()
    BLOCK_OPEN = auto()       # after `<｜DSML｜`: expect `tool_calls>`
    BETWEEN_CALLS = auto()    # expect `<｜DSML｜invoke` or `</｜DSML｜tool_calls>`
    INVOKE_TAG = auto()       # ` name="X">`
    BETWEEN_PARAMS = auto()   # expect `<｜DSML｜parameter` or `</｜DSML｜invoke>`
    PARAMETER_TAG = auto()    # ` name="K" string="true|false">`
    PARAMETER_VALUE = auto()  # raw value until `</｜DSML｜parameter>`
    AFTER_BLOCK = auto()      # only whitespace and EOS may follow
    RAW = auto()              # after a parse error: the rest is content, verbatim, up to EOS
    DONE = auto()
    FAILED = auto()


_BLOCK_STATES = (_State.BLOCK_OPEN, _State.BETWEEN_CALLS, _State.INVOKE_TAG, _State.BETWEEN_PARAMS,
                 _State.PARAMETER_TAG, _State.PARAMETER_VALUE)


@dataclass(frozen=True)
class ParseError:
    """Why tool-call parsing stopped: `kind` is "malformed_dsml" or "unknown_tool"."""

    kind: str
    message: str


class _Malformed(Exception):
    def __init__(self, message: str, kind: str = "malformed_dsml"):
        super().__init__(message)
        self.kind = kind


def split_at_marker(buf: str, markers: tuple[str, ...], final: bool) -> tuple[str, str | None, str]:
    """Split `buf` at the earliest complete marker: (text before, marker, text after).

    Without a complete marker returns (safe text, None, held suffix), where the held suffix is
    the longest tail that is a proper prefix of some marker (nothing is held when `final`).
    A partial marker that starts before a complete one wins: it may still turn out longer.
    """
    pos, found = -1, None
    for marker in markers:
        p = buf.find(marker)
        if p != -1 and (found is None or p < pos or (p == pos and len(marker) > len(found))):
            pos, found = p, marker
    hold_from = len(buf)
    if not final:
        longest = max(map(len, markers))
        for start in range(max(0, len(buf) - longest + 1), len(buf)):
            tail = buf[start:]
            if any(len(tail) < len(m) and m.startswith(tail) for m in markers):
                hold_from = start
                break
    if found is not None and pos < hold_from:
        return buf[:pos], found, buf[pos + len(found):]
    return buf[:hold_from], None, buf[hold_from:]


def _escape_json_fragment(text: str) -> str:
    # JSON escaping is per character, so escaping pieces equals escaping the whole string.
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _random_call_id(index: int) -> str:
    return f"call_{index:02d}_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def _tool_names(tools: list[dict] | None) -> set[str]:
    names = set()
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{i}].function.name is required")
        names.add(function["name"])
    return names


class OutputParser:
    """Feed decoded output text in pieces; get reasoning / content / tool-call deltas back."""

    def __init__(self, thinking: bool, tools: list[dict] | None, *,
                 starts_in_reasoning: bool | None = None,
                 make_call_id: Callable[[int], str] = _random_call_id,
                 markup_as_content: bool = True, json_content: bool = False):
        self._tool_names = _tool_names(tools)
        self._make_call_id = make_call_id
        self._thinking = thinking
        self._markup_as_content = markup_as_content
        # JSON mode: the constraint keeps content inside one JSON value, so any `</think>` or
        # DSML spelling there is string text, never markup.
        self._content_markers = _RAW_MARKERS if json_content else _CONTENT_MARKERS
        self._fed: list[str] = []  # everything fed, to return unparsed markup verbatim
        self._fed_chars = 0
        self._recover_from = 0  # where the markup not yet accounted for by closed calls starts
        self.error: ParseError | None = None
        in_reasoning = thinking if starts_in_reasoning is None else starts_in_reasoning
        self._state = _State.REASONING if in_reasoning else _State.CONTENT
        self._buf = ""
        self._out: list[Delta] = []
        self._call: ParsedToolCall | None = None
        self._param_names: set[str] = set()
        self._value_is_string = False
        self._text_pieces: dict[str, list[str]] = {"reasoning": [], "content": []}
        self.tool_calls: list[ParsedToolCall] = []
        self.parse_errors: list[str] = []
        self.reasoning_unterminated = False
        self._steps = {
            _State.REASONING: self._step_reasoning,
            _State.CONTENT: self._step_content,
            _State.BLOCK_OPEN: self._step_block_open,
            _State.BETWEEN_CALLS: self._step_between_calls,
            _State.INVOKE_TAG: self._step_invoke_tag,
            _State.BETWEEN_PARAMS: self._step_between_params,
            _State.PARAMETER_TAG: self._step_parameter_tag,
            _State.PARAMETER_VALUE: self._step_parameter_value,
            _State.AFTER_BLOCK: self._step_after_block,
            _State.RAW: self._step_raw,
        }

    # ------------------------------------------------------------------ public API

    def feed(self, text_delta: str) -> list[Delta]:
        if not isinstance(text_delta, str):
            raise ValueError("text_delta must be a string")
        if self._state in (_State.DONE, _State.FAILED):
            return []
        self._fed.append(text_delta)
        self._fed_chars += len(text_delta)
        self._buf += text_delta
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        """Flush held-back text at the end of generation and close the parse."""
        self._run(final=True)
        if self._state == _State.REASONING:
            self.reasoning_unterminated = True
        elif self._state in _BLOCK_STATES:
            self._fail(_Malformed("output ended inside a tool-call block"))
            self._run(final=True)
        self._state = _State.DONE
        return self._take()

    @property
    def reasoning(self) -> str:
        return "".join(self._text_pieces["reasoning"])

    @property
    def content(self) -> str:
        return "".join(self._text_pieces["content"])

    @property
    def had_tool_calls(self) -> bool:
        return bool(self.tool_calls)

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.had_tool_calls else "stop"

    # ------------------------------------------------------------------ driver

    def _run(self, final: bool) -> None:
        steps = self._steps
        while self._state in steps:
            try:
                progressed = steps[self._state](final)
            except _Malformed as err:
                self._fail(err)
                continue  # RAW goes on with the unparsed text; FAILED leaves the loop
            if not progressed:
                break
        if self._state in (_State.DONE, _State.FAILED):
            self._buf = ""
            self._fed = []

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    def _position(self) -> int:
        """Offset (in all text fed) of the first character not yet consumed."""
        return self._fed_chars - len(self._buf)

    def _fail(self, err: _Malformed) -> None:
        self.parse_errors.append(str(err))
        self.error = ParseError(err.kind, str(err))
        if self._markup_as_content:
            self._buf = "".join(self._fed)[self._recover_from:]
            self._state = _State.RAW
        else:
            self._buf = ""
            self._state = _State.FAILED

    # ------------------------------------------------------------------ emitting

    def _emit_text(self, kind: str, text: str) -> None:
        if not text:
            return
        self._text_pieces[kind].append(text)
        last = self._out[-1] if self._out else None
        if last is not None and getattr(last, kind) is not None:
            self._out[-1] = Delta(**{kind: getattr(last, kind) + text})
        else:
            self._out.append(Delta(**{kind: text}))

    def _emit_arguments(self, fragment: str, *, first: bool = False) -> None:
        call = self._call
        call.argument_pieces.append(fragment)
        last = self._out[-1].tool_call if self._out else None
        if not first and last is not None and last.index == call.index:
            self._out[-1] = Delta(tool_call=ToolCallDelta(
                index=call.index, arguments=last.arguments + fragment, id=last.id, name=last.name))
        else:
            self._out.append(Delta(tool_call=ToolCallDelta(
                index=call.index, arguments=fragment,
                id=call.id if first else None, name=call.name if first else None)))

    # ------------------------------------------------------------------ states

    def _step_text(self, kind: str, markers: tuple[str, ...], final: bool) -> str | None:
        """Emit text up to the next marker and return that marker (None: wait for input)."""
        before, marker, self._buf = split_at_marker(self._buf, markers, final)
        self._emit_text(kind, before)
        if marker == EOS:
            self._state = _State.DONE
        return marker

    def _open_block(self) -> None:
        if not self._tool_names:
            raise _Malformed("model emitted tool calls but the request offered no tools", "unknown_tool")
        self._state = _State.BETWEEN_CALLS

    def _mark_markup_start(self, marker: str) -> None:
        self._recover_from = self._position() - len(marker)

    def _step_reasoning(self, final: bool) -> bool:
        marker = self._step_text("reasoning", _REASONING_MARKERS, final)
        if marker == THINK_END:
            self._state = _State.CONTENT
        elif marker == EOS:
            self.reasoning_unterminated = True
        elif marker is not None and marker != THINK_START:  # a nested <think> is dropped
            self._mark_markup_start(marker)
            self._open_block()
        return marker is not None

    def _step_content(self, final: bool) -> bool:
        marker = self._step_text("content", self._content_markers, final)
        if marker == THINK_START and self._thinking:
            self._state = _State.REASONING  # a second reasoning block is reasoning, not content
        elif marker in (THINK_START, THINK_END, EOS, None):
            pass  # stray think markers are dropped
        else:
            self._mark_markup_start(marker)
            if marker in (DSML, "</" + DSML):
                raise _Malformed(f"stray {marker} in content")
            self._state = _State.BLOCK_OPEN
        return marker is not None

    def _step_raw(self, final: bool) -> bool:
        return self._step_text("content", _RAW_MARKERS, final) is not None

    def _expect(self, options: tuple[str, ...], skip_space: bool) -> str | None:
        """Consume one of `options` from the buffer; None means more input is needed."""
        buf = self._buf.lstrip() if skip_space else self._buf
        for option in options:
            if buf.startswith(option):
                self._buf = buf[len(option):]
                return option
        if any(option.startswith(buf) for option in options):
            self._buf = buf
            return None
        raise _Malformed(f"expected one of {list(options)}, got {buf[:40]!r}")

    def _step_block_open(self, final: bool) -> bool:
        if self._expect(("tool_calls>",), skip_space=False) is None:
            return False
        self._open_block()
        return True

    def _step_between_calls(self, final: bool) -> bool:
        got = self._expect((INVOKE_OPEN, TOOL_CALLS_CLOSE), skip_space=True)
        if got is None:
            return False
        if got == TOOL_CALLS_CLOSE:
            self._recover_from = self._position()
        self._state = _State.INVOKE_TAG if got == INVOKE_OPEN else _State.AFTER_BLOCK
        return True

    def _read_tag(self) -> str | None:
        """The attribute text up to the tag's closing `>`, or None when not complete yet."""
        end = self._buf.find(">")
        if end == -1:
            if len(self._buf) > _MAX_TAG_CHARS:
                raise _Malformed("DSML tag is too long")
            return None
        attrs, self._buf = self._buf[:end], self._buf[end + 1:]
        return attrs

    def _step_invoke_tag(self, final: bool) -> bool:
        attrs = self._read_tag()
        if attrs is None:
            return False
        match = _INVOKE_ATTRS.fullmatch(attrs)
        if match is None:
            raise _Malformed(f"bad invoke tag attributes {attrs!r}")
        name = match.group(1)
        if name not in self._tool_names:
            raise _Malformed(f"call to unknown tool {name!r}", "unknown_tool")
        index = len(self.tool_calls)
        self._call = ParsedToolCall(index=index, id=self._make_call_id(index), name=name)
        self.tool_calls.append(self._call)
        self._param_names = set()
        self._emit_arguments("{", first=True)
        self._state = _State.BETWEEN_PARAMS
        return True

    def _step_between_params(self, final: bool) -> bool:
        got = self._expect((PARAMETER_OPEN, INVOKE_CLOSE), skip_space=True)
        if got is None:
            return False
        if got == PARAMETER_OPEN:
            self._state = _State.PARAMETER_TAG
            return True
        self._emit_arguments("}")
        call = self._call
        try:
            json.loads(call.arguments)
        except ValueError:
            raise _Malformed(f"tool call {call.index} arguments are not valid JSON") from None
        call.is_complete = True
        self._recover_from = self._position()
        self._state = _State.BETWEEN_CALLS
        return True

    def _step_parameter_tag(self, final: bool) -> bool:
        attrs = self._read_tag()
        if attrs is None:
            return False
        match = _PARAMETER_ATTRS.fullmatch(attrs)
        if match is None:
            raise _Malformed(f"bad parameter tag attributes {attrs!r}")
        name, is_string = match.group(1), match.group(2) == "true"
        if name in self._param_names:
            raise _Malformed(f"duplicate parameter {name!r} in tool call {self._call.index}")
        separator = ", " if self._param_names else ""
        self._param_names.add(name)
        self._value_is_string = is_string
        self._emit_arguments(separator + json.dumps(name, ensure_ascii=False) + ": "
                             + ('"' if is_string else ""))
        self._state = _State.PARAMETER_VALUE
        return True

    def _step_parameter_value(self, final: bool) -> bool:
        before, marker, after = split_at_marker(self._buf, _VALUE_MARKERS, final)
        if before:
            self._emit_arguments(_escape_json_fragment(before) if self._value_is_string else before)
        self._buf = after
        if marker is None:
            return False
        if marker == EOS:
            raise _Malformed("end of sentence inside a tool-call parameter")
        if self._value_is_string:
            self._emit_arguments('"')
        self._state = _State.BETWEEN_PARAMS
        return True

    def _step_after_block(self, final: bool) -> bool:
        if self._expect((EOS,), skip_space=True) is None:
            return False
        self._state = _State.DONE
        return True


def validate_tool_arguments(tool_schema: dict, args_dict: object) -> list[str]:
    """Check decoded arguments against a tool's JSON schema; returns error strings (empty = ok).

    `tool_schema` is an OpenAI tool (`{"type": "function", "function": {...}}`) or its
    `function` object; a function without `parameters` accepts any object.
    """
    if not isinstance(tool_schema, dict):
        raise ValueError("tool_schema must be an object")
    function = tool_schema.get("function", tool_schema)
    if not isinstance(function, dict):
        raise ValueError("tool_schema.function must be an object")
    parameters = function.get("parameters", {"type": "object"})
    if not isinstance(args_dict, dict):
        return [f"$: expected object, got {type(args_dict).__name__}"]
    return validate(parameters, args_dict)
