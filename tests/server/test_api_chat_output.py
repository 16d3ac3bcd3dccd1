"""Chat output assembly without a server: engine outputs (real tokenizer ids and text, as the
engine would deliver them token by token) -> parser -> finish reasons, token accounting,
tool-call checks and the streaming chunk shapes. The random tiny model never writes DSML, so
tool calls are exercised here."""

import json

import pytest

from engine.outputs import RequestOutput
from engine.tokenizer import Tokenizer
from server.chat import ChatChoice, ChunkFormat, tool_call_problems
from server.chat_template import (
    EOS, INVOKE_CLOSE, INVOKE_OPEN, PARAMETER_CLOSE, PARAMETER_OPEN, THINK_END, TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN,
)
from server.token_table import TokenTable
from server.parsers import Delta, OutputParser

TOOLS = [{"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]


def _call(name: str, params: str) -> str:
    return f'{INVOKE_OPEN} name="{name}">\n{params}\n{INVOKE_CLOSE}'


def _param(name: str, value: str, is_string: bool) -> str:
    return f'{PARAMETER_OPEN} name="{name}" string="{"true" if is_string else "false"}">{value}{PARAMETER_CLOSE}'


def _block(*calls: str) -> str:
    return f"\n\n{TOOL_CALLS_OPEN}\n" + "\n".join(calls) + f"\n{TOOL_CALLS_CLOSE}"


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


def _outputs(tokenizer, text: str, finish_reason: str | None = "stop"):
    """One RequestOutput per token, as the engine streams them; the last one finished."""
    ids = tokenizer.encode(text)
    outs = []
    for i, token_id in enumerate(ids):
        last = i == len(ids) - 1
        outs.append(RequestOutput(request_id="r-0", new_token_ids=[token_id], new_text=tokenizer.decode([token_id]),
                                  finished=last, finish_reason=finish_reason if last else None,
                                  num_prompt_tokens=10, num_output_tokens=i + 1))
    return outs


def _choice(tokenizer, thinking: bool, tools=TOOLS) -> ChatChoice:
    return ChatChoice(index=0, parser=OutputParser(thinking, tools, starts_in_reasoning=thinking),
                      in_reasoning=thinking, think_end_id=tokenizer.token_to_id(THINK_END), eos_id=tokenizer.eos_id)


def _feed_all(choice, outs, table):
    deltas = []
    for out in outs:
        deltas += choice.feed(out, table, 0)
    return deltas


def test_thinking_reply_with_a_tool_call(tokenizer):
    table = TokenTable(tokenizer)
    text = ("I should look up the weather." + THINK_END + "Let me check."
            + _block(_call("get_weather", _param("city", "Oslo", True) + "\n" + _param("days", "3", False))) + EOS)
    choice = _choice(tokenizer, thinking=True)
    deltas = _feed_all(choice, _outputs(tokenizer, text), table)
    assert choice.parser.reasoning == "I should look up the weather."
    assert choice.parser.content == "Let me check."
    (call,) = choice.complete_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo", "days": 3}
    assert choice.finish_reason == "tool_calls"
    assert choice.num_reasoning_tokens == len(tokenizer.encode("I should look up the weather." + THINK_END))
    assert tool_call_problems(choice.parser, TOOLS) == []

    fmt = ChunkFormat("id-1", 123, "deepseek-v4-pro", "fp_x", thinking=True, include_usage=False)
    pieces = [fmt.delta(d) for d in deltas]
    reasoning = "".join(p["reasoning_content"] for p in pieces if p.get("reasoning_content"))
    assert reasoning == choice.parser.reasoning
    tool_pieces = [p["tool_calls"][0] for p in pieces if "tool_calls" in p]
    first, rest = tool_pieces[0], tool_pieces[1:]
    assert first["id"].startswith("call_00_") and first["type"] == "function"
    assert first["function"]["name"] == "get_weather"
    assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in rest)
    arguments = "".join(p["function"]["arguments"] for p in tool_pieces)
    assert json.loads(arguments) == {"city": "Oslo", "days": 3}
    chunk = fmt.chunk(0, pieces[0])
    assert "usage" not in chunk and chunk["object"] == "chat.completion.chunk"
    assert fmt.role_delta() == {"role": "assistant", "content": None, "reasoning_content": ""}


def test_schema_violations_and_malformed_markup_are_reported(tokenizer):
    table = TokenTable(tokenizer)
    wrong_type = _block(_call("get_weather", _param("days", "\"soon\"", False)))  # no city, days not int
    choice = _choice(tokenizer, thinking=False)
    _feed_all(choice, _outputs(tokenizer, "Checking." + wrong_type + EOS), table)
    assert choice.finish_reason == "tool_calls" and len(choice.complete_calls) == 1  # returned as generated
    assert tool_call_problems(choice.parser, TOOLS) == ["schema_violation"]

    broken = f"\n\n{TOOL_CALLS_OPEN}\n{INVOKE_OPEN} name=\"get_weather\">\n<oops>" + EOS
    choice = _choice(tokenizer, thinking=False)
    _feed_all(choice, _outputs(tokenizer, "Hmm." + broken), table)
    assert choice.complete_calls == [] and choice.finish_reason == "stop"
    assert tool_call_problems(choice.parser, TOOLS) == ["malformed_dsml"]


def test_finish_reasons_from_engine(tokenizer):
    table = TokenTable(tokenizer)
    cut = _choice(tokenizer, thinking=True)
    _feed_all(cut, _outputs(tokenizer, "still thinking about", finish_reason="length"), table)
    assert cut.finish_reason == "length" and cut.parser.content == ""
    assert cut.num_reasoning_tokens == len(tokenizer.encode("still thinking about"))
    aborted = _choice(tokenizer, thinking=False)
    _feed_all(aborted, _outputs(tokenizer, "partial", finish_reason=None), table)
    assert aborted.engine_finish == "abort" and aborted.finish_reason == "insufficient_system_resource"


def test_non_thinking_deltas_and_usage_key_policy():
    fmt = ChunkFormat("id-2", 1, "deepseek-chat", "fp_y", thinking=False, include_usage=True)
    assert fmt.role_delta() == {"role": "assistant", "content": ""}
    assert fmt.delta(Delta(content="hi")) == {"content": "hi"}
    assert fmt.chunk(0, {"content": "hi"})["usage"] is None  # include_usage: present, null
    assert fmt.chunk(0, {}, "stop", usage={"total_tokens": 3})["usage"] == {"total_tokens": 3}
