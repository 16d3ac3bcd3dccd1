"""OpenAI Responses end to end: the official openai SDK (`responses.create`, `responses.stream`,
a function-call loop with reasoning items passed back, errors) against a live server on the real
engine with the embedded demo model (held-out prompts from the demo generator)."""
import json

import httpx
import openai
import pytest

from demo.demo_data import eval_conversations
from tests.server.conftest import DEMO_API_KEY


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.base_url + "/v1", api_key=DEMO_API_KEY, max_retries=0)


def _conversation(kind, thinking):
    return next(c for c in eval_conversations(0, 8) if c.kind == kind and c.thinking == thinking)


def _tools(conv) -> list[dict]:
    return [{"type": "function", **t["function"]} for t in conv.tools]


def _kwargs(conv, **extra) -> dict:
    messages = conv.prompt_messages()
    system = [m["content"] for m in messages if m["role"] == "system"]
    kwargs = {"model": "deepseek-v4-flash", "max_output_tokens": 200,
              "input": [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"],
              "reasoning": {"effort": "high" if conv.thinking else "none"},
              # Thinking mode samples at temperature 1 (seeded: reproducible); chat mode is greedy here.
              "extra_body": {"seed": 1} if conv.thinking else {"temperature": 0.0}}
    if system:
        kwargs["instructions"] = system[0]
    if conv.tools:
        kwargs["tools"] = _tools(conv)
    return kwargs | extra


@pytest.mark.parametrize("thinking", [True, False])
def test_create_reply_items_and_usage(client, thinking):
    conv = _conversation("chat", thinking)
    response = client.responses.create(**_kwargs(conv))
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    kinds = [item.type for item in response.output]
    assert kinds == (["reasoning", "message"] if thinking else ["message"])
    assert response.output_text and response.output[-1].content[0].type == "output_text"
    if thinking:
        assert response.output[0].content[0].text
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert (usage.output_tokens_details.reasoning_tokens > 0) == thinking
    again = client.responses.create(**_kwargs(conv))  # same prompt: prefix-cache hits reported
    assert again.usage.input_tokens_details.cached_tokens > 0
    assert response.store is False


@pytest.mark.parametrize("thinking", [True, False])
def test_stream_lifecycle_and_function_call_loop(client, thinking):
    conv = _conversation("tool_call", thinking)
    events = []
    with client.responses.stream(**_kwargs(conv)) as stream:
        for event in stream:
            events.append(event)
        final = stream.get_final_response()
    names = [e.type for e in events]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "response.function_call_arguments.delta" in names and "response.function_call_arguments.done" in names
    assert ("response.reasoning_text.delta" in names) == thinking
    # Each item: added, its parts and deltas, done — one item at a time, in output order.
    added = [e for e in events if e.type == "response.output_item.added"]
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [e.output_index for e in added] == [e.output_index for e in done] == list(range(len(final.output)))
    assert [e.item.id for e in done] == [item.id for item in final.output]
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and all(item.status == "completed" for item in calls)
    offered = {t["name"] for t in _tools(conv)}
    assert all(call.name in offered and isinstance(json.loads(call.arguments), dict) for call in calls)

    # Stateless loop: pass the output items back with the function outputs.
    follow_input = _kwargs(conv)["input"] + [item.model_dump(exclude_none=True) for item in final.output] + [
        {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"status": "ok"})}
        for call in calls]
    answer = client.responses.create(**_kwargs(conv, input=follow_input))
    assert answer.status == "completed" and answer.output[-1].type == "message" and answer.output_text


def test_incomplete_when_cut_and_stateless_errors(client, demo_server):
    conv = _conversation("chat", thinking=False)
    cut = client.responses.create(**_kwargs(conv, max_output_tokens=2))
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(openai.BadRequestError, match="stateless"):
        client.responses.create(**_kwargs(conv, previous_response_id=cut.id))
    with pytest.raises(openai.BadRequestError, match="function tools only"):
        client.responses.create(**_kwargs(conv, tools=[{"type": "web_search"}]))
    # Raw wire: named events, no [DONE].
    body = _kwargs(conv, stream=True, max_output_tokens=2)
    body |= body.pop("extra_body")  # the SDK merges it into the JSON body
    names = []
    with httpx.stream("POST", demo_server.base_url + "/v1/responses", json=body, timeout=120,
                      headers={"authorization": f"Bearer {DEMO_API_KEY}"}) as reply:
        for line in reply.iter_lines():
            if line.startswith("event: "):
                names.append(line[len("event: "):])
            assert "[DONE]" not in line
    assert names[0] == "response.created" and names[-1] == "response.incomplete"
