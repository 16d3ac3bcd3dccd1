"""Lightning-indexer top-k: the Triton scorer (interpreted on CPU) against its torch twin, the
running top-k against a brute-force stable sort, and the twin against the model's own indexer.

Triton runs happen in a fresh subprocess with TRITON_INTERPRET=1 (see test_kernel_sink_attention).
"""
import textwrap

import pytest
import torch

import kernels
from tests_util import assert_interpreted_script_passes
from engine.tiny.make_tiny import tiny_config
from engine.worker.kv_cache import CacheShape, KVCache
from kernels.indexer import indexer_scores_torch, indexer_topk
from kernels.kv_records import FP4_KEY, PLAIN


# Pools: 4 entries per block (page boundaries every 4 entries), blocks in a scrambled order,
# tables padded with -1; H=3/5 (not a multiple of the 16-row dot block), plain dim 24 (not a power
# of two), FP4 dim 32 (records of the engine's codec). 37 entries with top-k 5 and chunks of 7
# cross top-k and merge six chunks; visible counts 0, 1, 4 (one page), 37.
SETUP = textwrap.dedent("""
    import torch
    from engine.worker.kv_cache import Fp4IndexKeyCodec
    from kernels.kv_records import FP4_KEY, PLAIN

    def setup(fmt, H, D, seed, ties=False):
        g = torch.Generator().manual_seed(seed)
        E, n_blocks = 4, 14
        keys = torch.randn(n_blocks + 1, E, D, generator=g)
        if ties:  # every key of a block repeated: exact score ties inside a page and across pages
            keys = keys[:, :1].expand(-1, E, -1).clone()
            keys[7] = keys[2]
        pool = Fp4IndexKeyCodec(D).encode(keys) if fmt == FP4_KEY else keys
        tables = torch.full((3, 11), -1, dtype=torch.long)
        tables[0, :10] = torch.tensor([9, 2, 11, 0, 5, 7, 13, 1, 3, 8])
        tables[1, :2] = torch.tensor([4, 6])
        tables[2, :4] = torch.tensor([10, 12, 2, 7])
        seq = torch.tensor([0, 0, 1, 2, 0, 2, 1])
        visible = torch.tensor([37, 1, 0, 13, 4, 16, 8])
        q = torch.randn(7, H, D, generator=g)
        if fmt == FP4_KEY:
            q = Fp4IndexKeyCodec(D).round_trip(q)
        w = torch.randn(7, H, generator=g)
        return q, w, seq, visible, tables, pool
""")

PARITY_SCRIPT = SETUP + textwrap.dedent("""
    import kernels
    from kernels.indexer import indexer_scores_torch, indexer_scores_triton, indexer_topk
    from kernels.sink_attention import INTERPRETED

    assert INTERPRETED, "TRITON_INTERPRET=1 did not reach triton"
    worst = 0.0
    for fmt, H, D, ties in [(PLAIN, 3, 24, False), (FP4_KEY, 5, 32, False), (FP4_KEY, 3, 32, True),
                            (PLAIN, 17, 16, True)]:
        args = setup(fmt, H, D, seed=H + D, ties=ties)
        for c0, c1 in [(0, 37), (5, 12), (36, 37)]:
            a = indexer_scores_torch(*args, fmt, c0, c1)
            b = indexer_scores_triton(*args, fmt, c0, c1)
            assert torch.equal(a.isinf(), b.isinf()), (fmt, c0, c1)
            fin = a.isfinite()
            diff = ((a - b).abs()[fin] / (1 + a.abs()[fin])).max().item()
            assert diff <= 1e-5, (fmt, H, D, c0, c1, diff)
            worst = max(worst, diff)
        # Same ids and validity through the public op, forced to Triton, as through the twin.
        vis = args[3]
        want = indexer_topk(lambda c0, c1: indexer_scores_torch(*args, fmt, c0, c1), 7, vis, 37, 5, 7)
        got = kernels.indexer_topk(*args, fp4=fmt == FP4_KEY, num_entries=37, topk=5, workspace_elements=7 * 7)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (fmt, ties, got, want)
        # Chunking does not change the result (one chunk of everything vs chunks of 7).
        whole = kernels.indexer_topk(*args, fp4=fmt == FP4_KEY, num_entries=37, topk=5, workspace_elements=10**6)
        assert torch.equal(whole[0], got[0]) and torch.equal(whole[1], got[1])
    # Empty and single-query batches.
    q, w, seq, vis, tables, pool = setup(PLAIN, 3, 24, seed=1)
    ids, valid = kernels.indexer_topk(q[:0], w[:0], seq[:0], vis[:0], tables, pool, fp4=False, num_entries=37,
                                      topk=5, workspace_elements=64)
    assert ids.shape == (0, 5) and valid.shape == (0, 5)
    one = kernels.indexer_topk(q[:1], w[:1], seq[:1], vis[:1], tables, pool, fp4=False, num_entries=37, topk=5,
                               workspace_elements=64)
    ref = indexer_topk(lambda c0, c1: indexer_scores_torch(q[:1], w[:1], seq[:1], vis[:1], tables, pool, PLAIN,
                                                           c0, c1), 1, vis[:1], 37, 5, 64)
    assert torch.equal(one[0], ref[0]) and bool(one[1].all())
    print(f"worst={worst:.3g}")
""")


def test_triton_scores_and_topk_match_the_twin_under_interpreter():
    assert_interpreted_script_passes(PARITY_SCRIPT, timeout=300, DSV4_KERNELS="triton")


def _setup(fmt, H, D, seed, ties=False):
    namespace = {}
    exec(SETUP, namespace)
    return namespace["setup"](fmt, H, D, seed, ties)


@pytest.mark.parametrize("fmt,ties", [(PLAIN, False), (FP4_KEY, False), (FP4_KEY, True), (PLAIN, True)])
def test_running_topk_is_the_stable_order_of_all_scores(fmt, ties):
    """The chunked merge == one stable sort of every score: score descending, ties to the lower id."""
    args = _setup(fmt, 3, 32, seed=5, ties=ties)
    vis = args[3]
    full = indexer_scores_torch(*args, fmt, 0, 37)
    order = full.sort(dim=1, descending=True, stable=True).indices[:, :5]
    for chunk in (5, 6, 7, 37):
        # Chunks sliced from the one score matrix: the merge is under test, and equal keys scored in
        # chunks of other widths may round apart by an ulp on some CPUs' vector paths.
        ids, valid = indexer_topk(lambda c0, c1: full[:, c0:c1], 7, vis, 37, 5, chunk)
        assert torch.equal(ids, order), chunk
        assert torch.equal(valid, ids < vis[:, None])
    if ties:  # equal scores really occur, and the lower entry id wins them
        s = full.gather(1, order)
        tied = (s[:, 1:] == s[:, :-1]) & s[:, 1:].isfinite()
        assert bool(tied.any())
        assert bool((order[:, 1:] > order[:, :-1])[tied].all())
    # A query that sees nothing gets no real entry; one that sees 1 entry gets exactly entry 0.
    assert not valid[2].any() and valid[1].tolist() == [True, False, False, False, False] and ids[1, 0] == 0


def test_fewer_entries_than_topk_keeps_them_all_without_scoring():
    args = _setup(PLAIN, 3, 24, seed=2)
    calls = []
    ids, valid = indexer_topk(lambda c0, c1: calls.append(1), 7, args[3], 4, 5, 16)
    assert not calls and ids.shape == (7, 4) and torch.equal(valid, ids < args[3][:, None])


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_twin_matches_the_model_indexer_on_the_cache_pools(kv_cache_dtype):
    """kernels.indexer_topk (torch side) == Indexer.select over KVCache.gather_entries, on the
    engine's own pools (bf16 model, FP4 keys under fp8)."""
    from engine.model.attention import Indexer

    cfg = tiny_config(vocab_size=64)
    shape = CacheShape(num_window_slots=2, num_state_slots=2, num_c4_blocks=5, num_c128_blocks=1,
                       c4_block_tokens=16, c128_block_tokens=256)
    cache = KVCache(cfg, shape, torch.bfloat16, "cpu", kv_cache_dtype=kv_cache_dtype)
    g = torch.Generator().manual_seed(3)
    pool = cache.c4_idx[1]
    tables = torch.tensor([[3, 0, 4, -1], [1, 2, -1, -1]])
    for b, n in ((0, 11), (1, 8)):
        cache.write_entries(pool, [t for t in tables[b].tolist() if t >= 0], 0,
                            torch.randn(n, cfg.index_head_dim, generator=g).bfloat16())
    indexer = Indexer(cfg, cfg.index_n_heads, torch.bfloat16)
    indexer.topk = 5
    seq = torch.tensor([0, 0, 1, 1, 0])
    visible = torch.tensor([11, 6, 8, 2, 0])
    q = torch.randn(5, cfg.index_n_heads, cfg.index_head_dim, generator=g).bfloat16()
    q = kernels.norm_rope(q, None, None, None, eps=0.0, fmt=cache.index_format, norm=False)  # the model's rounding
    w = torch.randn(5, cfg.index_n_heads, generator=g)
    # Each query its own group (n_seqs = Q, one row each): keys read through that query's table.
    want = indexer.select(q, w, visible, 11, lambda c0, c1: cache.gather_entries(
        pool, tables[seq], torch.arange(c0, c1).expand(5, -1)), 5, None)
    got = kernels.indexer_topk(q, w, seq, visible, tables, pool, fp4=kv_cache_dtype == "fp8", num_entries=11,
                               topk=5, workspace_elements=1 << 20)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("bad, param", [
    (dict(q=torch.zeros(2, 16)), "q"),
    (dict(w=torch.zeros(2, 4)), "w"),
    (dict(seq=torch.zeros(2, dtype=torch.int32)), "seq"),
    (dict(visible=torch.zeros(3, dtype=torch.long)), "visible"),
    (dict(tables=torch.zeros(2, dtype=torch.long)), "tables"),
    (dict(pool=torch.zeros(3, 4, 8)), "pool"),
])
def test_bad_arguments_raise_value_error_naming_the_parameter(bad, param):
    args = dict(q=torch.zeros(2, 3, 16), w=torch.zeros(2, 3), seq=torch.zeros(2, dtype=torch.long),
                visible=torch.zeros(2, dtype=torch.long), tables=torch.zeros(1, 2, dtype=torch.long),
                pool=torch.zeros(3, 4, 16))
    args.update(bad)
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        kernels.indexer_topk(*args.values(), fp4=False, num_entries=8, topk=2, workspace_elements=64)
