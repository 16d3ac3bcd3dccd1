import json
import random

import pytest

from demo.demo_data import KINDS, TOOLS, conversations, eval_conversations, make_conversation, tokenize
from engine.tiny.tokenizer_train import DEEPSEEK_SPECIAL_TOKENS, train_tokenizer
from server.chat_template import EOS, THINK_END, THINK_START
from server.parsers import OutputParser, validate_tool_arguments


@pytest.fixture(scope="module")
def sample():
    return conversations(7, 300)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, sample):
    return train_tokenizer([c.render() for c in sample], tmp_path_factory.mktemp("tok"), vocab_size=600,
                           special_tokens=DEEPSEEK_SPECIAL_TOKENS)


def test_seeded_and_independent_streams():
    a, b = conversations(3, 20), conversations(3, 20)
    assert [c.render() for c in a] == [c.render() for c in b]
    assert [c.render() for c in conversations(4, 20)] != [c.render() for c in a]
    assert [c.render() for c in conversations(3, 20, "eval")] != [c.render() for c in a]


def test_every_kind_and_feature_occurs(sample):
    assert {c.kind for c in sample} == {k for k, _ in KINDS}
    texts = [c.render() for c in sample]
    assert any(c.thinking for c in sample) and any(not c.thinking for c in sample)
    assert any('string="false"' in t for t in texts) and any('string="true"' in t for t in texts)
    assert any(t.count("<｜DSML｜invoke ") >= 2 for t in texts)  # parallel calls
    assert any("<tool_result>" in t for t in texts)
    assert any("## Response Format" in t for t in texts)
    assert any("## Tools" in t for t in texts)


def test_segments_rebuild_the_rendering_and_targets_are_assistant_replies(sample):
    for conv in sample:
        pieces = conv.segments()
        assert "".join(t for t, _ in pieces) == conv.render()
        targets = [t for t, is_target in pieces if is_target]
        assert targets and all(t.endswith(EOS) for t in targets)
        # The last reply is always trained and is what follows the held-out prompt.
        prompt = conv.render(conv.prompt_messages(), add_generation_prompt=True)
        assert conv.render() == prompt + targets[-1]
        for i, (text, is_target) in enumerate(pieces):
            if is_target:
                assert pieces[i - 1][0].endswith((THINK_START, THINK_END))


def test_dropped_reasoning_is_context_not_target():
    rng = random.Random(1)
    conv = next(c for c in (make_conversation(rng, "multi_turn") for _ in range(50)) if c.thinking)
    targets = [t for t, is_target in conv.segments() if is_target]
    assert len(targets) == 1  # earlier turns lost their reasoning: not what the model generates
    assert targets[0].startswith(conv.messages[-1]["reasoning_content"])
    plain = next(c for c in (make_conversation(rng, "multi_turn") for _ in range(50)) if not c.thinking)
    assert sum(is_target for _, is_target in plain.segments()) == sum(
        m["role"] == "assistant" for m in plain.messages)


def test_tokenize_equals_whole_text_tokenization(sample, tokenizer):
    for conv in sample[:80]:
        ids, mask = tokenize(conv, tokenizer)
        assert ids == tokenizer.encode(conv.render())
        assert len(mask) == len(ids) and any(mask)
        assert mask[-1] and ids[-1] == tokenizer.eos_id


def test_expectations_match_the_rendered_reply(sample):
    for conv in eval_conversations(5, 6):
        reply = conv.segments()[-1][0]
        prompt = conv.render(conv.prompt_messages(), add_generation_prompt=True)
        parser = OutputParser(conv.thinking, conv.tools, starts_in_reasoning=prompt.endswith(THINK_START))
        parser.feed(reply)
        parser.finish()
        assert not parser.parse_errors
        if conv.expect.tool_calls:
            got = [(c.name, json.loads(c.arguments)) for c in parser.tool_calls]
            assert got == conv.expect.tool_calls
            for name, args in got:
                assert validate_tool_arguments(TOOLS[name], args) == []
        for value in conv.expect.quote:
            assert value in parser.content
        if conv.expect.json_reply:
            assert isinstance(json.loads(parser.content), dict)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="kind"):
        make_conversation(random.Random(0), "poetry")
    with pytest.raises(ValueError, match="split"):
        conversations(0, 3, "test")
    with pytest.raises(ValueError, match="count"):
        conversations(0, -1)


def test_eval_scoring_accepts_references_and_rejects_corruptions():
    from bench.demo_eval import score_reply, summarize

    scores = []
    for conv in eval_conversations(9, 4):
        prompt = conv.render(conv.prompt_messages(), add_generation_prompt=True)
        reply = conv.segments()[-1][0]
        s = score_reply(conv, prompt, reply, ended=True)
        assert s.well_formed, (conv.kind, s.problems)
        assert s.tool_calls_valid in (None, True) and s.tool_calls_exact in (None, True)
        assert s.quoted in (None, True) and s.json_valid in (None, True)
        scores.append(s)
        cut = score_reply(conv, prompt, reply[: -len(EOS)], ended=False)
        assert not cut.well_formed and "no EOS within the token limit" in cut.problems
        if conv.expect.tool_calls:
            spaced = reply.replace("</｜DSML｜invoke>\n", "</｜DSML｜invoke>\n\n")
            loose = score_reply(conv, prompt, spaced.replace("\n</｜DSML｜tool_calls>", "\n\n</｜DSML｜tool_calls>"), True)
            assert not loose.well_formed and any("byte-identical" in p for p in loose.problems)
            name = conv.expect.tool_calls[0][0]
            wrong = score_reply(conv, prompt, reply.replace(f'name="{name}"', 'name="no_such_tool"'), True)
            assert wrong.tool_calls_valid is False and not wrong.well_formed
        if conv.expect.quote:
            assert score_reply(conv, prompt, reply.replace(conv.expect.quote[0], "?"), True).quoted is False
        if conv.expect.json_reply:
            assert score_reply(conv, prompt, reply.replace("}", ""), True).json_valid is False
    figures = summarize(scores)
    assert figures["well_formed_pct"] == 100.0 and figures["prompts"] == len(scores)
