"""The batched decode path (one token per sequence, padded gathers) equals the per-sequence path."""
import pytest
import torch

from engine.worker.input_batch import ForwardBatch, SeqView
from engine.model.config import ModelConfig
from engine.worker.kv_cache import CacheShape, KVCache
from engine.model.loader import load_weights
from engine.model.deepseek_v4 import DeepseekV4


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@torch.inference_mode()
def test_batched_decode_matches_loop(tiny_dir, kv_cache_dtype):
    cfg = ModelConfig.from_dir(tiny_dir)
    model = DeepseekV4(cfg)
    load_weights(model, tiny_dir)
    g = torch.Generator().manual_seed(4)
    # Lengths around window/compression boundaries: 127/128 (window), 3/4 (CSA), 255/256 (HCA, c4 block).
    lengths = [1, 3, 4, 127, 128, 255, 256, 300, 520]
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    B, nb4 = len(prompts), 3

    def make_cache():
        return KVCache(cfg, CacheShape(B, B, B * nb4, B), model.dtype, "cpu", kv_cache_dtype=kv_cache_dtype)

    def seq(i, n, start):
        return SeqView(0, n, start, i, i, list(range(i * nb4, (i + 1) * nb4)), [i])

    caches = {True: make_cache(), False: make_cache()}
    for c in caches.values():  # same prefill for both
        for i, p in enumerate(prompts):
            model(ForwardBatch.build([p], [seq(i, len(p), 0)], [len(p) - 1]), c)
    logits = {}
    for batched, c in caches.items():
        steps = []
        tokens = [[5 + i] for i in range(B)]
        for step in range(6):  # several decode steps so windows wrap and compressors emit
            seqs = []
            for i, p in enumerate(prompts):
                s = seq(i, 1, len(p) + step)
                s.row_start = i
                seqs.append(s)
            batch = ForwardBatch.build(tokens, seqs, list(range(B)))
            if not batched:
                batch.decode = None
            out = model.compute_logits(model(batch, c))
            steps.append(out)
            tokens = [[int(t)] for t in out.argmax(-1)]
        logits[batched] = torch.stack(steps)
    assert (logits[True] - logits[False]).abs().max().item() < 1e-4
    assert torch.equal(logits[True].argmax(-1), logits[False].argmax(-1))
