"""Golden tests for the DeepSeek-V4 chat encoder (expected strings written by hand from the spec)."""

import json

import pytest

from server.chat_template import ChatTemplateError, encode_messages, ends_inside_reasoning

# Spelled out here rather than imported, so a wrong constant in the module fails these tests.
BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
USER = "<\uff5cUser\uff5c>"
ASSISTANT = "<\uff5cAssistant\uff5c>"
D = "\uff5cDSML\uff5c"

ABSOLUTE_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n"
    "\n"
)
BEYOND_MAX = (
    "Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively decompose the problem into its most fundamental components, trace every causal chain to its root, and resolve the underlying cause rather than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple angles and are certain that no assumption remains unchecked and no error remains undiscovered.\n"
    "\n"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_SCHEMA_LINE = (
    '{"name": "get_weather", "description": "Get the weather for a city", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}'
)
TOOLS_BLOCK = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{D}tool_calls>" block like the following:

<{D}tool_calls>
<{D}invoke name="$TOOL_NAME">
<{D}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{D}parameter>
...
</{D}invoke>
<{D}invoke name="$TOOL_NAME2">
...
</{D}invoke>
</{D}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{WEATHER_SCHEMA_LINE}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

TWO_TURNS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there! How can I help you?", "reasoning_content": "Greet back."},
    {"role": "user", "content": "What is the capital of France?"},
]


def _call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# ----------------------------------------------------------------------------- §5.3 modes

def test_two_turn_thinking_example_drops_old_reasoning():
    expected = (BOS + "You are a helpful assistant." + USER + "Hello" + ASSISTANT + "</think>"
                + "Hi there! How can I help you?" + EOS + USER + "What is the capital of France?"
                + ASSISTANT + "<think>")
    assert encode_messages(TWO_TURNS, thinking=True) == expected


def test_two_turn_chat_mode():
    expected = (BOS + "You are a helpful assistant." + USER + "Hello" + ASSISTANT + "</think>"
                + "Hi there! How can I help you?" + EOS + USER + "What is the capital of France?"
                + ASSISTANT + "</think>")
    assert encode_messages(TWO_TURNS, thinking=False) == expected


def test_thinking_without_drop_keeps_all_reasoning():
    expected = (BOS + "You are a helpful assistant." + USER + "Hello" + ASSISTANT + "<think>"
                + "Greet back.</think>Hi there! How can I help you?" + EOS + USER
                + "What is the capital of France?" + ASSISTANT + "<think>")
    assert encode_messages(TWO_TURNS, thinking=True, drop_thinking=False) == expected


def test_tool_results_count_as_user_turn_for_dropping_and_parts_are_joined():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
        {"role": "assistant", "content": "", "reasoning_content": "r1",
         "tool_calls": [_call("c1", "get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": "c1", "content": "rainy"},
    ]
    history = (BOS + USER + "part one\n\npart two" + ASSISTANT + "</think>"
               + f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
               + f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
               + f"</{D}invoke>\n</{D}tool_calls>" + EOS
               + USER + "<tool_result>rainy</tool_result>" + ASSISTANT)
    assert encode_messages(messages, thinking=False) == history + "</think>"
    # Without tools the merged tool-result turn is the last user turn, so r1 is dropped.
    assert encode_messages(messages, thinking=True) == history + "<think>"


def test_add_generation_prompt_false_and_latest_reminder():
    assert encode_messages([{"role": "user", "content": "hi"}], thinking=True,
                           add_generation_prompt=False) == BOS + USER + "hi"
    messages = [{"role": "user", "content": "hi"}, {"role": "latest_reminder", "content": "Today is Monday."}]
    assert encode_messages(messages, thinking=True) == (
        BOS + USER + "hi" + ASSISTANT + "<think>" + "<\uff5clatest_reminder\uff5c>Today is Monday.")


def test_consecutive_user_messages_merge_and_developer_renders_like_the_reference():
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    # The reference renders developer as a user-marked turn; it is dropped before the last user
    # turn when thinking drops old reasoning. (The chat endpoint maps developer to system.)
    assert encode_messages(messages, thinking=False) == BOS + USER + "Be brief." + USER + "a\n\nb" + ASSISTANT + "</think>"
    assert encode_messages(messages, thinking=True) == BOS + USER + "a\n\nb" + ASSISTANT + "<think>"


def test_assistant_tool_call_with_null_arguments_renders_like_the_reference():
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [_call("c", "get_weather", None)]},
                {"role": "tool", "content": "ok"}]  # tool_call_id may be omitted, as in the reference
    assert encode_messages(messages, thinking=False) == (
        BOS + USER + "x" + ASSISTANT + "</think>"
        + f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
        + f'<{D}parameter name="arguments" string="false">null</{D}parameter>\n'
        + f"</{D}invoke>\n</{D}tool_calls>" + EOS + USER + "<tool_result>ok</tool_result>" + ASSISTANT + "</think>")


def test_quick_instruction_tasks_follow_the_reference():
    action = [{"role": "user", "content": "Weather?", "task": "action"}, {"role": "assistant", "content": "Search"}]
    assert encode_messages(action, thinking=False) == (
        BOS + USER + "Weather?" + ASSISTANT + "</think><\uff5caction\uff5c>Search" + EOS)
    query = [{"role": "user", "content": "Weather?", "task": "query"}]
    assert encode_messages(query, thinking=False) == BOS + USER + "Weather?<\uff5cquery\uff5c>"


# ----------------------------------------------------------------------------- §5.4 effort

@pytest.mark.parametrize("table, effort, prefix", [
    ("preview", None, ""), ("preview", "low", ""), ("preview", "high", ""), ("preview", "max", ABSOLUTE_MAX),
    ("0731", None, ""), ("0731", "low", ""), ("0731", "high", ABSOLUTE_MAX), ("0731", "max", BEYOND_MAX),
])
def test_reasoning_effort_prefix_sits_after_bos(table, effort, prefix):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    got = encode_messages(messages, thinking=True, reasoning_effort=effort, effort_table=table)
    assert got == BOS + prefix + "S" + USER + "Q" + ASSISTANT + "<think>"


def test_reasoning_effort_is_ignored_in_chat_mode():
    got = encode_messages([{"role": "user", "content": "Q"}], thinking=False, reasoning_effort="max")
    assert got == BOS + USER + "Q" + ASSISTANT + "</think>"


@pytest.mark.parametrize("kwargs, param", [
    ({"reasoning_effort": "medium"}, "reasoning_effort"),
    ({"effort_table": "v9"}, "effort_table"),
    ({"response_format": "json"}, "response_format"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
])
def test_bad_options_name_the_parameter(kwargs, param):
    with pytest.raises(ChatTemplateError) as err:
        encode_messages([{"role": "user", "content": "Q"}], thinking=True, **kwargs)
    assert err.value.param == param
    assert param.split("[")[0] in str(err.value)


# ----------------------------------------------------------------------------- §5.5 tools

def test_tools_block_is_appended_to_the_system_prompt():
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather?"}]
    got = encode_messages(messages, thinking=True, tools=[WEATHER_TOOL])
    assert got == BOS + "You are helpful.\n\n" + TOOLS_BLOCK + USER + "Weather?" + ASSISTANT + "<think>"


def test_tools_without_system_message_insert_an_empty_one():
    got = encode_messages([{"role": "user", "content": "Weather?"}], thinking=False, tools=[WEATHER_TOOL])
    assert got == BOS + "\n\n" + TOOLS_BLOCK + USER + "Weather?" + ASSISTANT + "</think>"


def test_tools_force_drop_thinking_off():
    got = encode_messages(TWO_TURNS, thinking=True, tools=[WEATHER_TOOL])
    assert got == (BOS + "You are a helpful assistant.\n\n" + TOOLS_BLOCK + USER + "Hello" + ASSISTANT
                   + "<think>Greet back.</think>Hi there! How can I help you?" + EOS + USER
                   + "What is the capital of France?" + ASSISTANT + "<think>")


def test_response_format_block():
    got = encode_messages([{"role": "user", "content": "json please"}], thinking=False,
                          response_format={"type": "json_object"})
    assert got == (BOS + "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                   + '{"type": "json_object"}' + USER + "json please" + ASSISTANT + "</think>")
    plain = encode_messages([{"role": "user", "content": "x"}], thinking=False, response_format={"type": "text"})
    assert plain == BOS + USER + "x" + ASSISTANT + "</think>"


# ----------------------------------------------------------------------------- §5.6 tool history

def test_tool_calls_and_results_reordered_to_call_order():
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "reasoning_content": "Two lookups.",
         "tool_calls": [_call("call_a", "get_weather", '{"city": "Paris", "days": 3, "opts": {"units": ["C", "F"]}}'),
                        _call("call_b", "get_weather", '{"city": "Rome \\"old\\"\\nline"}')]},
        {"role": "tool", "tool_call_id": "call_b", "content": '{"temperature": 25}'},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temperature": 22, "condition": "sunny", "humidity": 45}'},
        {"role": "user", "content": "Thanks"},
    ]
    expected = (
        BOS + "\n\n" + TOOLS_BLOCK + USER + "Weather in Paris and Rome?" + ASSISTANT + "<think>"
        + "Two lookups.</think>"
        + f"\n\n<{D}tool_calls>\n"
        + f'<{D}invoke name="get_weather">\n'
        + f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
        + f'<{D}parameter name="days" string="false">3</{D}parameter>\n'
        + f'<{D}parameter name="opts" string="false">{{"units": ["C", "F"]}}</{D}parameter>\n'
        + f"</{D}invoke>\n"
        + f'<{D}invoke name="get_weather">\n'
        + f'<{D}parameter name="city" string="true">Rome "old"\nline</{D}parameter>\n'
        + f"</{D}invoke>\n"
        + f"</{D}tool_calls>" + EOS
        + USER + '<tool_result>{"temperature": 22, "condition": "sunny", "humidity": 45}</tool_result>'
        + "\n\n<tool_result>{\"temperature\": 25}</tool_result>\n\nThanks"
        + ASSISTANT + "<think>"
    )
    assert encode_messages(messages, thinking=True, tools=[WEATHER_TOOL]) == expected


def test_non_object_arguments_become_one_arguments_parameter():
    for raw in ("not json {", "[1, 2]"):
        messages = [{"role": "user", "content": "x"},
                    {"role": "assistant", "content": "", "tool_calls": [_call("c", "get_weather", raw)]}]
        got = encode_messages(messages, thinking=False)
        assert f'<{D}parameter name="arguments" string="true">{raw}</{D}parameter>' in got


def test_list_tool_content_renders_unsupported_parts():
    messages = [{"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "c",
                 "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}]
    assert encode_messages(messages, thinking=False) == (
        BOS + USER + "x\n\n<tool_result>a\n\n[Unsupported image_url]</tool_result>" + ASSISTANT + "</think>")


def test_tool_call_turn_without_reasoning_is_rejected_in_thinking_mode():
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [_call("c", "get_weather", "{}")]},
                {"role": "tool", "tool_call_id": "c", "content": "ok"}]
    with pytest.raises(ChatTemplateError) as err:
        encode_messages(messages, thinking=True, tools=[WEATHER_TOOL])
    assert err.value.param == "messages[1].reasoning_content"
    assert "must be passed back" in str(err.value) and "messages[1].reasoning_content" in str(err.value)
    # Chat mode does not need it; an empty string satisfies the rule in thinking mode.
    encode_messages(messages, thinking=False, tools=[WEATHER_TOOL])
    messages[1]["reasoning_content"] = ""
    assert f"{ASSISTANT}<think></think>\n\n<{D}tool_calls>" in encode_messages(
        messages, thinking=True, tools=[WEATHER_TOOL])


# ----------------------------------------------------------------------------- prefix continuation

def test_prefix_assistant_has_no_eos_and_no_generation_prompt():
    messages = [{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "```python\n", "prefix": True}]
    assert encode_messages(messages, thinking=False) == BOS + USER + "Write code" + ASSISTANT + "</think>```python\n"
    with_reasoning = dict(messages[1], reasoning_content="plan")
    got = encode_messages([messages[0], with_reasoning], thinking=True)
    assert got == BOS + USER + "Write code" + ASSISTANT + "<think>plan</think>```python\n"
    assert not ends_inside_reasoning(got)


def test_prefix_with_only_reasoning_continues_thinking():
    messages = [{"role": "user", "content": "Q"},
                {"role": "assistant", "content": "", "reasoning_content": "First, "}]
    got = encode_messages(messages, thinking=True, prefix_continuation=True)
    assert got == BOS + USER + "Q" + ASSISTANT + "<think>First, "
    assert ends_inside_reasoning(got)
    assert ends_inside_reasoning(encode_messages(messages[:1], thinking=True))
    assert not ends_inside_reasoning(encode_messages(messages[:1], thinking=False))


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r", "tool_call_id": 5}], "messages[1].tool_call_id"),
    ([{"role": "user", "content": "x", "task": "dance"}], "messages[0].task"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}], "messages[0].content[0].type"),
    ([{"role": "assistant", "content": "a", "prefix": True}, {"role": "user", "content": "x"}], "messages[0].prefix"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                                         "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}],
     "messages[1].tool_calls[0].function.name"),
])
def test_invalid_messages_raise_with_field_name(messages, param):
    with pytest.raises(ChatTemplateError) as err:
        encode_messages(messages, thinking=False)
    assert err.value.param == param
    assert isinstance(err.value, ValueError)


def test_prefix_continuation_requires_final_assistant():
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]"):
        encode_messages([{"role": "user", "content": "x"}], thinking=False, prefix_continuation=True)


def test_input_messages_are_not_mutated():
    messages = [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c", "content": "r"}]
    snapshot = json.dumps(messages)
    encode_messages(messages, thinking=True, tools=[WEATHER_TOOL])
    assert json.dumps(messages) == snapshot
