"""Verify chunks and rollback on the cache: a sequence fed ``[token, d1..dk]`` whose last drafts
are wrong, then continued from the first wrong one, equals the sequence fed one token at a time.

This is what speculative decoding does to the cache every step. The rejected drafts' window-ring
rows, compressor-state rows and compressed entries were written; with ``ring_slack >= k`` the
rings have rows enough that those writes only land where no live position reads, the compressor
keeps its window counted from ``end - slack``, and a compressed entry completed by a rejected
token is rewritten when the sequence really completes it."""
import pytest
import torch

from engine.model.config import ModelConfig
from engine.model.deepseek_v4 import DeepseekV4
from engine.model.loader import load_weights
from engine.worker.kv_cache import CacheShape, KVCache
from tests_util import feeds_logits

# Prompts ending around the CSA (4), window (128) and HCA (128) boundaries, so that verify
# chunks cross them with accepted and with rejected tokens.
PROMPTS = [5, 121, 125, 126, 250]
K = 3  # drafts per verify chunk
STEPS = 8
BLOCKS = 3


def _logits(model, cache, feeds):
    """One forward over ``feeds`` = [(sequence, tokens, start)]; logits of every row."""
    return feeds_logits(model, cache, feeds, BLOCKS)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@torch.inference_mode()
def test_rejected_drafts_roll_back_exactly(tiny_dir, kv_cache_dtype):
    cfg = ModelConfig.from_dir(tiny_dir)
    assert {0, 4, 128} <= set(cfg.compress_ratios)
    model = DeepseekV4(cfg)
    load_weights(model, tiny_dir)
    g = torch.Generator().manual_seed(11)
    B = len(PROMPTS)
    # Each sequence's true continuation (teacher forcing) and its accepted counts per step.
    truth = [torch.randint(2, cfg.vocab_size, (n + STEPS * (K + 1),), generator=g).tolist() for n in PROMPTS]
    accepted = torch.randint(0, K + 1, (STEPS, B), generator=g).tolist()

    def cache(slack):
        return KVCache(cfg, CacheShape(B, B, B * BLOCKS, B, ring_slack=slack), model.dtype, "cpu",
                       kv_cache_dtype=kv_cache_dtype)

    plain, spec = cache(0), cache(K)
    _logits(model, plain, [(i, truth[i][:n], 0) for i, n in enumerate(PROMPTS)])
    _logits(model, spec, [(i, truth[i][:n], 0) for i, n in enumerate(PROMPTS)])
    length = list(PROMPTS)  # tokens whose KV each cache holds
    for step in range(STEPS):
        feeds, want_rows = [], []
        for i in range(B):
            p, a = length[i], accepted[step][i]
            # The last known token, then `a` correct drafts and K - a wrong ones.
            wrong = [(t + 1 + j) % cfg.vocab_size or 1 for j, t in enumerate(truth[i][p + a + 1:p + K + 1])]
            feeds.append((i, truth[i][p:p + a + 1] + wrong, p))
        got = _logits(model, spec, feeds)
        # The plain cache takes the accepted tokens one position per step.
        row = 0
        for i, (_, toks, p) in enumerate(feeds):
            a = accepted[step][i]
            for j in range(a + 1):
                want = _logits(model, plain, [(i, [truth[i][p + j]], p + j)])[0]
                diff = (got[row + j] - want).abs().max().item()
                assert diff < 1e-5, f"step {step} seq {i} position {p + j}: max |dlogit| {diff:.3g}"
                assert got[row + j].argmax() == want.argmax()
            row += len(toks)
            length[i] = p + a + 1


@torch.inference_mode()
def test_without_slack_rejected_drafts_corrupt_the_window(tiny_dir):
    """The control: the same rollback on rings without slack reads clobbered rows (so the test
    above checks something the slack provides)."""
    cfg = ModelConfig.from_dir(tiny_dir)
    model = DeepseekV4(cfg)
    load_weights(model, tiny_dir)
    g = torch.Generator().manual_seed(5)
    n = 130  # past the window: rows of live positions are one ring turn away from the drafts
    truth = torch.randint(2, cfg.vocab_size, (n + 8,), generator=g).tolist()

    def run(slack):
        cache = KVCache(cfg, CacheShape(1, 1, BLOCKS, 1, ring_slack=slack), model.dtype, "cpu")
        _logits(model, cache, [(0, truth[:n], 0)])
        _logits(model, cache, [(0, [truth[n]] + [1, 1, 1], n)])  # every draft rejected
        return _logits(model, cache, [(0, [truth[n + 1]], n + 1)])[0]

    plain = KVCache(cfg, CacheShape(1, 1, BLOCKS, 1), model.dtype, "cpu")
    _logits(model, plain, [(0, truth[:n + 1], 0)])
    want = _logits(model, plain, [(0, [truth[n + 1]], n + 1)])[0]
    assert (run(K) - want).abs().max().item() < 1e-5
    assert (run(0) - want).abs().max().item() > 1e-3
