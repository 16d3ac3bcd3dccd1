"""CacheLayout arithmetic (spec §4.3) and KVCacheManager block tables, checkpoints, budgets."""

from types import SimpleNamespace

import pytest

from engine.core.cache_layout import CacheLayout, CachePool
from engine.core.kv_cache_manager import CacheCopy, KVCacheManager
from engine.core.request import Request

GIB = 2**30
FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4]
PRO_RATIOS = [128, 128] + [4, 128] * 29 + [4]


def v4_layout(ratios, kv_cache_dtype):
    return CacheLayout.from_model(
        ratios, head_dim=512, index_head_dim=128, sliding_window=128, rope_dim=64,
        kv_dtype_bytes=2, kv_cache_dtype=kv_cache_dtype,
    )


# Tiny model: E4 = 16/4 = 4 entries per c4 block, E128 = 128/128 = 1 entry per c128 block.
TINY_RATIOS = [0, 4, 128, 4]


def tiny_layout(ratios=TINY_RATIOS):
    return CacheLayout.from_model(
        ratios, head_dim=8, index_head_dim=4, sliding_window=8, rope_dim=2, kv_dtype_bytes=2,
        c4_block_tokens=16, c128_block_tokens=128,
    )


def tiny_manager(window=8, state=8, c4=64, c128=8, layout=None, **kwargs):
    kwargs.setdefault("unit_interval", 32)
    kwargs.setdefault("hash_page", 8)
    return KVCacheManager(layout or tiny_layout(), window, state, c4, c128, **kwargs)


PARAMS = SimpleNamespace(max_tokens=16, min_tokens=0, ignore_eos=False, stop_token_ids=[])


def make_request(request_id, tokens, salt=""):
    return Request(request_id, list(tokens), PARAMS, eos_token_id=None, arrival_time=0.0, cache_salt=salt)


def advance(manager, request, num_tokens):
    """What the scheduler does around one forward of num_tokens tokens."""
    assert manager.ensure_capacity(request, num_tokens)
    request.num_computed_tokens += num_tokens
    manager.mark_computed(request)


# ---- CacheLayout -------------------------------------------------------------------------


def test_flash_layer_kinds():
    layout = v4_layout(FLASH_RATIOS, "fp8")
    assert layout.num_layers == 43
    assert layout.csa_layers == tuple(range(2, 43, 2))
    assert layout.hca_layers == tuple(range(3, 42, 2))
    assert len(layout.csa_layers) == 21 and len(layout.hca_layers) == 20


def test_pro_layer_kinds():
    layout = v4_layout(PRO_RATIOS, "fp8")
    assert layout.num_layers == 61
    assert len(layout.csa_layers) == 30 and len(layout.hca_layers) == 31
    assert layout.hca_layers[:3] == (0, 1, 3)


def test_fp8_record_sizes():
    layout = v4_layout(FLASH_RATIOS, "fp8")
    assert layout.entry_bytes == 584  # 448 e4m3 + 64 bf16 + 7 scales + 1 pad
    assert layout.index_key_bytes == 68  # 64 packed fp4 + 4 scales
    auto = v4_layout(FLASH_RATIOS, "auto")
    assert (auto.entry_bytes, auto.index_key_bytes) == (1024, 256)


# (ratios, dtype, bytes per token, window bytes, GiB at 1M tokens incl. windows) — spec §4.3.
SPEC_TABLE = [
    (FLASH_RATIOS, "fp8", 3514.25, 43 * 128 * 584, 3.43),
    (FLASH_RATIOS, "auto", 6880, 43 * 128 * 1024, 6.72),
    (PRO_RATIOS, "fp8", 5031.4375, 61 * 128 * 584, 4.92),
    (PRO_RATIOS, "auto", 9848, 61 * 128 * 1024, 9.62),
]


@pytest.mark.parametrize("ratios,dtype,per_token,window,gib_1m", SPEC_TABLE)
def test_spec_table_4_3(ratios, dtype, per_token, window, gib_1m):
    layout = v4_layout(ratios, dtype)
    assert layout.bytes_per_token() == pytest.approx(per_token)
    assert layout.window_slot_bytes == window
    one_million = 2**20
    assert round((layout.bytes_per_token() * one_million + window) / GIB, 2) == gib_1m
    # 1M is a whole number of 256- and 8192-token blocks, so the sequence total is exact.
    assert layout.bytes_for_sequence(one_million) == (
        layout.bytes_per_token() * one_million + window + layout.state_slot_bytes
    )


def test_state_slot_sizes_match_spec():
    # Spec §4.3: Flash ≈ 11.6 MiB, Pro ≈ 17.8 MiB of fp32 compressor state per sequence.
    flash = v4_layout(FLASH_RATIOS, "fp8").state_slot_bytes
    pro = v4_layout(PRO_RATIOS, "fp8").state_slot_bytes
    assert flash == 21 * (2 * 8 * 1024 + 2 * 8 * 256) * 4 + 20 * 2 * 128 * 512 * 4
    assert round(flash / 2**20, 1) == 11.6
    assert round(pro / 2**20, 1) == 17.8


def test_block_sizes_and_uncompressed_comparison():
    layout = v4_layout(FLASH_RATIOS, "fp8")
    assert layout.c4_block_bytes == 21 * 64 * (584 + 68)
    assert layout.c128_block_bytes == 20 * 64 * 584
    uncompressed = layout.num_layers * layout.entry_bytes  # a plain MQA cache: one vector per layer per token
    assert uncompressed == 43 * 584
    assert uncompressed / layout.bytes_per_token() > 7


def test_million_token_flash_sequence_fits_an_80gb_gpu():
    # Flash on 8×H100 (TP8, serving-anchors §1): each GPU holds 1/8 of the 148.66 GB of
    # weights; the single MQA KV head is replicated on every rank; 90 % of memory usable.
    free_kv = int(0.9 * 80e9 - 148.66e9 / 8)
    for dtype in ("fp8", "auto"):
        layout = v4_layout(FLASH_RATIOS, dtype)
        assert layout.bytes_for_sequence(2**20) < free_kv
        manager = KVCacheManager.from_budget(layout, free_kv, max_num_seqs=64)
        assert manager.total_bytes <= free_kv
        assert manager.can_fit_alone(2**20)


def test_block_counts_for_lengths():
    layout = tiny_layout()  # E4 = 4, E128 = 1
    assert [layout.c4_blocks_for(t) for t in (0, 3, 4, 16, 19, 20, 64)] == [0, 0, 1, 1, 1, 2, 4]
    assert [layout.c128_blocks_for(t) for t in (0, 127, 128, 255, 256)] == [0, 0, 1, 1, 2]
    assert layout.max_tokens_for_blocks(2, 1) == min(2 * 16 + 3, 128 + 127)


def test_block_split_into_full_and_tail_blocks():
    split = tiny_layout().block_split(150)  # 37 c4 entries, 1 c128 entry
    assert (split[CachePool.C4].num_full, split[CachePool.C4].has_tail) == (9, True)
    assert split[CachePool.C4].num_blocks == 10
    assert (split[CachePool.C128].num_full, split[CachePool.C128].has_tail) == (1, False)
    no_hca = tiny_layout([0, 4]).block_split(150)
    assert no_hca[CachePool.C128].num_blocks == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"compress_ratios": [0, 3]}, "compress_ratios"),
        ({"compress_ratios": []}, "compress_ratios"),
        ({"kv_cache_dtype": "int8"}, "kv_cache_dtype"),
        ({"rope_dim": 512}, "rope_dim"),
        ({"kv_cache_dtype": "fp8", "index_head_dim": 33}, "even index_head_dim"),
        ({"c4_block_tokens": 250}, "c4_block_tokens"),
        ({"c128_block_tokens": 1000}, "c128_block_tokens"),
        ({"head_dim": 0}, "head_dim"),
    ],
)
def test_layout_rejects_bad_input(kwargs, match):
    args = dict(compress_ratios=FLASH_RATIOS, head_dim=512, index_head_dim=128, sliding_window=128,
                rope_dim=64, kv_dtype_bytes=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        CacheLayout.from_model(**args)


# ---- KVCacheManager: construction and budgets ------------------------------------------------


def test_pools_of_missing_layer_kinds_get_nothing():
    sliding_only = tiny_layout([0, 0])
    manager = tiny_manager(layout=sliding_only, window=2, state=5, c4=5, c128=5)
    assert [manager.pools[p].num_blocks for p in CachePool] == [2, 0, 0, 0]
    request = make_request("r", range(40))
    result = manager.lookup_and_admit(request)
    assert result.block_table.state_slot is None
    advance(manager, request, 40)
    assert manager.block_table("r").c4_blocks == []
    manager.finish(request, cache_output=True)
    manager.check_integrity()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"window": 0}, "num_window_slots"),
        ({"c4": 0}, "num_c4_blocks"),
        ({"c128": -1}, "num_c128_blocks"),
        ({"unit_interval": 30}, "unit_interval"),
        ({"hash_page": 0}, "hash_page"),
        ({"hash_page": 32, "unit_interval": 64}, "c4_block_tokens"),
    ],
)
def test_manager_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_manager(**kwargs)


def test_from_budget_reserves_live_slots_and_splits_blocks_by_growth():
    layout = v4_layout(FLASH_RATIOS, "fp8")
    budget = 20 * 10**9
    manager = KVCacheManager.from_budget(layout, budget, max_num_seqs=16, snapshot_fraction=0.25)
    window = manager.pools[CachePool.WINDOW].num_blocks
    per_seq = (layout.window_slot_bytes + layout.state_slot_bytes
               + layout.c4_block_bytes + layout.c128_block_bytes)
    assert window == 16 + int(0.25 * budget // per_seq)
    assert manager.pools[CachePool.STATE].num_blocks == window
    assert manager.total_bytes <= budget
    assert manager.total_bytes > 0.99 * budget
    # Beyond the per-slot tail blocks, both block pools cover the same number of tokens.
    c4_tokens = (manager.pools[CachePool.C4].num_blocks - window) * layout.c4_block_tokens
    c128_tokens = (manager.pools[CachePool.C128].num_blocks - window) * layout.c128_block_tokens
    assert abs(c4_tokens - c128_tokens) <= layout.c128_block_tokens

    no_cache = KVCacheManager.from_budget(layout, budget, max_num_seqs=16, enable_prefix_cache=False)
    assert no_cache.pools[CachePool.WINDOW].num_blocks == 16
    assert no_cache.pools[CachePool.C4].num_blocks > manager.pools[CachePool.C4].num_blocks


def test_from_budget_rejects_budgets_that_cannot_hold_max_num_seqs():
    layout = v4_layout(FLASH_RATIOS, "fp8")
    with pytest.raises(ValueError, match="budget_bytes"):
        KVCacheManager.from_budget(layout, 10**8, max_num_seqs=64)
    with pytest.raises(ValueError, match="snapshot_fraction"):
        KVCacheManager.from_budget(layout, 10**10, max_num_seqs=1, snapshot_fraction=1.0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        KVCacheManager.from_budget(layout, 10**10, max_num_seqs=0)


# ---- KVCacheManager: live requests -------------------------------------------------------------


def test_blocks_grow_with_the_sequence_one_token_at_a_time():
    manager = tiny_manager(enable_prefix_cache=False)
    layout = manager.layout
    request = make_request("r", range(300))
    result = manager.lookup_and_admit(request)
    assert result.copies == [] and result.miss_reason == "disabled"
    for num_tokens in range(1, 301):
        advance(manager, request, 1)
        table = manager.block_table("r")
        assert len(table.c4_blocks) == layout.c4_blocks_for(num_tokens)
        assert len(table.c128_blocks) == layout.c128_blocks_for(num_tokens)
    assert len(set(table.c4_blocks)) == len(table.c4_blocks)
    manager.check_integrity()
    manager.free(request)
    manager.free(request)  # idempotent
    assert all(pool.num_used == 0 for pool in manager.pools.values())


def test_ensure_capacity_is_all_or_nothing():
    manager = tiny_manager(c4=3, c128=1, enable_prefix_cache=False)
    request = make_request("r", range(300))
    manager.lookup_and_admit(request)
    # 200 tokens need 13 c4 blocks and 1 c128 block: c4 is short, so nothing is taken.
    assert manager.ensure_capacity(request, 200) is False
    assert manager.block_table("r").c4_blocks == []
    assert manager.pools[CachePool.C128].num_free == 1
    assert manager.ensure_capacity(request, 48) is True
    assert len(manager.block_table("r").c4_blocks) == 3
    with pytest.raises(ValueError, match="num_new_tokens"):
        manager.ensure_capacity(request, -1)
    with pytest.raises(ValueError, match="not admitted"):
        manager.ensure_capacity(make_request("other", [1, 2]), 1)


def test_checkpoint_snapshots_tails_and_shares_full_blocks():
    manager = tiny_manager()
    request = make_request("r", range(40))
    manager.lookup_and_admit(request)
    assert manager.ensure_capacity(request, 37)
    table = manager.block_table("r")
    # 37 tokens: 9 c4 entries = 2 full blocks + a tail of 1; no c128 entry yet.
    copies = manager.checkpoint(request, 37)
    assert copies[:2] == [CacheCopy(CachePool.WINDOW, table.window_slot, copies[0].dst),
                          CacheCopy(CachePool.STATE, table.state_slot, copies[1].dst)]
    assert copies[2].pool is CachePool.C4 and copies[2].src == table.c4_blocks[2]
    assert len(copies) == 3
    for block in table.c4_blocks[:2]:
        assert manager.pools[CachePool.C4].ref_count(block) == 2  # table + checkpoint
    assert manager.pools[CachePool.C4].ref_count(table.c4_blocks[2]) == 1  # tail is copied
    manager.check_integrity()
    # Not visible until the step's copies have run.
    assert len(manager.prefix_cache) == 0
    assert manager.checkpoint(request, 37) == []  # same key already planned
    manager.commit_checkpoints()
    assert len(manager.prefix_cache) == 1
    manager.check_integrity()


def test_discarded_checkpoints_release_their_units():
    manager = tiny_manager()
    request = make_request("r", range(40))
    manager.lookup_and_admit(request)
    assert manager.ensure_capacity(request, 37)
    used = {p: pool.num_used for p, pool in manager.pools.items()}
    manager.checkpoint(request, 37)
    manager.discard_pending_checkpoints()
    assert {p: pool.num_used for p, pool in manager.pools.items()} == used
    manager.check_integrity()


def test_finish_transfers_live_units_into_a_checkpoint_without_copies():
    manager = tiny_manager()
    request = make_request("r", range(50))
    manager.lookup_and_admit(request)
    advance(manager, request, 45)
    assert manager.ensure_capacity(request, 8)  # blocks for 53 tokens that will never be computed
    table = manager.block_table("r")
    assert len(table.c4_blocks) == 4
    used_before = {p: pool.num_used for p, pool in manager.pools.items()}
    manager.finish(request, cache_output=True)
    (checkpoint,) = manager.prefix_cache.checkpoints()
    assert checkpoint.num_tokens == 45
    assert checkpoint.window_slot == table.window_slot and checkpoint.state_slot == table.state_slot
    # 45 tokens: 11 c4 entries = 2 full + tail; the 4th block (for 53 tokens) is freed.
    assert checkpoint.full_blocks[CachePool.C4] == table.c4_blocks[:2]
    assert checkpoint.tail_blocks == {CachePool.C4: table.c4_blocks[2]}
    assert manager.pools[CachePool.C4].num_used == used_before[CachePool.C4] - 1
    assert manager.pools[CachePool.WINDOW].num_used == used_before[CachePool.WINDOW]
    with pytest.raises(ValueError, match="holds no cache"):
        manager.block_table("r")
    manager.check_integrity()
    assert manager.evict_all_checkpoints() == 1
    assert all(pool.num_used == 0 for pool in manager.pools.values())


def test_finish_without_caching_frees_everything():
    manager = tiny_manager()
    request = make_request("r", range(50))
    manager.lookup_and_admit(request)
    advance(manager, request, 45)
    manager.finish(request, cache_output=False)
    assert len(manager.prefix_cache) == 0
    assert all(pool.num_used == 0 for pool in manager.pools.values())


def test_identical_prefixes_computed_twice_share_registered_blocks():
    manager = tiny_manager()
    first, second = make_request("a", range(40)), make_request("b", range(40))
    for request in (first, second):
        manager.lookup_and_admit(request)
        advance(manager, request, 32)
    a_blocks = manager.block_table("a").c4_blocks
    b_blocks = manager.block_table("b").c4_blocks
    assert set(a_blocks).isdisjoint(b_blocks)  # computed independently
    manager.checkpoint(second, 32)
    manager.commit_checkpoints()
    (checkpoint,) = manager.prefix_cache.checkpoints()
    assert checkpoint.full_blocks[CachePool.C4] == a_blocks  # the first registered copy, not b's own
    manager.check_integrity()


def test_eviction_frees_lru_checkpoints_for_live_requests():
    manager = tiny_manager(window=3, state=3, c4=6, c128=2)
    old = make_request("old", range(100, 124))
    manager.lookup_and_admit(old)
    advance(manager, old, 20)
    manager.finish(old, cache_output=True)  # checkpoint holds 1 full c4 block + a tail
    assert manager.usage().pools["c4"].cached == 2
    newer = make_request("new", range(200, 300))
    manager.lookup_and_admit(newer)
    assert manager.ensure_capacity(newer, 96)  # needs all 6 c4 blocks
    assert len(manager.prefix_cache) == 0
    assert manager.prefix_cache.num_evictions == 1
    usage = manager.usage()
    assert usage.pools["c4"].live == 6 and usage.pools["c4"].cached == 0
    assert usage.live_fraction == usage.used_fraction
    manager.check_integrity()


def test_make_room_gives_up_without_evicting_when_eviction_cannot_help():
    manager = tiny_manager(window=4, state=4, c4=3, c128=2)
    cached = make_request("cached", range(20))
    manager.lookup_and_admit(cached)
    advance(manager, cached, 8)
    manager.finish(cached, cache_output=True)
    live = make_request("live", range(500, 600))
    manager.lookup_and_admit(live)
    assert manager.ensure_capacity(live, 100) is False  # needs 7 c4 blocks of 3
    assert len(manager.prefix_cache) == 1


def test_a_block_shared_by_two_checkpoints_is_reclaimed_by_evicting_both():
    manager = tiny_manager(window=4, state=4, c4=1, c128=1)
    request = make_request("r", range(20))
    manager.lookup_and_admit(request)
    advance(manager, request, 16)
    manager.checkpoint(request, 16)
    manager.commit_checkpoints()
    advance(manager, request, 1)
    manager.finish(request, cache_output=True)  # unit at 17 shares the one full c4 block
    (block,) = {b for c in manager.prefix_cache.checkpoints() for b in c.full_blocks[CachePool.C4]}
    assert manager.pools[CachePool.C4].ref_count(block) == 2
    other = make_request("other", range(500, 520))
    manager.lookup_and_admit(other)
    assert manager.ensure_capacity(other, 16)
    assert len(manager.prefix_cache) == 0
    manager.check_integrity()


def test_integrity_check_detects_a_leaked_reference():
    manager = tiny_manager()
    request = make_request("r", range(20))
    manager.lookup_and_admit(request)
    advance(manager, request, 16)
    manager.pools[CachePool.C4].incref(manager.block_table("r").c4_blocks[0])
    with pytest.raises(AssertionError, match="holders"):
        manager.check_integrity()


def test_admitting_twice_is_a_value_error():
    manager = tiny_manager()
    request = make_request("r", range(20))
    manager.lookup_and_admit(request)
    with pytest.raises(ValueError, match="already admitted"):
        manager.lookup_and_admit(request)


def test_fp8_layout_of_the_tiny_model_counts_a_partial_scale_block():
    # head_dim 64, rope 16: 48 e4m3 + 32 bf16 bytes + 1 scale (a partial 64-block) → 81 → 88.
    lay = CacheLayout.from_model([0, 4, 128, 4], 64, 32, 128, 16, kv_dtype_bytes=4, kv_cache_dtype="fp8")
    assert lay.entry_bytes == 88 and lay.index_key_bytes == 16 + 1
