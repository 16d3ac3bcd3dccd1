"""End to end through the HTTP server with the official openai SDK on the embedded demo model
(engine/assets/demo: a tiny V4 trained to speak V4's format). Held-out prompts come from the
same generator as the training data, with the evaluation seed."""
import json

import pytest
from openai import OpenAI

from engine.async_engine import AsyncEngine
from engine.default_model import DEMO_DIR, default_model_dir
from demo.demo_data import eval_conversations
from engine.engine_config import EngineConfig
from server.app import BackgroundServer, create_app
from server.json_schema import validate
from server.serve_config import ServeConfig


@pytest.fixture(scope="module")
def client():
    assert default_model_dir() == DEMO_DIR, "the demo checkpoint is the embedded default"
    engine = AsyncEngine(EngineConfig(model=None))
    server = BackgroundServer(create_app(engine, ServeConfig()))
    base = server.start()
    yield OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    server.stop()


def _conversations(kind, thinking=None, n=8):
    convs = [c for c in eval_conversations(0, n) if c.kind == kind]
    if thinking is not None:
        convs = [c for c in convs if c.thinking == thinking]
    assert convs, f"no held-out {kind} conversation"
    return convs


def _thinking(conv):
    return {"thinking": {"type": "enabled" if conv.thinking else "disabled"}}


def _schema(conv, name):
    return next(t["function"]["parameters"] for t in conv.tools if t["function"]["name"] == name)


def test_tool_call_streams_piecewise_then_tool_result_gives_an_answer(client):
    # Chat mode, greedy: thinking mode samples at the checkpoint's temperature 1 (DeepSeek's rule).
    conv = _conversations("tool_call", thinking=False)[0]
    stream = client.chat.completions.create(model="deepseek-v4-flash", messages=conv.prompt_messages(),
                                            tools=conv.tools, stream=True, max_tokens=200, temperature=0,
                                            extra_body=_thinking(conv))
    calls, pieces, finish, reasoning = {}, 0, None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is not None:
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": tc.id, "name": None, "arguments": ""})
                if tc.function.name:
                    entry["name"] = tc.function.name
                if tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
                    pieces += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls" and calls
    assert pieces > len(calls), "arguments must stream in several pieces"
    for call in calls.values():
        args = json.loads(call["arguments"])
        assert validate(_schema(conv, call["name"]), args) == []

    # Send the tool result back: the model answers in plain content.
    history = conv.prompt_messages() + [{
        "role": "assistant", "content": "", "reasoning_content": reasoning if conv.thinking else None,
        "tool_calls": [{"id": c["id"], "type": "function", "function": {"name": c["name"],
                                                                         "arguments": c["arguments"]}}
                       for c in calls.values()]}]
    for c in calls.values():
        history.append({"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"status": "ok"})})
    reply = client.chat.completions.create(model="deepseek-v4-flash", messages=history, tools=conv.tools,
                                           max_tokens=200, temperature=0, extra_body=_thinking(conv))
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content and not choice.message.tool_calls


def test_thinking_lands_in_reasoning_content(client):
    conv = _conversations("no_tool", thinking=True)[0]
    reply = client.chat.completions.create(model="deepseek-reasoner", messages=conv.prompt_messages(),
                                           max_tokens=200, seed=0)  # sampled (temperature 1), reproducibly
    msg = reply.choices[0].message
    assert msg.reasoning_content and msg.content
    assert "</think>" not in msg.content and "<think>" not in msg.reasoning_content
    assert reply.usage.completion_tokens_details.reasoning_tokens > 0


def test_non_thinking_mode_has_no_reasoning(client):
    conv = _conversations("chat", thinking=False)[0]
    reply = client.chat.completions.create(model="deepseek-chat", messages=conv.prompt_messages(),
                                           max_tokens=100, temperature=0)
    msg = reply.choices[0].message
    assert msg.content and not getattr(msg, "reasoning_content", None)
    assert reply.choices[0].finish_reason == "stop"


def test_json_mode_parses(client):
    for conv in _conversations("json")[:2]:
        reply = client.chat.completions.create(model="deepseek-v4-flash", messages=conv.prompt_messages(),
                                               response_format={"type": "json_object"}, max_tokens=200,
                                               temperature=0, seed=0, extra_body=_thinking(conv))
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
