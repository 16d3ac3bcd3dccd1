"""Measure the demo model on held-out prompts (``python -m bench.demo_eval [--model DIR]``).

The checkpoint is loaded from disk with our loader and decoded greedily with our own model
(prefill, then one cached token per step). Each reply is parsed with the server's
``OutputParser`` and scored:

- well-formed: ends with EOS within the token limit, parses without errors, has reasoning
  (thinking mode) and content or tool calls, and is byte-identical to what the chat encoder
  renders for the parsed message (markers, their order, DSML layout);
- tool calls: on prompts that need a call, every call is complete, its arguments decode to an
  object and validate against the offered tool's schema (``exact`` also matches the
  expected name and arguments);
- quoted: after a ``<tool_result>`` turn, the reply contains the result's values;
- JSON: with ``response_format``, the content is a JSON object.

Prints the figures and writes them as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from engine.worker.input_batch import ForwardBatch, SeqView
from engine.model.config import ModelConfig
from demo.demo_data import Conversation, eval_conversations
from engine.worker.kv_cache import CacheShape, KVCache
from engine.model.loader import load_weights
from engine.model.deepseek_v4 import DeepseekV4
from engine.tokenizer import Tokenizer
from server.chat_template import ends_inside_reasoning
from server.parsers import OutputParser, validate_tool_arguments

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine", "assets", "demo")
C4_BLOCK_TOKENS = 256


def load_model(model_dir: str, threads: int | None = None) -> tuple[DeepseekV4, Tokenizer]:
    if threads:
        torch.set_num_threads(threads)
    cfg = ModelConfig.from_dir(model_dir)
    model = DeepseekV4(cfg, torch.float32)
    load_weights(model, model_dir)
    return model.eval(), Tokenizer.from_dir(model_dir)


@torch.no_grad()
def greedy_generate(model: DeepseekV4, prompts: list[list[int]], max_new_tokens: int,
                    kv_cache_dtype: str = "auto") -> list[tuple[list[int], bool]]:
    """Greedy continuations of ``prompts`` as one batch: (new ids, ended with EOS) each."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if not prompts or any(not p for p in prompts):
        raise ValueError("prompts must be non-empty lists of token ids")
    cfg, n = model.cfg, len(prompts)
    longest = max(map(len, prompts)) + max_new_tokens
    per_seq = -(-longest // C4_BLOCK_TOKENS)
    per_seq128 = -(-longest // 8192)
    # Only name the cache format when it is not the default (plain model-dtype storage).
    fmt = {} if kv_cache_dtype == "auto" else {"kv_cache_dtype": kv_cache_dtype}
    cache = KVCache(cfg, CacheShape(n, n, n * per_seq, n * per_seq128, c4_block_tokens=C4_BLOCK_TOKENS),
                    torch.float32, "cpu", **fmt)

    def view(i: int, row: int, count: int, start: int) -> SeqView:
        return SeqView(row, count, start, window_slot=i, state_slot=i,
                       c4_blocks=list(range(i * per_seq, (i + 1) * per_seq)),
                       c128_blocks=list(range(i * per_seq128, (i + 1) * per_seq128)))

    seqs, row = [], 0
    for i, p in enumerate(prompts):
        seqs.append(view(i, row, len(p), 0))
        row += len(p)
    batch = ForwardBatch.build(prompts, seqs, [s.row_start + s.num_tokens - 1 for s in seqs])
    nxt = model.compute_logits(model(batch, cache)).argmax(-1).tolist()
    out: list[list[int]] = [[t] for t in nxt]
    done = [t == cfg.eos_token_id for t in nxt]
    lengths = [len(p) for p in prompts]
    while not all(done) and max(len(o) for o in out) < max_new_tokens:
        active = [i for i in range(n) if not done[i]]
        seqs = [view(i, j, 1, lengths[i] + len(out[i]) - 1) for j, i in enumerate(active)]
        batch = ForwardBatch.build([[out[i][-1]] for i in active], seqs, list(range(len(active))))
        for i, t in zip(active, model.compute_logits(model(batch, cache)).argmax(-1).tolist()):
            out[i].append(t)
            done[i] = t == cfg.eos_token_id or len(out[i]) >= max_new_tokens
    return [(o, o[-1] == cfg.eos_token_id) for o in out]


@dataclass
class Score:
    kind: str
    well_formed: bool
    tool_calls_valid: bool | None = None
    tool_calls_exact: bool | None = None
    quoted: bool | None = None
    json_valid: bool | None = None
    problems: list[str] = field(default_factory=list)


def score_reply(conv: Conversation, prompt: str, text: str, ended: bool) -> Score:
    """Score one generated reply (decoded with special tokens kept)."""
    parser = OutputParser(conv.thinking, conv.tools, starts_in_reasoning=ends_inside_reasoning(prompt),
                          make_call_id=lambda i: f"call_{i}")
    parser.feed(text)
    parser.finish()
    problems = list(parser.parse_errors)
    if not ended:
        problems.append("no EOS within the token limit")
    if parser.reasoning_unterminated:
        problems.append("reasoning not terminated")
    if conv.thinking and not parser.reasoning:
        problems.append("empty reasoning in thinking mode")
    if not parser.content and not parser.tool_calls:
        problems.append("neither content nor tool calls")
    calls_ok = all(c.is_complete for c in parser.tool_calls)
    if not problems and calls_ok:
        message = {"role": "assistant", "content": parser.content}
        if conv.thinking:
            message["reasoning_content"] = parser.reasoning
        if parser.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in parser.tool_calls]
        if conv.render(conv.prompt_messages() + [message]) != prompt + text:
            problems.append("not byte-identical to the encoder's rendering")
    score = Score(conv.kind, not problems and calls_ok, problems=problems)
    exp = conv.expect
    if exp.tool_calls:
        decoded = []
        for call in parser.tool_calls:
            try:
                decoded.append((call.name, json.loads(call.arguments)) if call.is_complete else None)
            except ValueError:
                decoded.append(None)
        schemas = {t["function"]["name"]: t for t in conv.tools or []}
        score.tool_calls_valid = bool(decoded) and all(
            d is not None and d[0] in schemas and not validate_tool_arguments(schemas[d[0]], d[1]) for d in decoded)
        score.tool_calls_exact = decoded == [(n, a) for n, a in exp.tool_calls]
    if exp.quote:
        score.quoted = all(q in parser.content for q in exp.quote)
    if exp.json_reply:
        try:
            score.json_valid = isinstance(json.loads(parser.content), dict)
        except ValueError:
            score.json_valid = False
    return score


def _percent(values: list[bool]) -> float | None:
    return round(100.0 * sum(values) / len(values), 1) if values else None


def summarize(scores: list[Score]) -> dict:
    def pick(attr):
        return [getattr(s, attr) for s in scores if getattr(s, attr) is not None]

    kinds = sorted({s.kind for s in scores})
    return {
        "prompts": len(scores),
        "well_formed_pct": _percent([s.well_formed for s in scores]),
        "tool_calls_valid_pct": _percent(pick("tool_calls_valid")),
        "tool_calls_exact_pct": _percent(pick("tool_calls_exact")),
        "tool_result_quoted_pct": _percent(pick("quoted")),
        "json_valid_pct": _percent(pick("json_valid")),
        "counts": {"tool_call_prompts": len(pick("tool_calls_valid")), "tool_result_prompts": len(pick("quoted")),
                   "json_prompts": len(pick("json_valid"))},
        "well_formed_by_kind": {k: _percent([s.well_formed for s in scores if s.kind == k]) for k in kinds},
    }


def evaluate(model: DeepseekV4, tokenizer: Tokenizer, convs: list[Conversation], max_new_tokens: int = 200,
             batch_size: int = 24, kv_cache_dtype: str = "auto") -> tuple[dict, list[dict]]:
    """Generate for every held-out prompt and score it; returns (figures, per-prompt records)."""
    prompts = [c.render(c.prompt_messages(), add_generation_prompt=True) for c in convs]
    records, scores = [], []
    for lo in range(0, len(convs), batch_size):
        chunk = list(range(lo, min(lo + batch_size, len(convs))))
        outs = greedy_generate(model, [tokenizer.encode(prompts[i]) for i in chunk], max_new_tokens, kv_cache_dtype)
        for i, (ids, ended) in zip(chunk, outs):
            text = tokenizer.decode(ids)
            s = score_reply(convs[i], prompts[i], text, ended)
            scores.append(s)
            records.append({"kind": s.kind, "thinking": convs[i].thinking, "reply": text,
                            "well_formed": s.well_formed, "problems": s.problems, "tool_calls_valid": s.tool_calls_valid,
                            "quoted": s.quoted, "json_valid": s.json_valid})
    return summarize(scores), records


EVAL_HEADING = "## Held-out evaluation"


def record_figures(model_dir: str, figures: dict, command: str) -> None:
    """Put the figures into the checkpoint's TRAINING.md (replacing an older evaluation section)."""
    path = os.path.join(model_dir, "TRAINING.md")
    text = open(path).read() if os.path.exists(path) else "# Demo model\n"
    text = text.split("\n" + EVAL_HEADING)[0].rstrip("\n")
    shown = {k: v for k, v in figures.items() if k != "model"}
    text += (f"\n\n{EVAL_HEADING}\n\n`{command}` (checkpoint loaded from disk, greedy decoding):\n\n"
             f"```json\n{json.dumps(shown, indent=2)}\n```\n")
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Score the demo model on held-out prompts.")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (default: the embedded demo)")
    ap.add_argument("--per-kind", type=int, default=34, help="held-out prompts per conversation kind")
    ap.add_argument("--seed", type=int, default=0, help="held-out prompt seed")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-dtype", default="auto", help="KV cache storage: auto (model dtype) or fp8")
    ap.add_argument("--out", default=None, help="write figures + replies as JSON here")
    ap.add_argument("--record", action="store_true", help="also write the figures into the model's TRAINING.md")
    args = ap.parse_args(argv)
    if args.per_kind < 1:
        raise ValueError(f"--per-kind must be >= 1, got {args.per_kind}")
    model, tokenizer = load_model(args.model, args.threads)
    start = time.time()
    figures, records = evaluate(model, tokenizer, eval_conversations(args.seed, args.per_kind), args.max_new_tokens,
                                kv_cache_dtype=args.kv_cache_dtype)
    figures["kv_cache_dtype"] = args.kv_cache_dtype
    figures["seconds"] = round(time.time() - start, 1)
    figures["model"] = os.path.abspath(args.model)
    print(json.dumps(figures, indent=2))
    if args.record:
        command = (f"python -m bench.demo_eval --per-kind {args.per_kind} --seed {args.seed} "
                   f"--max-new-tokens {args.max_new_tokens} --kv-cache-dtype {args.kv_cache_dtype}")
        record_figures(args.model, figures, command)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"figures": figures, "replies": records}, f, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
