"""Tests for the incremental V4 output parser and the tool-argument validator."""

import json
import random

import pytest

from server.parsers import Delta, OutputParser, split_at_marker, validate_tool_arguments

EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
D = "\uff5cDSML\uff5c"

TOOLS = [
    {"type": "function", "function": {"name": "bash", "parameters": {
        "type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
        "required": ["command"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
]


def param(name, value, is_string=True):
    return f'<{D}parameter name="{name}" string="{"true" if is_string else "false"}">{value}</{D}parameter>\n'


def invoke(name, *params):
    return f'<{D}invoke name="{name}">\n' + "".join(params) + f"</{D}invoke>\n"


def block(*invokes):
    return f"\n\n<{D}tool_calls>\n" + "".join(invokes) + f"</{D}tool_calls>" + EOS


def ids(index):
    return f"call_{index:02d}_test"


def run(text, *, thinking=True, tools=TOOLS, pieces=None):
    """Feed `text` split into `pieces` (default: one shot); return (parser, per-feed deltas)."""
    parser = OutputParser(thinking, tools, make_call_id=ids)
    chunks = pieces if pieces is not None else [text]
    assert "".join(chunks) == text
    per_feed = [parser.feed(chunk) for chunk in chunks] + [parser.finish()]
    return parser, per_feed


def collect(per_feed):
    """Concatenate deltas into reasoning, content and {index: (id, name, arguments)}."""
    reasoning, content, calls = "", "", {}
    for deltas in per_feed:
        for d in deltas:
            assert isinstance(d, Delta)
            if d.reasoning is not None:
                reasoning += d.reasoning
            elif d.content is not None:
                content += d.content
            else:
                tc = d.tool_call
                if tc.index not in calls:
                    assert tc.id is not None and tc.name is not None, "first piece must carry id and name"
                    calls[tc.index] = [tc.id, tc.name, ""]
                else:
                    assert tc.id is None and tc.name is None
                calls[tc.index][2] += tc.arguments
    return reasoning, content, {i: tuple(v) for i, v in calls.items()}


def char_pieces(text):
    return list(text)


def random_pieces(text, seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, len(text) // 3 + 1))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


COMMAND = 'ls -la 2>&1 | tail -5 && echo "done" \\ path\\to\n\tnext line \u00e9\u4e2d\U0001f600 a<b </x>'
TOOL_TEXT = ("I should list files.</think>Let me check." + block(
    invoke("bash", param("command", COMMAND), param("timeout", "30", is_string=False)),
    invoke("get_weather", param("city", "Paris"), param("opts", '{"units": ["C", "F"], "n": null}', is_string=False),
           param("days", "[1, 2.5, true]", is_string=False)),
))


def test_one_shot_reasoning_content_and_parallel_calls():
    parser, per_feed = run(TOOL_TEXT)
    reasoning, content, calls = collect(per_feed)
    assert reasoning == "I should list files."
    assert content == "Let me check."
    assert calls[0][:2] == ("call_00_test", "bash")
    assert calls[1][:2] == ("call_01_test", "get_weather")
    assert json.loads(calls[0][2]) == {"command": COMMAND, "timeout": 30}
    assert json.loads(calls[1][2]) == {"city": "Paris", "opts": {"units": ["C", "F"], "n": None}, "days": [1, 2.5, True]}
    # The string is exactly what json.dumps produces with the default separators.
    assert calls[0][2] == json.dumps({"command": COMMAND, "timeout": 30}, ensure_ascii=False)
    assert parser.finish_reason == "tool_calls" and parser.had_tool_calls
    assert parser.parse_errors == [] and all(c.is_complete for c in parser.tool_calls)
    assert [c.arguments for c in parser.tool_calls] == [calls[0][2], calls[1][2]]
    assert parser.content == content and parser.reasoning == reasoning


@pytest.mark.parametrize("splitter", ["chars"] + [f"seed{s}" for s in range(8)])
def test_piecewise_feeding_equals_one_shot(splitter):
    pieces = char_pieces(TOOL_TEXT) if splitter == "chars" else random_pieces(TOOL_TEXT, int(splitter[4:]))
    _, expected = run(TOOL_TEXT)
    parser, per_feed = run(TOOL_TEXT, pieces=pieces)
    assert collect(per_feed) == collect(expected)
    assert parser.parse_errors == []
    for deltas in per_feed:
        for d in deltas:
            assert D not in (d.content or "") and "</think>" not in (d.content or "")
            assert EOS not in (d.content or "") and EOS not in (d.reasoning or "")


def test_long_string_argument_streams_before_the_call_closes():
    long_value = "x" * 300 + '"\n\\' + "y" * 300
    text = "</think>" + block(invoke("bash", param("command", long_value)))
    pieces = random_pieces(text, 3)
    parser, per_feed = run(text, pieces=pieces)
    close_at = next(i for i, p in enumerate(pieces) if "".join(pieces[: i + 1]).count(f"</{D}invoke>") == 1)
    first_tool_feed = next(i for i, ds in enumerate(per_feed) if any(d.tool_call for d in ds))
    value_pieces = [i for i, ds in enumerate(per_feed) if any(d.tool_call and "x" in d.tool_call.arguments for d in ds)]
    assert first_tool_feed < close_at
    assert len(value_pieces) > 3 and value_pieces[0] < close_at  # the value streams in several pieces
    assert json.loads(collect(per_feed)[2][0][2]) == {"command": long_value}


def test_holds_back_only_possible_marker_prefixes():
    parser = OutputParser(True, TOOLS)
    assert parser.feed("abc</th") == [Delta(reasoning="abc")]
    assert parser.feed("ought") == [Delta(reasoning="</thought")]
    assert parser.feed("</think>Hi\n") == [Delta(content="Hi")]
    assert parser.feed("\n") == []
    assert parser.feed("x <") == [Delta(content="\n\nx ")]
    assert parser.feed("b") == [Delta(content="<b")]
    assert parser.feed("<\uff5cend") == []
    assert parser.finish() == [Delta(content="<\uff5cend")]
    assert parser.reasoning_unterminated is False


def test_markers_split_one_character_at_a_time_in_non_thinking_mode():
    text = "Answer: 42" + block(invoke("get_weather", param("city", "Oslo")))
    parser, per_feed = run(text, thinking=False, pieces=char_pieces(text))
    reasoning, content, calls = collect(per_feed)
    assert reasoning == "" and content == "Answer: 42"
    assert json.loads(calls[0][2]) == {"city": "Oslo"}
    assert parser.finish_reason == "tool_calls"


def test_plain_answer_stops_at_eos():
    parser, per_feed = run("Thinking...</think>The answer." + EOS + "garbage")
    assert collect(per_feed) == ("Thinking...", "The answer.", {})
    assert parser.finish_reason == "stop" and parser.parse_errors == []


def test_missing_think_end_makes_everything_reasoning():
    parser, per_feed = run("still thinking about </thi", pieces=["still thinking ", "about </thi"])
    assert collect(per_feed) == ("still thinking about </thi", "", {})
    assert parser.reasoning_unterminated and parser.finish_reason == "stop"


def test_tool_calls_opened_inside_reasoning_end_it():
    text = "I will call bash" + block(invoke("bash", param("command", "pwd")))
    parser, per_feed = run(text, pieces=char_pieces(text))
    reasoning, content, calls = collect(per_feed)
    assert reasoning == "I will call bash" and content == ""
    assert json.loads(calls[0][2]) == {"command": "pwd"}


def test_zero_parameter_call_and_whitespace_between_tags():
    text = f'</think>\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n\n</{D}invoke>\n</{D}tool_calls>'
    parser, per_feed = run(text)
    assert collect(per_feed)[2] == {0: ("call_00_test", "get_weather", "{}")}
    assert parser.parse_errors == [] and parser.tool_calls[0].is_complete


@pytest.mark.parametrize("bad_call, error", [
    (f'<{D}invoke name="bash">\n' + param("command", "a") + param("command", "b") + f"</{D}invoke>\n", "duplicate"),
    (f'<{D}invoke name="bash">\n<{D}parameter name="command">a</{D}parameter>\n</{D}invoke>\n', "parameter tag"),
    (f'<{D}invoke name="bash">\n' + param("command", "a") + f"<{D}oops>\n", "expected"),
    (f'<{D}invoke nam="bash">\n</{D}invoke>\n', "invoke tag"),
    (f'<{D}invoke name="rm_rf">\n</{D}invoke>\n', "unknown tool"),
])
@pytest.mark.parametrize("by_chars", [False, True])
def test_malformed_call_stops_parsing_keeps_earlier_calls_and_returns_the_markup_as_content(
        bad_call, error, by_chars):
    text = "</think>ok" + block(invoke("get_weather", param("city", "Rome")), bad_call, invoke("bash", param("command", "ls")))
    parser, per_feed = run(text, pieces=char_pieces(text) if by_chars else None)
    reasoning, content, calls = collect(per_feed)
    # Nothing generated is lost: the markup after the last closed call comes back verbatim.
    after_first_call = text[text.index(f"</{D}invoke>") + len(f"</{D}invoke>"):-len(EOS)]
    assert content == "ok" + after_first_call
    assert json.loads(calls[0][2]) == {"city": "Rome"}
    assert 2 not in calls  # nothing after the error is parsed as a call
    assert len(parser.parse_errors) == 1 and error in parser.parse_errors[0]
    assert parser.error.kind == ("unknown_tool" if error == "unknown tool" else "malformed_dsml")
    assert parser.tool_calls[0].is_complete
    assert all(not c.is_complete for c in parser.tool_calls[1:])


def test_error_mode_drops_the_rest_instead():
    text = "</think>ok" + block(invoke("rm_rf"))
    parser = OutputParser(True, TOOLS, make_call_id=ids, markup_as_content=False)
    _, content, calls = collect([parser.feed(text), parser.finish()])
    assert content == "ok" and calls == {} and parser.error.kind == "unknown_tool"


def test_tool_calls_without_offered_tools_come_back_as_content():
    calls_text = block(invoke("bash", param("command", "ls")))
    parser, per_feed = run("Sure." + calls_text, thinking=False, tools=None)
    assert collect(per_feed) == ("", "Sure." + calls_text[:-len(EOS)], {})
    assert parser.error.kind == "unknown_tool" and parser.finish_reason == "stop"


def test_stray_dsml_in_content_is_returned_verbatim():
    for text in (f"Hello </{D}invoke> world", f"Hello {D}invoke world"):
        parser, per_feed = run(text, thinking=False, pieces=char_pieces(text))
        assert collect(per_feed) == ("", text, {})
        assert len(parser.parse_errors) == 1 and "stray" in parser.parse_errors[0]
        assert parser.error.kind == "malformed_dsml"


def test_block_cut_by_the_end_of_output_comes_back_as_content():
    text = "</think>Let me look." + f'\n\n<{D}tool_calls>\n<{D}invoke name="bash">\n<{D}parameter name="comm'
    parser, per_feed = run(text, pieces=char_pieces(text))
    assert collect(per_feed)[1] == "Let me look." + text[text.index("\n\n"):]
    assert parser.error.kind == "malformed_dsml" and "ended inside" in parser.error.message


@pytest.mark.parametrize("by_chars", [False, True])
def test_think_markers_never_reach_content(by_chars):
    text = "plan</think>Answer.</think> More.<think>second thought</think> End." + EOS
    parser, per_feed = run(text, pieces=char_pieces(text) if by_chars else None)
    assert collect(per_feed)[:2] == ("plansecond thought", "Answer. More. End.")
    chat = "Answer.</think> More.<think>aside</think> End."
    parser, per_feed = run(chat, thinking=False, pieces=char_pieces(chat) if by_chars else None)
    assert collect(per_feed)[:2] == ("", "Answer. More.aside End.")
    nested = "a<think>b</think>c"
    assert collect(run(nested)[1])[:2] == ("ab", "c")


def test_output_cut_inside_a_call_reports_an_incomplete_call():
    text = "</think>" + block(invoke("bash", param("command", "echo hi")))
    cut = text[: text.rindex("hi") + 2]
    parser, per_feed = run(cut, pieces=char_pieces(cut))
    assert collect(per_feed)[2][0][2] == '{"command": "echo hi'
    assert not parser.tool_calls[0].is_complete and parser.parse_errors


def test_eos_inside_parameter_is_malformed():
    parser, _ = run("</think>" + f'\n\n<{D}tool_calls>\n<{D}invoke name="bash">\n<{D}parameter name="command" string="true">ls' + EOS)
    assert parser.parse_errors and "end of sentence" in parser.parse_errors[0]


def test_roundtrip_random_arguments_with_random_splits():
    rng = random.Random(7)
    alphabet = ['a', ' ', '"', '\\', '\n', '<', '>', '/', '\u00e9', '\U0001f600', '{', '}', '2>&1', '\t']
    for trial in range(40):
        expected, params = {}, []
        for k in range(rng.randint(0, 4)):
            if rng.random() < 0.6:
                value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
                params.append(param(f"p{k}", value))
            else:
                value = rng.choice([0, -3.5, True, None, [1, {"a": "b"}], {"x": [None]}])
                params.append(param(f"p{k}", json.dumps(value), is_string=False))
            expected[f"p{k}"] = value
        text = "r</think>" + block(invoke("get_weather", *params))
        parser, per_feed = run(text, pieces=random_pieces(text, trial))
        arguments = collect(per_feed)[2][0][2]
        assert json.loads(arguments) == expected
        assert arguments == json.dumps(expected, ensure_ascii=False)
        assert parser.parse_errors == []


def test_split_at_marker_prefers_a_partial_marker_that_starts_earlier():
    markers = ("\n\n<x>", "<x>", "x")
    assert split_at_marker("ab\n\n<", markers, final=False) == ("ab", None, "\n\n<")
    assert split_at_marker("ab\n\n<x>cd", markers, final=False) == ("ab", "\n\n<x>", "cd")
    assert split_at_marker("ab\n<", markers, final=True) == ("ab\n<", None, "")


def test_default_call_ids_look_like_deepseek_ids():
    parser = OutputParser(False, TOOLS)
    parser.feed(block(invoke("bash", param("command", "ls")), invoke("bash", param("command", "pwd"))))
    parser.finish()
    assert [c.id[:8] for c in parser.tool_calls] == ["call_00_", "call_01_"]
    assert all(len(c.id) == 32 and c.id[8:].isalnum() for c in parser.tool_calls)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="text_delta"):
        OutputParser(True, TOOLS).feed(None)
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        OutputParser(True, [{"type": "function"}])


# ----------------------------------------------------------------------------- argument validation

def test_validate_tool_arguments():
    bash = TOOLS[0]
    assert validate_tool_arguments(bash, {"command": "ls", "timeout": 5}) == []
    assert validate_tool_arguments(bash["function"], {"command": "ls"}) == []
    errors = validate_tool_arguments(bash, {"timeout": True, "extra": 1})
    assert errors == ["$: missing required property 'command'", "$.timeout: expected integer, got boolean",
                      "$: unexpected property 'extra'"]
    assert validate_tool_arguments(bash, ["ls"]) == ["$: expected object, got list"]
    assert validate_tool_arguments({"function": {"name": "noargs"}}, {"anything": 1}) == []


def test_json_schema_subset():
    schema = {"type": "object", "properties": {
        "mode": {"enum": ["fast", "slow"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "n": {"type": ["integer", "null"]},
        "flag": {"const": True},
        "either": {"anyOf": [{"type": "string"}, {"type": "number"}]},
        "nested": {"type": "object", "additionalProperties": {"type": "number"}},
    }}
    from server.json_schema import validate
    good = {"mode": "fast", "tags": ["a"], "n": None, "flag": True, "either": 2.5, "nested": {"a": 1}}
    assert validate(schema, good) == []
    bad = {"mode": "medium", "tags": ["a", 3], "n": 1.5, "flag": 1, "either": [], "nested": {"a": "x"}}
    assert validate(schema, bad) == [
        "$.mode: 'medium' is not one of ['fast', 'slow']", "$.tags[1]: expected string, got integer",
        "$.n: expected integer or null, got number", "$.flag: expected True",
        "$.either: does not match any of the allowed schemas", "$.nested.a: expected number, got string"]
    assert validate({"type": "integer"}, 3.0) == []
    with pytest.raises(ValueError, match="unknown type"):
        validate({"type": "str"}, "x")


def test_parser_reads_back_what_the_encoder_renders():
    from server.chat_template import ASSISTANT, encode_messages
    arguments = [{"command": COMMAND, "timeout": 5}, {"city": "Z\u00fcrich", "opts": {"a": [1, None]}}]
    history = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "On it.", "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        for i, (name, args) in enumerate(zip(["bash", "get_weather"], arguments))]}]
    prompt = encode_messages(history, thinking=False, tools=TOOLS)
    turn = prompt.split(ASSISTANT + "</think>", 1)[1]
    parser, per_feed = run(turn, thinking=False, pieces=random_pieces(turn, 11))
    reasoning, content, calls = collect(per_feed)
    assert content == "On it." and parser.parse_errors == []
    assert [json.loads(calls[i][2]) for i in (0, 1)] == arguments


def test_starts_in_reasoning_override():
    parser = OutputParser(True, TOOLS, starts_in_reasoning=False)
    assert parser.feed("answer") == [Delta(content="answer")]
    parser = OutputParser(False, TOOLS, starts_in_reasoning=True)
    assert parser.feed("more thoughts</think>x") == [Delta(reasoning="more thoughts"), Delta(content="x")]


def test_json_content_keeps_markup_spellings_as_string_text():
    text = '</think>{"a": "</think> and ｜DSML｜ and <｜DSML｜tool_calls>"}' + EOS
    parser = OutputParser(True, TOOLS, make_call_id=ids, json_content=True)
    reasoning, content, calls = collect([parser.feed(text), parser.finish()])
    assert content == '{"a": "</think> and ｜DSML｜ and <｜DSML｜tool_calls>"}' and not calls
    assert parser.error is None
