"""Speculative decoding on the demo model: acceptance and decode speed, side by side in one run.

    python bench/spec_decode.py [--model DIR] [--prompts 300] [--ks 1 2 3] [--batches 1 8]
        [--method ngram] [--max-tokens 64]

Held-out demo conversations (``demo.demo_data.eval_conversations``, 50 per kind, the first
``--prompts``), rendered with the chat template and decoded greedily by the engine
(``LLM``, ``EngineCore``) with ``k = 0`` and each ``k``. Acceptance comes from every held-out
prompt at batch 8 (mean accepted drafts per verify chunk, acceptance rate per draft position);
decode tokens/s at batch 1 and 8 are measured on the same prompts, generated tokens over the
wall time of the decode steps only (steps that ran no prefill), so prompt length does not
weigh in. Every run is also checked token for token against ``k = 0``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demo.demo_data import eval_conversations  # noqa: E402
from engine import SamplingParams  # noqa: E402
from engine.engine_config import EngineConfig  # noqa: E402
from engine.engine_core import EngineCore  # noqa: E402
from engine.default_model import default_model_dir  # noqa: E402


def run(model: str, prompts: list[list[int]], k: int, batch: int, max_tokens: int, method: str) -> dict:
    core = EngineCore(EngineConfig(model=model, max_num_seqs=batch, speculative_tokens=k, speculative_method=method,
                                   speculative_max_batch=max(batch, 1), enable_prefix_cache=False))
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    out = {i: [] for i in range(len(prompts))}
    pending = list(range(len(prompts)))
    decode_time = decode_tokens = 0.0
    drafts = draft_tokens = accepted = 0
    per_pos = [0] * max(k, 1)
    schedule, last = core.scheduler.schedule, {}

    def schedule_and_note():  # a decode step: every chunk one token (+ its drafts), no prefill
        sched = schedule()
        last["decode"] = bool(sched.chunks) and all(len(c.token_ids) == 1 + c.num_drafts for c in sched.chunks)
        return sched
    core.scheduler.schedule = schedule_and_note
    while pending or core.has_unfinished():
        while pending and core.scheduler.num_running + core.scheduler.num_waiting < batch:
            i = pending.pop(0)
            core.add_request(str(i), prompts[i], params)
        t = time.perf_counter()
        outputs = core.step()
        dt = time.perf_counter() - t
        stats = core.last_step_stats
        for o in outputs:
            out[int(o.request_id)] += o.new_token_ids
        if last.get("decode"):
            decode_time += dt
            decode_tokens += stats.num_generation_tokens
        drafts += stats.spec_num_drafts
        draft_tokens += stats.spec_num_draft_tokens
        accepted += stats.spec_num_accepted_tokens
        for p, n in enumerate(stats.spec_accepted_per_position):
            per_pos[p] += n
    return {"k": k, "batch": batch, "tokens": [out[i] for i in range(len(prompts))],
            "decode_tokens_per_s": decode_tokens / decode_time if decode_time else 0.0,
            "verify_chunks": drafts, "draft_tokens": draft_tokens, "accepted": accepted,
            "mean_accepted": accepted / drafts if drafts else 0.0,
            "acceptance_per_position": [n / drafts if drafts else 0.0 for n in per_pos[:k]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded demo model)")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--speed-prompts", type=int, default=48, help="prompts for the tokens/s runs")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--method", default="ngram", choices=("ngram", "mtp"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = args.model or default_model_dir()
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model)
    convs = eval_conversations(seed=0, per_kind=50)[: args.prompts]
    prompts = [tok.encode(c.render(c.prompt_messages(), add_generation_prompt=True)) for c in convs]
    rows = []
    base = run(model, prompts, 0, 8, args.max_tokens, args.method)
    for k in args.ks:  # acceptance over every held-out prompt
        r = run(model, prompts, k, 8, args.max_tokens, args.method)
        assert r["tokens"] == base["tokens"], f"k={k} changed the greedy output"
        rows.append({x: r[x] for x in ("k", "verify_chunks", "draft_tokens", "accepted", "mean_accepted",
                                       "acceptance_per_position")})
    speed = []
    sp = prompts[: args.speed_prompts]
    run(model, sp[:4], 0, 2, 8, args.method)  # warm-up: first-call allocations stay out of the figures
    for batch in args.batches:  # k = 0 and each k alternated, twice; the better of the two rounds
        for k in args.ks:
            rounds = []
            for _ in range(2):
                plain = run(model, sp, 0, batch, args.max_tokens, args.method)
                r = run(model, sp, k, batch, args.max_tokens, args.method)
                assert r["tokens"] == plain["tokens"]
                rounds.append((plain["decode_tokens_per_s"], r["decode_tokens_per_s"]))
            k0, kk = max(x for x, _ in rounds), max(y for _, y in rounds)
            speed.append({"batch": batch, "k": k, "tokens_per_s": kk, "k0_tokens_per_s": k0, "speedup": kk / k0})
    if args.json:
        print(json.dumps({"acceptance": rows, "speed": speed}, indent=2))
        return
    print(f"method {args.method}, {len(prompts)} held-out prompts, greedy, max_tokens {args.max_tokens}; "
          f"every k token-identical to k=0")
    print(f"{'k':>2} | {'verify chunks':>13} | {'mean accepted':>13} | acceptance per position")
    for r in rows:
        print(f"{r['k']:>2} | {r['verify_chunks']:>13} | {r['mean_accepted']:>13.3f} | "
              + " ".join(f"{a:.3f}" for a in r["acceptance_per_position"]))
    print(f"{'batch':>5} | {'k':>2} | {'k=0 tok/s':>9} | {'k tok/s':>8} | speedup ({len(sp)} prompts)")
    for s in speed:
        print(f"{s['batch']:>5} | {s['k']:>2} | {s['k0_tokens_per_s']:>9.1f} | {s['tokens_per_s']:>8.1f} | "
              f"{s['speedup']:.2f}")


if __name__ == "__main__":
    main()
