"""The one varlen path: N sequences fed together in one step equal each fed alone — for
prefill chunks, follow-up chunks and single decode tokens mixed in one batch."""
import pytest
import torch

from engine.model.config import ModelConfig
from engine.model.deepseek_v4 import DeepseekV4
from engine.model.loader import load_weights
from tests_util import feeds_logits
from engine.worker.kv_cache import CacheShape, KVCache

# Around the window (128), CSA (4) and HCA / c4-block (256) boundaries, and past the top-k.
LENGTHS = [1, 3, 4, 127, 128, 255, 256, 300, 520]
# Second step: a follow-up chunk (several tokens) or a single decode token per sequence.
SECOND = [1, 5, 1, 2, 129, 1, 4, 1, 7]
BLOCKS = 3


def _step(model, cache, feeds: list[tuple[int, list[int], int]]) -> torch.Tensor:
    """One forward over ``feeds`` = [(sequence, tokens, start position)]; logits of every row."""
    return feeds_logits(model, cache, feeds, BLOCKS)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@torch.inference_mode()
def test_sequences_together_equal_each_alone(tiny_dir, kv_cache_dtype):
    cfg = ModelConfig.from_dir(tiny_dir)
    model = DeepseekV4(cfg)
    load_weights(model, tiny_dir)
    g = torch.Generator().manual_seed(7)
    first = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
    second = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in SECOND]
    B = len(LENGTHS)

    def cache():
        return KVCache(cfg, CacheShape(B, B, B * BLOCKS, B), model.dtype, "cpu", kv_cache_dtype=kv_cache_dtype)

    together, alone = cache(), cache()
    for step, tokens in enumerate((first, second)):
        starts = [0 if step == 0 else len(p) for p in first]
        feeds = list(zip(range(B), tokens, starts))
        joint = _step(model, together, feeds)
        single = torch.cat([_step(model, alone, [f]) for f in feeds])
        diff = (joint - single).abs().max().item()
        assert diff < 1e-5, f"step {step}: max |dlogit| {diff:.3g}"
        assert torch.equal(joint.argmax(-1), single.argmax(-1))


@torch.inference_mode()
def test_tiny_workspace_tiles_and_chunks_equal_the_default(tiny_dir, monkeypatch):
    """A workspace so small that every query is its own tile and the indexer merges its running
    top-k over several chunks gives the same logits as the default (one tile, one chunk)."""
    import engine.model.attention as attention

    cfg = ModelConfig.from_dir(tiny_dir)
    model = DeepseekV4(cfg)
    load_weights(model, tiny_dir)
    g = torch.Generator().manual_seed(11)
    lengths = [520, 1, 300, 300]
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    feeds = list(zip(range(len(lengths)), prompts, [0] * len(lengths)))

    def run():
        cache = KVCache(cfg, CacheShape(len(lengths), len(lengths), len(lengths) * BLOCKS, len(lengths)),
                        model.dtype, "cpu")
        return _step(model, cache, feeds)

    default = run()
    monkeypatch.setattr(attention, "WORKSPACE_ELEMENTS", 1 << 12)  # 1-row tiles, 2 indexer chunks at 520
    tiled = run()
    assert (tiled - default).abs().max().item() < 1e-5
    assert torch.equal(tiled.argmax(-1), default.argmax(-1))
