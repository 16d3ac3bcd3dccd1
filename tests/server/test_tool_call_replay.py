"""Exact tool-call replay: the map from reply tool-call ids to the generated text, the encoder
hook, and the cache hit it buys through the HTTP API (demo model, which emits real DSML calls)."""

import json

import httpx
import pytest

from demo.demo_data import TOOLS
from engine.async_engine import AsyncEngine
from engine.engine_config import EngineConfig
from server.app import BackgroundServer, create_app
from server.chat_template import DSML, encode_messages, render_messages
from server.serve_config import ServeConfig
from server.tool_call_replay import ToolCallReplay

GENERATED_TEXT = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="add_numbers">\n'
             '<｜DSML｜parameter name="a" string="false">1.50</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="b" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
# As the server keeps it: the model's DSML control tokens as `Control` pieces.
GENERATED = [piece for n, text in enumerate(GENERATED_TEXT.split(DSML)) for piece in ((DSML, text) if n else (text,))]
CALL = {"id": "call_1", "type": "function", "function": {"name": "add_numbers", "arguments": '{"a": 1.50, "b": 2}'}}


def assistant(call=CALL, content=""):
    return {"role": "assistant", "content": content, "reasoning_content": "Add them.", "tool_calls": [call]}


def reserialised(call, **dump):
    return {**call, "function": {**call["function"],
                                 "arguments": json.dumps(json.loads(call["function"]["arguments"]), **dump)}}


def test_a_call_passed_back_renders_the_generated_text():
    replay = ToolCallReplay()
    replay.remember([CALL], "", GENERATED)
    history = [{"role": "user", "content": "Add 1.50 and 2."}, assistant(reserialised(CALL, separators=(",", ":"))),
               {"role": "tool", "tool_call_id": "call_1", "content": "3.5"}]
    plain = encode_messages(history, thinking=True, tools=[TOOLS["add_numbers"]])
    pieces = render_messages(history, thinking=True, tools=[TOOLS["add_numbers"]], replay=replay.generated_pieces)
    assert "Add them.</think>" + GENERATED_TEXT + "<｜end▁of▁sentence｜>" in "".join(pieces)
    assert GENERATED == pieces[pieces.index("Add them.") + 2:][:len(GENERATED)]  # control pieces kept as such
    assert GENERATED_TEXT not in plain  # re-serialised, `1.50` became `1.5`: the text differs


@pytest.mark.parametrize("changed", [
    assistant({**CALL, "function": {**CALL["function"], "arguments": '{"a": 2, "b": 2}'}}),  # edited arguments
    assistant({**CALL, "function": {**CALL["function"], "name": "get_time"}}),
    assistant(content="I will add them."),
    assistant({**CALL, "id": "call_unknown"}),
    {"role": "assistant", "content": "", "tool_calls": [CALL, {**CALL, "id": "call_2"}]},  # another call list
])
def test_a_changed_turn_is_rendered_as_sent(changed):
    replay = ToolCallReplay()
    replay.remember([CALL], "", GENERATED)
    assert replay.generated_pieces(changed) is None
    assert replay.generated_pieces(assistant(reserialised(CALL, indent=2))) == GENERATED  # same JSON value


def test_memory_is_bounded_least_recently_used_first():
    replay = ToolCallReplay(max_entries=2, max_chars=3 * len(GENERATED_TEXT))
    for i in range(3):
        replay.remember([{**CALL, "id": f"call_{i}"}], "", GENERATED)
    assert len(replay) == 2 and replay.generated_pieces(assistant({**CALL, "id": "call_0"})) is None
    replay.generated_pieces(assistant({**CALL, "id": "call_1"}))  # used: call_2 is now the oldest
    replay.remember([{**CALL, "id": "call_3"}], "", GENERATED * 2)  # 4 texts' worth: over the bound of 3
    assert replay.generated_pieces(assistant({**CALL, "id": "call_2"})) is None
    assert replay.generated_pieces(assistant({**CALL, "id": "call_1"})) == GENERATED
    assert replay.generated_pieces(assistant({**CALL, "id": "call_3"})) == GENERATED * 2
    with pytest.raises(ValueError):
        ToolCallReplay(max_entries=0)


@pytest.fixture(scope="module")
def demo_server():
    engine = AsyncEngine(EngineConfig(kv_cache_memory=32 << 20), max_queue=8)  # the embedded demo model
    server = BackgroundServer(create_app(engine, ServeConfig()))
    server.start()
    yield server.base_url
    server.stop()


def test_a_tool_call_passed_back_reordered_hits_the_whole_previous_turn(demo_server):
    tools = [TOOLS["get_weather"], TOOLS["convert_currency"]]
    messages = [{"role": "user", "content": "Please get converting 120 USD to EUR."}]

    def chat(history, max_tokens):
        body = {"model": "deepseek-v4-flash", "messages": history, "tools": tools, "temperature": 0,
                "max_tokens": max_tokens}
        return httpx.post(demo_server + "/v1/chat/completions", json=body, timeout=120).json()

    first = chat(messages, 200)
    message = first["choices"][0]["message"]
    assert first["choices"][0]["finish_reason"] == "tool_calls"
    (call,) = message["tool_calls"]
    arguments = json.loads(call["function"]["arguments"])
    assert len(arguments) > 1
    # The client sends the arguments back with the keys in another order (same JSON object):
    # re-rendered, the DSML parameters would come out in that order.
    reordered = {**call, "function": {**call["function"], "arguments": json.dumps(dict(reversed(arguments.items())))}}
    history = messages + [{"role": "assistant", "content": message["content"],
                           "reasoning_content": message["reasoning_content"], "tool_calls": [reordered]},
                          {"role": "tool", "tool_call_id": call["id"], "content": '{"amount": 111.5}'}]
    assert encode_messages(history, thinking=True, tools=tools) != encode_messages(
        messages + [{**history[1], "tool_calls": [call]}] + history[2:], thinking=True, tools=tools)
    second = chat(history, 8)
    # Everything the first request computed (all sampled tokens but the last, EOS) is a hit.
    usage = first["usage"]
    assert second["usage"]["prompt_cache_hit_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] - 1
