"""Prefix cache through the HTTP API: the system + tools unit sessions share, no end-of-output
unit for thinking chats whose reasoning the next prompt drops."""

import httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.engine_config import EngineConfig
from server.app import BackgroundServer, create_app
from server.chat_template import USER, encode_messages
from server.serve_config import ServeConfig

SYSTEM = {"role": "system", "content": "You are a careful agent. " + "Follow the house rules closely. " * 30}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def live(tiny_dir):
    engine = AsyncEngine(EngineConfig(model=tiny_dir, kv_cache_memory=32 << 20, prefix_cache_unit=2048), max_queue=16)
    server = BackgroundServer(create_app(engine, ServeConfig()))
    server.start()
    yield server.base_url, engine
    server.stop()


def chat(base, messages, **extra):
    body = {"model": "deepseek-v4-flash", "messages": messages, "max_tokens": 4, "temperature": 0, **extra}
    reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def tokens(base, text):
    return httpx.post(f"{base}/tokenize", json={"prompt": text}, timeout=30).json()["tokens"]


def test_a_new_session_hits_the_whole_system_and_tools_block(live):
    base, engine = live
    block = encode_messages([SYSTEM], thinking=True, tools=TOOLS, add_generation_prompt=False) + USER
    block_len = len(tokens(base, block))
    assert block_len < 2048  # far from the every-N-tokens unit: only the hint can serve it
    first = chat(base, [SYSTEM, {"role": "user", "content": "Weather in Paris?"}], tools=TOOLS)
    assert first["usage"]["prompt_cache_hit_tokens"] == 0
    # Another session, another question: it resumes exactly at the end of the shared block.
    second = chat(base, [SYSTEM, {"role": "user", "content": "Is it cold in Oslo today?"}], tools=TOOLS)
    assert second["usage"]["prompt_cache_hit_tokens"] == block_len


def test_a_session_without_the_tools_still_hits_the_system_text(live):
    base, engine = live
    system_only = encode_messages([SYSTEM], thinking=True, add_generation_prompt=False)
    text_len = len(tokens(base, system_only))
    chat(base, [SYSTEM, {"role": "user", "content": "Weather in Rome?"}], tools=TOOLS)
    plain = chat(base, [SYSTEM, {"role": "user", "content": "Just chatting, no tools needed."}])
    assert plain["usage"]["prompt_cache_hit_tokens"] == text_len


def test_thinking_chat_without_tools_keeps_no_end_of_output_unit(live):
    base, engine = live
    core = engine.core
    before = core.kv_manager.prefix_cache.stats()["num_checkpoints"]
    messages = [{"role": "user", "content": "Tell me about tide pools, briefly please."}]
    reply = chat(base, messages)
    # Only the end-of-prompt unit was added (the prompt is one unit interval short).
    assert core.kv_manager.prefix_cache.stats()["num_checkpoints"] == before + 1
    message = reply["choices"][0]["message"]
    follow_up = messages + [{"role": "assistant", "content": message["content"],
                             "reasoning_content": message["reasoning_content"]},
                            {"role": "user", "content": "And more?"}]
    again = chat(base, follow_up)
    # The next turn (earlier reasoning dropped) still resumes from the end-of-prompt unit.
    assert again["usage"]["prompt_cache_hit_tokens"] == reply["usage"]["prompt_tokens"] - 1
