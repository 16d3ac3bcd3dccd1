"""`/chat/completions` end to end: the official openai SDK (sync, async, streaming) against a
live uvicorn server driving the real engine on the tiny checkpoint (random weights: the tests
check shapes, usage, accounting and mechanics, not text quality)."""

import asyncio
import json
from datetime import datetime, timezone

import httpx
import openai
import pytest
import xgrammar as xgr

from engine.async_engine import AsyncEngine
from engine.engine_config import EngineConfig
from server.app import BackgroundServer, create_app
from server.grammar import GrammarLibrary
from server.pricing import PriceTable
from server.serve_config import ServeConfig
from server.token_table import TokenTable

USER = [{"role": "user", "content": "Say hello."}]
LONG_TEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 24  # ~300 tokens
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_cache_hit_tokens",
              "prompt_cache_miss_tokens", "prompt_tokens_details", "completion_tokens_details", "cost",
              "cost_details"}


@pytest.fixture(scope="module")
def live(tiny_dir):
    engine = AsyncEngine(EngineConfig(model=tiny_dir, kv_cache_memory=32 << 20, prefix_cache_unit=64), max_queue=64)
    server = BackgroundServer(create_app(engine, ServeConfig(keep_alive_interval=0.5)))
    server.start()
    yield server, engine
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].base_url + "/v1", api_key="unused", max_retries=0)


def _usage(obj) -> dict:
    return obj.usage.model_dump()


def _check_usage(usage: dict):
    assert USAGE_KEYS <= set(usage)
    assert usage["prompt_tokens"] == usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_cache_hit_tokens"]
    assert 0 <= usage["completion_tokens_details"]["reasoning_tokens"] <= usage["completion_tokens"]


def test_thinking_reply_shape_and_usage(client):
    reply = client.chat.completions.create(model="deepseek-v4-flash", messages=USER, max_tokens=6)
    assert reply.object == "chat.completion" and reply.model == "deepseek-v4-flash"
    assert reply.system_fingerprint.startswith("fp_")
    (choice,) = reply.choices
    assert choice.index == 0 and choice.finish_reason in ("stop", "length")
    message = choice.message.model_dump()
    assert message["role"] == "assistant"
    assert isinstance(message["reasoning_content"], str) and isinstance(message["content"], str)
    usage = _usage(reply)
    _check_usage(usage)
    assert 1 <= usage["completion_tokens"] <= 6
    if choice.finish_reason == "length" and not message["content"]:  # still thinking when cut
        assert usage["completion_tokens_details"]["reasoning_tokens"] == usage["completion_tokens"]


def test_non_thinking_alias_and_cost_arithmetic(client):
    reply = client.chat.completions.create(model="deepseek-chat", messages=USER, max_tokens=5)
    message = reply.choices[0].message.model_dump()
    assert "reasoning_content" not in message or message["reasoning_content"] is None
    usage = _usage(reply)
    _check_usage(usage)
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
    # `usage.cost` is a number (what typed clients such as litellm read); the breakdown is beside it.
    cost, details = usage["cost"], usage["cost_details"]
    assert isinstance(cost, float) and cost > 0
    # Price at the time of the request; the boundary of a peak window could fall in between.
    expected = PriceTable.default().cost("deepseek-v4-flash", usage["prompt_cache_hit_tokens"],
                                         usage["prompt_cache_miss_tokens"], usage["completion_tokens"],
                                         datetime.now(timezone.utc))
    assert (cost, details) == (expected.total_usd, expected.details()) or details["peak"] != expected.is_peak
    assert cost == pytest.approx(details["cache_hit_input"] + details["cache_miss_input"] + details["output"])
    assert details["currency"] == "USD" and details["output"] > 0


def test_stream_matches_non_stream_when_greedy(client):
    kwargs = dict(model="deepseek-chat", messages=USER, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = chunks[-1]
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason
    assert finish.usage is not None  # DeepSeek: usage rides on the finish chunk, always
    assert all(c.usage is None for c in chunks[:-1])
    assert finish.usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1


def test_thinking_stream_first_chunk_and_reasoning_deltas(client):
    stream = client.chat.completions.create(model="deepseek-reasoner", messages=USER, max_tokens=6, stream=True)
    chunks = list(stream)
    first = chunks[0].choices[0].delta.model_dump()
    assert first["role"] == "assistant" and first["content"] is None and first["reasoning_content"] == ""
    reasoning = "".join(c.choices[0].delta.model_dump().get("reasoning_content") or "" for c in chunks)
    usage = chunks[-1].usage.model_dump()
    _check_usage(usage)
    if usage["completion_tokens_details"]["reasoning_tokens"] == usage["completion_tokens"]:
        assert reasoning  # every token was reasoning, so some reasoning text streamed


def test_async_client_stream_and_parallel_requests(live):
    async def run():
        client = openai.AsyncOpenAI(base_url=live[0].base_url + "/v1", api_key="unused", max_retries=0)
        async def one(i):
            stream = await client.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": f"count {i}"}], max_tokens=5,
                stream=True)
            return [chunk async for chunk in stream]
        results = await asyncio.gather(*(one(i) for i in range(3)))
        await client.close()
        return results

    for chunks in asyncio.run(run()):
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        _check_usage(chunks[-1].usage.model_dump())


def test_raw_sse_framing_and_include_usage(live):
    body = {"model": "deepseek-chat", "messages": USER, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", live[0].base_url + "/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines()]
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" in c for c in chunks)  # include_usage: the key is present (null) everywhere
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"] is not None
    assert chunks[-1]["choices"][0]["finish_reason"] is not None
    assert all(c["object"] == "chat.completion.chunk" and "system_fingerprint" in c for c in chunks)


def test_prefix_cache_hits_on_repeated_long_prompt(client):
    messages = [{"role": "user", "content": LONG_TEXT}]
    cold = client.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=2)
    warm = client.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=2)
    assert cold.usage.prompt_tokens == warm.usage.prompt_tokens > 256
    hits = warm.usage.model_dump()["prompt_cache_hit_tokens"]
    assert hits > 0 and warm.usage.prompt_tokens_details.cached_tokens == hits
    assert warm.usage.model_dump()["cost_details"]["cache_hit_input"] > 0
    # A different user_id does not see that cache (isolation) ...
    other = client.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=2,
                                           extra_body={"user_id": "someone-else"})
    assert other.usage.model_dump()["prompt_cache_hit_tokens"] == 0
    # ... and a follow-up turn hits the checkpoint taken at the end of the previous reply.
    follow = client.chat.completions.create(model="deepseek-chat", max_tokens=2, messages=messages + [
        {"role": "assistant", "content": warm.choices[0].message.content}, {"role": "user", "content": "More."}])
    assert follow.usage.model_dump()["prompt_cache_hit_tokens"] >= hits


def test_n_choices_and_seed(client):
    kwargs = dict(model="deepseek-chat", messages=USER, max_tokens=5, temperature=1.0, seed=7)
    reply = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert 3 <= reply.usage.completion_tokens <= 15
    # A seed reproduces a sampled reply (one request at a time, so the batch is the same too).
    once = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == once
    chunks = list(client.chat.completions.create(n=2, stream=True, **kwargs))
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]
    assert chunks[-1].usage is not None


def test_logprobs_shape(client):
    reply = client.chat.completions.create(model="deepseek-chat", messages=USER, max_tokens=4, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for item in content:
        assert item.logprob <= 0 and isinstance(item.token, str)
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert bytes(item.bytes).decode("utf-8", errors="replace") == item.token
    thinking = client.chat.completions.create(model="deepseek-reasoner", messages=USER, max_tokens=3,
                                              logprobs=True, top_logprobs=0)
    logprobs = thinking.choices[0].logprobs.model_dump()
    assert len(logprobs["content"]) + len(logprobs["reasoning_content"]) <= 3
    assert logprobs["reasoning_content"] and logprobs["reasoning_content"][0]["top_logprobs"] == []


def test_stop_string_cuts_output(client):
    kwargs = dict(model="deepseek-chat", messages=USER, max_tokens=12, temperature=0)
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = next((text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip()), None)
    assert stop is not None, text
    cut = client.chat.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == text[:text.index(stop)]


def test_max_completion_tokens_alias_and_length(client):
    reply = client.chat.completions.create(model="deepseek-chat", messages=USER, max_completion_tokens=3,
                                           extra_body={"thinking": {"type": "disabled"}})
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 3
    assert reply.usage.completion_tokens <= 3


def test_json_object_mode_constrains_content(client, live):
    tokenizer = live[1].tokenizer
    json_object = GrammarLibrary(TokenTable(tokenizer), tokenizer.control_ids).json_object()
    messages = [{"role": "user", "content": "Reply in json."}]
    for seed in range(3):
        reply = client.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=24, seed=seed,
                                               response_format={"type": "json_object"})
        choice = reply.choices[0]
        content = choice.message.content
        checker = xgr.GrammarMatcher(json_object.compiled)  # the content is a JSON-object prefix
        assert content.lstrip().startswith("{") and checker.accept_string(content), content
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(content), dict)


def test_tools_request_shape(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    reply = client.chat.completions.create(model="deepseek-chat", messages=USER, tools=tools, max_tokens=5)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    for call in choice.message.tool_calls or []:
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) is not None
    # a thinking-mode tool-call turn replayed with its reasoning is accepted (passback rule)
    history = USER + [{"role": "assistant", "content": "", "reasoning_content": "need weather",
                       "tool_calls": [{"id": "call_00_x", "type": "function",
                                       "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                      {"role": "tool", "tool_call_id": "call_00_x", "content": "sunny"}]
    reply = client.chat.completions.create(model="deepseek-reasoner", messages=history, tools=tools, max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_prefix_completion_under_beta(live):
    beta = openai.OpenAI(base_url=live[0].base_url + "/beta", api_key="unused", max_retries=0)
    messages = USER + [{"role": "assistant", "content": "```python\n", "prefix": True}]
    reply = beta.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")
    v1 = openai.OpenAI(base_url=live[0].base_url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        v1.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=4)
    assert err.value.param == "messages[1].prefix"


def test_unknown_fields_are_ignored_and_penalties_accepted(client):
    reply = client.chat.completions.create(
        model="deepseek-chat", messages=USER, max_tokens=2, frequency_penalty=1.0, presence_penalty=-1.0,
        user="end-user-1", parallel_tool_calls=True, store=False, metadata={"k": "v"},
        extra_body={"some_future_field": {"x": 1}, "reasoning_effort": "medium"})
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_root_and_v1_routes_agree(live):
    body = {"model": "deepseek-chat", "messages": USER, "max_tokens": 2}
    for prefix in ("", "/v1", "/beta", "/v1/beta"):
        resp = httpx.post(f"{live[0].base_url}{prefix}/chat/completions", json=body, timeout=60)
        assert resp.status_code == 200, (prefix, resp.text)
        assert resp.json()["object"] == "chat.completion"
