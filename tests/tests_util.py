"""Small helpers shared by tests: a single-sequence forward on a fresh dense cache."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from engine.worker.input_batch import ForwardBatch, SeqView
from engine.worker.kv_cache import CacheShape, KVCache


def feeds_logits(model, cache, feeds: list[tuple[int, list[int], int]], blocks: int) -> torch.Tensor:
    """One forward over ``feeds`` = [(sequence, tokens, start position)], sequence ``i`` in window
    and state slot ``i``, c4 blocks ``[i * blocks, (i + 1) * blocks)`` and c128 block ``i``;
    logits of every row."""
    seqs, row = [], 0
    for i, toks, start in feeds:
        seqs.append(SeqView(row, len(toks), start, i, i, list(range(i * blocks, (i + 1) * blocks)), [i]))
        row += len(toks)
    batch = ForwardBatch.build([t for _, t, _ in feeds], seqs, list(range(row)))
    return model.compute_logits(model(batch, cache))


def fresh_cache(model, max_tokens: int = 4096) -> KVCache:
    shape = CacheShape(num_window_slots=1, num_state_slots=1, num_c4_blocks=-(-max_tokens // 256),
                       num_c128_blocks=-(-max_tokens // 8192))
    return KVCache(model.cfg, shape, model.dtype, "cpu")


@torch.inference_mode()
def forward_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits for every position of ``ids`` in one prefill."""
    cache = fresh_cache(model, len(ids))
    seq = SeqView(0, len(ids), 0, 0, 0, list(range(cache.shape.num_c4_blocks)),
                  list(range(cache.shape.num_c128_blocks)))
    batch = ForwardBatch.build([ids], [seq], list(range(len(ids))))
    return model.compute_logits(model(batch, cache))


REPO = Path(__file__).resolve().parents[1]


def assert_interpreted_script_passes(script: str, timeout: int = 300, **env: str) -> None:
    """Run ``script`` in a fresh interpreter with TRITON_INTERPRET=1 (so the interpreter never leaks
    into other tests) and fail with its output unless it exits 0 and prints its ``worst=`` line."""
    full_env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worst=" in proc.stdout
