"""Generated text is never lost, end to end on the embedded demo model (which really writes DSML).

With `tool_choice: "none"` the tools are hidden from the prompt and from the parser, but the demo
model (trained to call tools for these prompts) still writes DSML tool-call markup — sometimes
malformed, always for a tool the request did not offer. Policy: that text reaches the client as
`content`, with the reason in `tool_call_error` and a `dsv4:tool_parse_errors` count; with
`--tool-parse-errors error` the request fails instead (500; in a stream an error event, then
`[DONE]`).
"""
import json

import httpx
import pytest
from openai import OpenAI

from demo.demo_data import eval_conversations
from engine.async_engine import AsyncEngine
from engine.engine_config import EngineConfig
from server.app import BackgroundServer, create_app
from server.serve_config import ServeConfig

DSML = "｜DSML｜"


def _serve(**config):
    server = BackgroundServer(create_app(AsyncEngine(EngineConfig(model=None)), ServeConfig(**config)))
    server.start()
    return server


@pytest.fixture(scope="module")
def server():
    server = _serve()
    yield server
    server.stop()


def _hidden_tool_requests():
    """Chat-mode tool-call prompts with the tools hidden (`tool_choice: none`), greedy."""
    convs = [c for c in eval_conversations(0, 16) if c.kind == "tool_call" and not c.thinking]
    assert convs
    return [{"model": "deepseek-v4-flash", "messages": c.prompt_messages(), "tools": c.tools, "tool_choice": "none",
             "temperature": 0, "max_tokens": 120, "thinking": {"type": "disabled"}} for c in convs]


def _tool_parse_errors(base: str) -> float:
    text = httpx.get(base + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dsv4:tool_parse_errors_total{") and 'kind="schema_violation"' not in line)


def test_unparseable_tool_markup_reaches_the_client_as_content(server):
    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    before = _tool_parse_errors(server.base_url)
    returned = 0
    for body in _hidden_tool_requests():
        extra = {k: body[k] for k in ("thinking",)}
        reply = client.chat.completions.create(
            model=body["model"], messages=body["messages"], tools=body["tools"], tool_choice="none",
            temperature=0, max_tokens=body["max_tokens"], extra_body=extra)
        message = reply.choices[0].message
        if DSML not in (message.content or ""):
            continue
        returned += 1
        error = message.model_dump()["tool_call_error"]
        assert error["kind"] in ("unknown_tool", "malformed_dsml") and error["message"]
        assert not message.tool_calls and reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens > 10  # the tokens the old parser dropped, all billed and shown
        # The same request streamed: the same text arrives as content, the reason on the finish chunk.
        content, final = "", None
        for chunk in client.chat.completions.create(
                model=body["model"], messages=body["messages"], tools=body["tools"], tool_choice="none",
                temperature=0, max_tokens=body["max_tokens"], extra_body=extra, stream=True):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            assert not delta.tool_calls
            if chunk.choices[0].finish_reason is not None:
                final = delta.model_dump()
        assert content == message.content
        assert final["tool_call_error"] == error
    assert returned >= 1, "the demo model wrote no DSML for any hidden-tool prompt"
    assert _tool_parse_errors(server.base_url) - before == 2 * returned


def test_error_mode_fails_the_request_with_a_clean_stream_end():
    strict = _serve(tool_parse_errors="error")
    try:
        for body in _hidden_tool_requests():
            reply = httpx.post(strict.base_url + "/v1/chat/completions", json=body, timeout=60)
            if reply.status_code == 200:
                assert DSML not in reply.json()["choices"][0]["message"]["content"]
                continue
            assert reply.status_code == 500
            assert reply.json()["error"]["code"] == "invalid_tool_call"
            with httpx.stream("POST", strict.base_url + "/v1/chat/completions", json={**body, "stream": True},
                              timeout=60) as stream:
                events = [line[len("data: "):] for line in stream.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "invalid_tool_call"
            return
        pytest.fail("no hidden-tool prompt produced DSML")
    finally:
        strict.stop()


def test_thinking_mode_samples_like_deepseek(server):
    """Thinking mode ignores the request's temperature and uses the checkpoint's defaults; the
    demo ships DeepSeek's (temperature 1), so two seeds give two different replies."""
    conv = next(c for c in eval_conversations(0, 16) if c.kind == "no_tool" and c.thinking)
    replies = set()
    for seed in (1, 2, 3):
        reply = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "deepseek-v4-flash", "messages": conv.prompt_messages(), "temperature": 0, "seed": seed,
            "max_tokens": 60, "thinking": {"type": "enabled"}}).json()
        message = reply["choices"][0]["message"]
        replies.add((message["reasoning_content"], message["content"]))
    assert len(replies) > 1
