"""JSON Output constraint: the byte-level JSON-prefix automaton, the per-tokenizer tables and
the logits processor driven by random logits over the tiny checkpoint's real vocabulary."""

import json

import pytest
import torch

from engine.tokenizer import Tokenizer
from server.json_constraint import (
    INITIAL_STATE, MAX_DEPTH, JsonObjectProcessor, JsonVocabIndex, TokenTable, advance_bytes, is_complete,
)

VALID = [
    "{}",
    '{"a": 1}',
    '{ "k" : [ ] , "e": {} }',
    '{"a": [1, -2.5e-3, 0, 1E+9, true, false, null, {"b": "x\\u00e9\\n\\"\\\\"}]}',
    '{"é": "ü 😀", "n": -0.0}',
    '{\n  "pretty": [\n    1,\n    2\n  ]\n}',
]
INVALID = [
    " {}",  # leading whitespace
    "[]",  # top level must be an object
    '"x"',
    '{"a": 01}',
    '{"a" 1}',
    '{"a": tru}',
    '{"a": "\\x"}',
    '{"a": "\\u12g4"}',
    "{}x",
    "{} ",
    '{"a":1,}',
    '{"a": [1,]}',
    '{"a":-}',
    '{"a": 1.}',
    '{"a": 1e}',
    '{a: 1}',
    '{"a": "line\nbreak"}',  # raw control character inside a string
]


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def index(tokenizer):
    return JsonVocabIndex(TokenTable(tokenizer))


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_complete(text):
    assert json.loads(text) is not None  # the fixture itself is valid JSON
    state = advance_bytes(INITIAL_STATE, text.encode())
    assert is_complete(state), text
    # every proper prefix is viable but not complete
    for cut in range(len(text.encode())):
        prefix_state = advance_bytes(INITIAL_STATE, text.encode()[:cut])
        assert prefix_state is not None and not is_complete(prefix_state), (text, cut)


@pytest.mark.parametrize("text", INVALID)
def test_invalid_texts_never_complete(text):
    assert not is_complete(advance_bytes(INITIAL_STATE, text.encode())), text


def test_nesting_is_capped():
    assert advance_bytes(INITIAL_STATE, b'{"a":' + b"[" * (MAX_DEPTH - 1)) is not None
    assert advance_bytes(INITIAL_STATE, b'{"a":' + b"[" * MAX_DEPTH) is None


def test_token_table_matches_decode(tokenizer):
    table = TokenTable(tokenizer)
    assert table.vocab_size == tokenizer.vocab_size
    special = tokenizer.control_ids
    for token_id in range(tokenizer.vocab_size):
        decoded = tokenizer.decode([token_id])
        if "\ufffd" not in decoded:  # tokens holding part of a UTF-8 character decode lossily
            assert table.token_bytes[token_id] == decoded.encode(), token_id
        assert table.is_control[token_id] == (token_id in special)
    # byte-level tokens reassemble multi-byte text exactly
    ids = tokenizer.encode("héllo 😀 wörld")
    assert b"".join(table.token_bytes[i] for i in ids) == "héllo 😀 wörld".encode()


def test_allowed_sets(index, tokenizer):
    table = index.table
    start = set(index.allowed_ids(INITIAL_STATE))
    assert start and all(table.token_bytes[i].startswith(b"{") for i in start)
    assert tokenizer.eos_id not in start
    assert index.allowed_ids(advance_bytes(INITIAL_STATE, b"{}")) == (tokenizer.eos_id,)
    in_string = set(index.allowed_ids(advance_bytes(INITIAL_STATE, b'{"key')))
    assert not any(table.is_control[i] for i in in_string)
    assert all(advance_bytes(advance_bytes(INITIAL_STATE, b'{"key'), table.token_bytes[i]) is not None
               for i in in_string)
    # exhaustive cross-check against a token-by-token scan
    state = advance_bytes(INITIAL_STATE, b'{"a": [1, ')
    expected = {i for i in range(table.vocab_size) if not table.is_control[i] and table.token_bytes[i]
                and advance_bytes(state, table.token_bytes[i]) is not None}
    assert set(index.allowed_ids(state)) == expected


def _generate(processor, table, eos_id, steps, generator, bias=None):
    ids = []
    for _ in range(steps):
        logits = torch.randn(table.vocab_size, generator=generator)
        if bias is not None:
            logits = logits + bias
        masked = processor(ids, logits)
        assert masked.shape == logits.shape
        probs = torch.softmax(masked, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
        ids.append(token)
        if token == eos_id:
            break
    return ids


def test_processor_random_walks_stay_valid(index, tokenizer):
    table, eos = index.table, tokenizer.eos_id
    # Favour tokens that close things so that some walks finish within the step budget.
    bias = torch.zeros(table.vocab_size)
    for i, data in enumerate(table.token_bytes):
        if not table.is_control[i] and data and data[-1:] in (b"}", b'"', b"]"):
            bias[i] = 4.0
    bias[eos] = 8.0
    completed = 0
    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        ids = _generate(JsonObjectProcessor(index), table, eos, 120, generator, bias)
        body = b"".join(table.token_bytes[i] for i in ids if i != eos)
        assert advance_bytes(INITIAL_STATE, body) is not None, body
        if ids[-1] == eos:
            completed += 1
            assert isinstance(json.loads(body.decode("utf-8", errors="replace")), dict), body
    assert completed >= 3


def test_eos_only_when_complete(index, tokenizer):
    processor = JsonObjectProcessor(index)
    logits = torch.zeros(index.table.vocab_size)
    ids = []
    for piece in (b'{"a"', b":", b" 1", b"}"):
        assert processor(ids, logits)[tokenizer.eos_id] == float("-inf")
        ids += tokenizer.encode(piece.decode())
    masked = processor(ids, logits)
    assert masked[tokenizer.eos_id] == 0.0
    assert torch.isinf(masked).sum() == index.table.vocab_size - 1


def test_reasoning_is_free_until_think_end(index, tokenizer):
    think_end = tokenizer.token_to_id("</think>")
    processor = JsonObjectProcessor(index, think_end_id=think_end)
    logits = torch.randn(index.table.vocab_size)
    reasoning = tokenizer.encode("let me think [x")
    assert torch.equal(processor(reasoning, logits), logits)
    masked = processor(reasoning + [think_end], logits)
    allowed = torch.isfinite(masked).nonzero().flatten().tolist()
    assert set(allowed) == set(index.allowed_ids(INITIAL_STATE))


def test_mask_handles_padded_vocab(index):
    """Model vocabularies may be padded past the tokenizer's; padding ids are never allowed."""
    logits = torch.zeros(index.table.vocab_size + 64)
    masked = JsonObjectProcessor(index)([], logits)
    assert torch.isinf(masked[index.table.vocab_size:]).all()
