"""JSON Output by grammar (xgrammar): the token table the grammar library is built on, and the
JSON-object constraint driven by random logits over the tiny checkpoint's real vocabulary."""

import json

import pytest
import torch
import xgrammar as xgr

from engine.tokenizer import Tokenizer
from server.grammar import GrammarLibrary, GrammarProcessor
from server.token_table import TokenTable


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def table(tokenizer):
    return TokenTable(tokenizer)


@pytest.fixture(scope="module")
def library(tokenizer, table):
    return GrammarLibrary(table, tokenizer.control_ids)


def test_token_table_matches_decode(tokenizer, table):
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


def _allowed(processor, ids, vocab):
    return set(torch.isfinite(processor(ids, torch.zeros(vocab))).nonzero().flatten().tolist())


def test_allowed_sets(library, tokenizer, table):
    start = _allowed(GrammarProcessor(library.json_object()), [], table.vocab_size)
    assert start and all(table.token_bytes[i].lstrip().startswith(b"{") or not table.token_bytes[i].strip()
                         for i in start)
    assert tokenizer.eos_id not in start
    in_string = _allowed(GrammarProcessor(library.json_object()), tokenizer.encode('{"key'), table.vocab_size)
    assert in_string and not any(table.is_control[i] for i in in_string)
    done = _allowed(GrammarProcessor(library.json_object()), tokenizer.encode('{"a": 1}'), table.vocab_size)
    assert tokenizer.eos_id in done and not any(table.token_bytes[i].strip() for i in done if i != tokenizer.eos_id)


def _generate(processor, table, eos_id, steps, generator, bias):
    ids = []
    for _ in range(steps):
        logits = torch.randn(table.vocab_size, generator=generator) + bias
        processor.prepare(ids)  # as the model runner does before the forward
        masked = processor(ids, logits.clone())
        assert masked.shape == logits.shape
        token = int(torch.multinomial(torch.softmax(masked, dim=-1), 1, generator=generator))
        ids.append(token)
        if token == eos_id:
            break
    return ids


def test_processor_random_walks_stay_valid(library, tokenizer, table):
    eos = tokenizer.eos_id
    # Favour tokens that close things so that some walks finish within the step budget.
    bias = torch.zeros(table.vocab_size)
    for i, data in enumerate(table.token_bytes):
        if not table.is_control[i] and data and data[-1:] in (b"}", b'"', b"]"):
            bias[i] = 4.0
    bias[eos] = 8.0
    checker = xgr.GrammarMatcher(library.json_object().compiled)  # an independent matcher re-reads the text
    completed = 0
    for seed in range(12):
        ids = _generate(GrammarProcessor(library.json_object()), table, eos, 120, torch.Generator().manual_seed(seed),
                        bias)
        body = b"".join(table.token_bytes[i] for i in ids if i != eos)
        checker.reset()
        assert checker.accept_string(body), body
        if ids[-1] == eos:
            completed += 1
            assert isinstance(json.loads(body.decode("utf-8", errors="replace")), dict), body
    assert completed >= 3


def test_eos_only_when_complete(library, tokenizer, table):
    processor = GrammarProcessor(library.json_object())
    ids = []
    for piece in ('{"a"', ":", " 1", "}"):
        assert tokenizer.eos_id not in _allowed(processor, ids, table.vocab_size)
        ids += tokenizer.encode(piece)
    assert tokenizer.eos_id in _allowed(processor, ids, table.vocab_size)


def test_reasoning_is_free_until_think_end(library, tokenizer, table):
    think_end = tokenizer.token_to_id("</think>")
    processor = GrammarProcessor(library.json_object(), think_end_id=think_end)
    logits = torch.randn(table.vocab_size)
    reasoning = tokenizer.encode("let me think [x")
    masked = processor(reasoning, logits.clone())
    free = torch.isfinite(masked)
    assert not free[tokenizer.eos_id] and int(free.sum()) >= table.vocab_size - 2  # only EOS and DSML masked
    after = _allowed(processor, reasoning + [think_end], table.vocab_size)
    assert after == _allowed(GrammarProcessor(library.json_object()), [], table.vocab_size)


def test_mask_handles_padded_vocab(tokenizer, table):
    """Model vocabularies may be padded past the tokenizer's; padding ids are never allowed."""
    padded = GrammarLibrary(table, tokenizer.control_ids, vocab_size=table.vocab_size + 64)
    masked = GrammarProcessor(padded.json_object())([], torch.zeros(table.vocab_size + 64))
    assert torch.isinf(masked[table.vocab_size:]).all()
