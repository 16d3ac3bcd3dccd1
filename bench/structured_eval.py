"""Schema validity of constrained outputs on the demo model, over held-out prompts.

Starts the HTTP server on the embedded demo model and sends, with the official openai SDK:
- `chat.completions.parse(response_format=<Pydantic model>)` for N held-out JSON prompts
  (thinking on and off as the generator drew them);
- N held-out tool prompts with a forced `tool_choice` (alternately `required` and the expected
  function by name; chat mode, as DeepSeek forbids forced choices in thinking mode), and the
  same prompts with `tool_choice: auto` and no constraint, for comparison.
A reply counts as valid when it parses into the model / every call's arguments match the
function's schema; replies cut by max_tokens are counted apart.

    python -m bench.structured_eval [--n 100] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch
from pydantic import ValidationError, create_model

from demo.demo_data import eval_conversations
from engine.async_engine import AsyncEngine
from engine.engine_config import EngineConfig
from server.app import BackgroundServer, create_app
from server.json_schema import validate
from server.serve_config import ServeConfig

SEED = 7  # held-out stream seed (the demo tests use 0-2)


def _pydantic_model(conv):
    schema = conv.response_format.get("json_schema", {}).get("schema") if conv.response_format else None
    reply = json.loads(conv.messages[-1]["content"])
    fields = {k: (int if isinstance(v, int) else str, ...) for k, v in reply.items()}
    if schema:
        fields = {k: (int if p.get("type") == "integer" else str, ...) for k, p in schema["properties"].items()}
    return create_model("Reply", **fields)


def _parse_one(client, conv) -> str:
    model = _pydantic_model(conv)
    try:
        reply = client.chat.completions.parse(
            model="deepseek-v4-flash", messages=conv.prompt_messages(), response_format=model, max_tokens=300,
            extra_body={"thinking": {"type": "enabled" if conv.thinking else "disabled"}})
    except openai.LengthFinishReasonError:
        return "length"
    except ValidationError as err:  # content that does not parse into the model
        print("invalid:", err.errors()[0].get("input"))
        return "invalid"
    return "valid" if isinstance(reply.choices[0].message.parsed, model) else "invalid"


def _tool_one(client, conv, choice) -> str:
    reply = client.chat.completions.create(
        model="deepseek-v4-flash", messages=conv.prompt_messages(), tools=conv.tools, tool_choice=choice,
        max_tokens=300, extra_body={"thinking": {"type": "disabled"}})
    result = reply.choices[0]
    if result.finish_reason == "length":
        return "length"
    calls = result.message.tool_calls or []
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in conv.tools}
    wanted = choice["function"]["name"] if isinstance(choice, dict) else None
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            return "invalid"
        if call.function.name not in schemas or (wanted and call.function.name != wanted):
            return "invalid"
        if validate(schemas[call.function.name], arguments):
            return "invalid"
    return "valid" if calls else "no call"


def _tally(outcomes: list[str]) -> str:
    counts = {k: outcomes.count(k) for k in ("valid", "invalid", "no call", "length") if outcomes.count(k)}
    return f"{counts.get('valid', 0)}/{len(outcomes)} valid " + json.dumps(counts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="prompts per check (default 100)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    convs = eval_conversations(SEED, args.n)
    json_convs = [c for c in convs if c.kind == "json"][:args.n]
    tool_convs = [c for c in convs if c.kind == "tool_call"][:args.n]
    server = BackgroundServer(create_app(AsyncEngine(EngineConfig(model=None)), ServeConfig()))
    client = openai.OpenAI(base_url=server.start() + "/v1", api_key="unused", max_retries=0, timeout=600)
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            parsed = list(pool.map(lambda c: _parse_one(client, c), json_convs))
            forced_choices = [("required" if i % 2 == 0 else
                               {"type": "function", "function": {"name": c.expect.tool_calls[0][0]}})
                              for i, c in enumerate(tool_convs)]
            forced = list(pool.map(lambda a: _tool_one(client, *a), zip(tool_convs, forced_choices)))
            free = list(pool.map(lambda c: _tool_one(client, c, "auto"), tool_convs))
        elapsed = time.perf_counter() - start
    finally:
        server.stop()
    thinking = sum(c.thinking for c in json_convs)
    print(f"chat.completions.parse, {len(json_convs)} held-out JSON prompts ({thinking} in thinking mode): "
          f"{_tally(parsed)}")
    print(f"forced tool_choice (required / named), {len(tool_convs)} held-out tool prompts: {_tally(forced)}")
    print(f"unconstrained tool_choice auto, same prompts (for comparison): {_tally(free)}")
    print(f"wall time {elapsed:.0f} s")


if __name__ == "__main__":
    main()
