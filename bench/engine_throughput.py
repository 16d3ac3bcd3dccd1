"""Engine throughput on a tiny checkpoint, side by side in one run.

For each concurrency B: generated tokens/s of
  llm    — ``LLM.generate`` (scheduler, paged cache, sampler, detokenizer: the whole engine), eager
  compile — the same with ``compile=True`` (``--compile``: decode steps through
           ``torch.compile(fullgraph=True)``, Inductor; prefill steps eager). Its first run at a
           batch size compiles that decode bucket and is not timed (a warm-up run of the same shape)
  bare   — a bare loop of batched model forwards on the same cache (prefill, then B-token
           decode steps, argmax) — the floor our engine overhead is measured against
  hf     — transformers' ``generate`` on the same weights (batch of B equal-length prompts)

    python bench/engine_throughput.py [--model DIR] [--batch-sizes 1 8 32 128] [--prompt-len 32] [--gen 32]
                                      [--compile-batch-sizes 1 8 32 128] [--no-compile] [--no-hf]

Without --model a tiny official-layout checkpoint is made in a temp dir (seed 0).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLM, SamplingParams  # noqa: E402
from engine.worker.input_batch import ForwardBatch, SeqView  # noqa: E402
from engine.worker.kv_cache import CacheShape, KVCache  # noqa: E402


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def run_llm(llm: LLM, prompts, gen: int) -> float:
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    assert all(len(o.token_ids) == gen for o in outs)
    return len(prompts) * gen / dt


@torch.inference_mode()
def run_bare(model, prompts, gen: int) -> float:
    B, L = len(prompts), len(prompts[0])
    blocks_per_seq = -(-(L + gen) // 256)
    cache = KVCache(model.cfg, CacheShape(B, B, B * blocks_per_seq, B), model.dtype, "cpu")

    def views(start, n):
        return [SeqView(i * n, n, start, i, i, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), [i])
                for i in range(B)]

    t = time.perf_counter()
    seqs = views(0, L)
    batch = ForwardBatch.build(prompts, seqs, [s.row_start + L - 1 for s in seqs])
    nxt = model.compute_logits(model(batch, cache)).argmax(-1).tolist()
    for step in range(1, gen):
        seqs = views(L + step - 1, 1)
        batch = ForwardBatch.build([[x] for x in nxt], seqs, list(range(B)))
        nxt = model.compute_logits(model(batch, cache)).argmax(-1).tolist()
    return B * gen / (time.perf_counter() - t)


@torch.inference_mode()
def run_hf(hf, prompts, gen: int) -> float:
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen, min_new_tokens=gen,
                      do_sample=False, use_cache=True)
    dt = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + gen
    return len(prompts) * gen / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (not installed)")
    ap.add_argument("--no-compile", action="store_true", help="skip the --compile column")
    ap.add_argument("--compile-batch-sizes", type=int, nargs="+", default=None,
                    help="batch sizes for the --compile column (default: all; each compiles a bucket)")
    ap.add_argument("--output-json")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model_dir = args.model
    tmp = None
    if model_dir is None:
        from engine.tiny.make_tiny import make_tiny

        tmp = tempfile.TemporaryDirectory()
        model_dir = tmp.name
        make_tiny(model_dir, seed=0)

    llm = LLM(model_dir, max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=8192,
              enable_prefix_cache=False)
    model = llm.engine.runner.model
    compiled = None
    if not args.no_compile:
        compiled = LLM(model_dir, max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=8192,
                       enable_prefix_cache=False, compile=True)
    compile_sizes = set(args.batch_sizes if args.compile_batch_sizes is None else args.compile_batch_sizes)
    hf = None
    if not args.no_hf:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from hf_reference import load_hf, official_to_hf_dir

        hf = load_hf(official_to_hf_dir(model_dir, tempfile.mkdtemp()))

    rows = []
    print(f"threads={torch.get_num_threads()} prompt_len={args.prompt_len} gen={args.gen}")
    print(f"{'B':>5} {'llm tok/s':>10} {'compile tok/s':>14} {'bare tok/s':>11} {'hf tok/s':>9} {'llm/bare':>9} "
          f"{'llm/hf':>7} {'compile/llm':>12}")
    for B in args.batch_sizes:
        prompts = prompts_for(B, args.prompt_len, model.cfg.vocab_size, seed=B)
        run_llm(llm, prompts[:1], 2)  # warm-up
        r = {"batch": B, "llm": run_llm(llm, prompts, args.gen), "bare": run_bare(model, prompts, args.gen)}
        r["hf"] = run_hf(hf, prompts, args.gen) if hf is not None else None
        r["compile"] = None
        if compiled is not None and B in compile_sizes:
            warm = time.perf_counter()
            run_llm(compiled, prompts, args.gen)  # compiles this decode bucket
            r["compile_warmup_s"] = time.perf_counter() - warm
            r["compile"] = run_llm(compiled, prompts, args.gen)
        rows.append(r)
        hf_s = f"{r['hf']:9.1f}" if r["hf"] else f"{'-':>9}"
        ratio_hf = f"{r['llm'] / r['hf']:7.2f}" if r["hf"] else f"{'-':>7}"
        comp_s = f"{r['compile']:14.1f}" if r["compile"] else f"{'-':>14}"
        ratio_c = f"{r['compile'] / r['llm']:12.2f}" if r["compile"] else f"{'-':>12}"
        print(f"{B:>5} {r['llm']:10.1f} {comp_s} {r['bare']:11.1f} {hf_s} {r['llm'] / r['bare']:9.2f} {ratio_hf} "
              f"{ratio_c}", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
