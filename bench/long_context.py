"""Long prompts on a tiny model: wall time and peak RSS of one request (prefill + a few tokens).

Each length runs in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own:

    python bench/long_context.py [--lengths 8192 32768 65536 131072] [--chunk 2048] [--gen 4]
                                 [--timeout 1800] [--kv-mb 64]

The prompt is fed in chunks of ``--chunk`` tokens (``max_num_batched_tokens``) through the
engine (``LLM.generate``); the model is make-tiny's default shape (4 layers: sliding, CSA, HCA,
CSA; fp32 on CPU, one thread).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(model_dir: str, length: int, chunk: int, gen: int, kv_mb: int) -> dict:
    import resource

    import torch

    sys.path.insert(0, ROOT)
    from engine import LLM, SamplingParams

    torch.set_num_threads(1)
    llm = LLM(model_dir, max_num_batched_tokens=chunk, max_num_seqs=1, enable_prefix_cache=False,
              kv_cache_memory=kv_mb * 1024 * 1024)
    g = torch.Generator().manual_seed(length)
    prompt = torch.randint(2, llm.engine.model_config.vocab_size, (length,), generator=g).tolist()
    t = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True))[0]
    seconds = time.perf_counter() - t
    assert len(out.token_ids) == gen
    return {"length": length, "chunk": chunk, "gen": gen, "seconds": round(seconds, 2),
            "prefill_tok_s": round(length / seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--gen", type=int, default=4)
    ap.add_argument("--kv-mb", type=int, default=64, help="KV cache budget (MiB); 64 holds 131072 tokens of the tiny model")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per length")
    ap.add_argument("--model", default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.model, args.one, args.chunk, args.gen, args.kv_mb)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            sys.path.insert(0, ROOT)
            from engine.tiny.make_tiny import make_tiny

            model_dir = tmp
            make_tiny(model_dir, seed=0)
        print(f"{'tokens':>7} | {'seconds':>8} | {'prefill tok/s':>13} | {'peak RSS MB':>11}")
        for n in args.lengths:
            cmd = [sys.executable, __file__, "--model", model_dir, "--one", str(n), "--chunk", str(args.chunk),
                   "--gen", str(args.gen), "--kv-mb", str(args.kv_mb)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True)
            except subprocess.TimeoutExpired:
                print(f"{n:>7} | timed out after {args.timeout} s")
                continue
            except subprocess.CalledProcessError as e:
                print(f"{n:>7} | failed: {e.stderr.strip().splitlines()[-1] if e.stderr.strip() else e}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{n:>7} | {r['seconds']:>8} | {r['prefill_tok_s']:>13} | {r['peak_rss_mb']:>11}", flush=True)


if __name__ == "__main__":
    main()
