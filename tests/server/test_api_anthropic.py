"""Anthropic Messages end to end: the official `anthropic` SDK (sync, streaming, a tool loop,
thinking blocks, errors) against a live server on the real engine with the embedded demo model
(held-out prompts from the demo generator's evaluation stream)."""
import json

import anthropic
import httpx
import pytest

from demo.demo_data import eval_conversations
from tests.server.conftest import DEMO_API_KEY

USAGE_KEYS = {"input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}


@pytest.fixture(scope="module")
def client(demo_server):
    return anthropic.Anthropic(base_url=demo_server.base_url + "/anthropic", api_key=DEMO_API_KEY, max_retries=0)


def _conversation(kind, thinking):
    return next(c for c in eval_conversations(0, 8) if c.kind == kind and c.thinking == thinking)


def _anthropic_prompt(conv) -> tuple[str | None, list[dict]]:
    system = [m["content"] for m in conv.prompt_messages() if m["role"] == "system"]
    turns = [{"role": m["role"], "content": m["content"]} for m in conv.prompt_messages() if m["role"] != "system"]
    return (system[0] if system else None), turns


def _tools(conv) -> list[dict]:
    return [{"name": t["function"]["name"], "description": t["function"]["description"],
             "input_schema": t["function"]["parameters"]} for t in conv.tools]


def _thinking(conv) -> dict:
    return {"type": "enabled", "budget_tokens": 1024} if conv.thinking else {"type": "disabled"}


def _kwargs(conv, **extra) -> dict:
    system, turns = _anthropic_prompt(conv)
    kwargs = {"model": "claude-sonnet-4-5", "max_tokens": 200, "messages": turns, "thinking": _thinking(conv),
              # Thinking mode samples at temperature 1 (seeded: reproducible); chat mode is greedy here.
              "extra_body": {"seed": 1} if conv.thinking else {"temperature": 0.0}}
    if system is not None:
        kwargs["system"] = system
    if conv.tools:
        kwargs["tools"] = _tools(conv)
    return kwargs | extra


def test_sync_reply_shape_and_usage(client):
    conv = _conversation("chat", thinking=False)
    message = client.messages.create(**_kwargs(conv))
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "claude-sonnet-4-5" and message.stop_reason == "end_turn"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text
    usage = message.usage.model_dump()
    assert USAGE_KEYS <= set(usage) and usage["output_tokens"] > 0
    counted = client.messages.count_tokens(model="claude-sonnet-4-5", messages=_kwargs(conv)["messages"],
                                           system=_kwargs(conv).get("system"), thinking={"type": "disabled"})
    assert counted.input_tokens == usage["input_tokens"] + usage["cache_read_input_tokens"]

    again = client.messages.create(**_kwargs(conv))  # the same prompt again: served from the prefix cache
    assert again.usage.cache_read_input_tokens > 0
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == counted.input_tokens


def test_thinking_blocks_come_first_and_replay(client):
    conv = _conversation("chat", thinking=True)
    message = client.messages.create(**_kwargs(conv))
    kinds = [b.type for b in message.content]
    assert kinds == ["thinking", "text"], kinds
    thinking = message.content[0]
    assert thinking.thinking and thinking.signature
    # A multi-turn history carrying the thinking block back is accepted.
    history = _kwargs(conv)["messages"] + [{"role": "assistant", "content": [b.model_dump() for b in message.content]},
                                           {"role": "user", "content": "Thanks. And hello again."}]
    follow = client.messages.create(**_kwargs(conv, messages=history))
    assert follow.stop_reason in ("end_turn", "max_tokens") and follow.content


@pytest.mark.parametrize("thinking", [True, False])
def test_stream_event_sequence(client, thinking):
    conv = _conversation("tool_call", thinking)
    events = []
    with client.messages.stream(**_kwargs(conv)) as stream:
        for event in stream:
            if event.type in ("message_start", "content_block_start", "content_block_delta", "content_block_stop",
                              "message_delta", "message_stop"):
                events.append(event)
        final = stream.get_final_message()
    names = [e.type for e in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    # Blocks open, receive deltas, and close in order, one at a time.
    open_index, expected_index, kinds = None, 0, []
    for event in events[1:-2]:
        if event.type == "content_block_start":
            assert open_index is None and event.index == expected_index
            open_index = event.index
            kinds.append(event.content_block.type)
        elif event.type == "content_block_delta":
            assert event.index == open_index
            delta_kind = {"thinking": ("thinking_delta", "signature_delta"), "text": ("text_delta",),
                          "tool_use": ("input_json_delta",)}[kinds[-1]]
            assert event.delta.type in delta_kind
        elif event.type == "content_block_stop":
            assert event.index == open_index
            open_index, expected_index = None, expected_index + 1
    assert open_index is None
    assert kinds == [b.type for b in final.content]
    assert ("thinking" in kinds) == thinking and kinds[0] == ("thinking" if thinking else kinds[0])
    assert final.stop_reason == "tool_use" and any(b.type == "tool_use" for b in final.content)
    assert events[-2].usage.output_tokens > 0 and events[0].message.usage.input_tokens > 0
    offered = {t["name"] for t in _tools(conv)}
    assert all(b.name in offered and isinstance(b.input, dict) for b in final.content if b.type == "tool_use")


@pytest.mark.parametrize("thinking", [True, False])
def test_tool_loop(client, thinking):
    conv = _conversation("tool_call", thinking)
    first = client.messages.create(**_kwargs(conv))
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert uses and all(u.id and isinstance(u.input, dict) for u in uses)
    history = _kwargs(conv)["messages"] + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id,
                                      "content": json.dumps({"status": "ok"})} for u in uses]}]
    second = client.messages.create(**_kwargs(conv, messages=history))
    assert second.stop_reason == "end_turn"
    assert [b.type for b in second.content][-1] == "text" and second.content[-1].text


def test_forced_tool_choice_and_stop_sequences(client):
    conv = _conversation("tool_call", thinking=False)
    name = conv.tools[0]["function"]["name"]
    forced = client.messages.create(**_kwargs(conv, tool_choice={"type": "tool", "name": name}))
    assert forced.stop_reason == "tool_use"
    assert {b.name for b in forced.content if b.type == "tool_use"} == {name}

    chat = _conversation("chat", thinking=False)
    text = client.messages.create(**_kwargs(chat, extra_body={"temperature": 0.0})).content[0].text
    word = text.split()[1]
    stopped = client.messages.create(**_kwargs(chat, extra_body={"temperature": 0.0}, stop_sequences=[word, "zzzz"]))
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert word not in stopped.content[0].text
    short = client.messages.create(**_kwargs(chat, max_tokens=2))
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2


def _raw_events(base_url: str, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of each SSE event on the wire."""
    events, name = [], None
    with httpx.stream("POST", base_url + "/v1/messages", json=body, timeout=120,
                      headers={"x-api-key": DEMO_API_KEY, "anthropic-version": "2023-06-01"}) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
    return events


def test_wire_events_are_named_and_end_with_message_stop(demo_server):
    conv = _conversation("chat", thinking=True)
    body = _kwargs(conv, stream=True)
    body |= body.pop("extra_body")  # the SDK merges it into the JSON body
    events = _raw_events(demo_server.base_url, body)
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-2:] == ["message_delta", "message_stop"]  # no [DONE]: Anthropic streams just end
    assert events[2][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    message_delta = events[-2][1]
    assert message_delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert USAGE_KEYS <= set(message_delta["usage"])


def test_errors_in_anthropic_shape(client, demo_server):
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "system", "content": "x"}])
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}])
    wrong = anthropic.Anthropic(base_url=demo_server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        wrong.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["error"]["type"] == "authentication_error"
    # The same route without the /anthropic prefix, keyed by x-api-key over plain HTTP.
    reply = httpx.post(demo_server.base_url + "/v1/messages", headers={"x-api-key": DEMO_API_KEY},
                       json={"model": "deepseek-v4-flash", "max_tokens": 3,
                             "messages": [{"role": "user", "content": "hi"}]},
                       timeout=120)
    assert reply.status_code == 200 and reply.json()["type"] == "message"
    missing = httpx.post(demo_server.base_url + "/v1/messages", headers={"x-api-key": DEMO_API_KEY},
                         json={"model": "deepseek-v4-flash", "messages": []}, timeout=30)
    assert missing.status_code == 422 and missing.json()["error"]["type"] == "invalid_request_error"


def _api_samples(base_url: str) -> dict:
    """{(metric, api): value} of the per-API series on /metrics."""
    samples = {}
    for line in httpx.get(base_url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(("dsv4:api_requests_total{", "dsv4:api_cost_usd_total{")):
            name, _, value = line.rpartition(" ")
            api = name.split('api="')[1].split('"')[0]
            samples[(name.split("{")[0], api)] = float(value)
    return samples


def test_metrics_count_requests_and_cost_by_api(client, demo_server):
    before = _api_samples(demo_server.base_url)
    assert {api for _, api in before} == {"chat_completions", "completions", "anthropic_messages", "responses"}
    client.messages.create(model="claude-sonnet-4-5", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    httpx.post(demo_server.base_url + "/v1/responses", headers={"authorization": f"Bearer {DEMO_API_KEY}"},
               json={"model": "deepseek-v4-flash", "input": "hi", "max_output_tokens": 3}, timeout=120)
    after = _api_samples(demo_server.base_url)
    for api in ("anthropic_messages", "responses"):
        assert after[("dsv4:api_requests_total", api)] == before[("dsv4:api_requests_total", api)] + 1
        assert after[("dsv4:api_cost_usd_total", api)] > before[("dsv4:api_cost_usd_total", api)]
    assert after[("dsv4:api_requests_total", "completions")] == before[("dsv4:api_requests_total", "completions")]
