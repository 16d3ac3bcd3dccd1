"""Small helpers shared by tests: a single-sequence forward on a fresh dense cache."""
from __future__ import annotations

import torch

from engine.worker.input_batch import ForwardBatch, SeqView
from engine.worker.kv_cache import CacheShape, KVCache


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
