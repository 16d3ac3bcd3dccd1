"""Prefix cache: hash chains, unit hits (DeepSeek semantics), miss reasons, salts, LRU, leaks."""

from types import SimpleNamespace

import pytest

from engine.core.cache_layout import CacheLayout, CachePool
from engine.core.kv_cache_manager import CacheCopy, KVCacheManager
from engine.core.prefix_cache import Checkpoint, HashChain, MissReason, PrefixCache
from engine.core.request import CacheHints, Request
from engine.core.scheduler import Scheduler, SchedulerConfig

PAGE = 8
UNIT = 64


def tiny_scheduler(window=16, state=16, c4=64, c128=8, enable_prefix_cache=True, budget=64):
    # E4 = 4 c4 entries (16 tokens) per block, E128 = 1 entry (128 tokens) per block.
    layout = CacheLayout.from_model([0, 4, 128, 4], head_dim=8, index_head_dim=4, sliding_window=8,
                                    rope_dim=2, kv_dtype_bytes=2, c4_block_tokens=16, c128_block_tokens=128)
    manager = KVCacheManager(layout, window, state, c4, c128, enable_prefix_cache=enable_prefix_cache,
                             unit_interval=UNIT, hash_page=PAGE)
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget)
    return Scheduler(config, manager)


def make_request(request_id, tokens, max_tokens=3, salt="", hints=None):
    params = SimpleNamespace(max_tokens=max_tokens, min_tokens=0, ignore_eos=True, stop_token_ids=[])
    return Request(request_id, list(tokens), params, eos_token_id=None, arrival_time=0.0, cache_salt=salt,
                   cache_hints=hints or CacheHints())


def step(scheduler, token=5):
    out = scheduler.schedule()
    deltas = scheduler.update(out, {c.request_id: token for c in out.chunks if c.sample})
    scheduler.kv.check_integrity()
    return out, deltas


def serve(scheduler, request, token=5):
    """Run one request to completion; returns the first step's output (admission)."""
    scheduler.add_request(request)
    first, _ = step(scheduler, token)
    while scheduler.has_unfinished():
        step(scheduler, token)
    return first


A = list(range(1000, 1040))  # 40 tokens: 5 whole pages
B = list(range(2000, 2010))
C = list(range(3000, 3007))


# ---- hash chain --------------------------------------------------------------------------------


def test_hash_chain_is_deterministic_incremental_and_salted():
    tokens = list(range(32))
    one_shot = HashChain("", PAGE)
    one_shot.extend(tokens)
    pieces = HashChain("", PAGE)
    pieces.extend(tokens[:8])
    pieces.extend_to(tokens, 30)  # hashes whole pages only: 3 so far
    assert pieces.num_pages == 3
    pieces.extend(tokens[24:])
    assert [pieces.value(k) for k in range(5)] == [one_shot.value(k) for k in range(5)]
    salted = HashChain("user-1", PAGE)
    salted.extend(tokens)
    assert all(salted.value(k) != one_shot.value(k) for k in range(5))
    changed = HashChain("", PAGE)
    changed.extend(tokens[:8] + [99] + tokens[9:])
    assert changed.value(1) == one_shot.value(1) and changed.value(2) != one_shot.value(2)


def test_hash_chain_rejects_bad_input():
    with pytest.raises(ValueError, match="page_size"):
        HashChain("", 0)
    chain = HashChain("", PAGE)
    with pytest.raises(ValueError, match="whole pages"):
        chain.extend([1, 2, 3])
    with pytest.raises(ValueError, match="token ids"):
        chain.extend([-1] * PAGE)


# ---- PrefixCache index on its own --------------------------------------------------------------


def insert(cache, tokens, num_tokens, salt=""):
    chain = cache.new_chain(salt)
    chain.extend_to(tokens, num_tokens)
    anchor = num_tokens // PAGE * PAGE
    checkpoint = Checkpoint(cache.make_key(chain, num_tokens, tokens[anchor:num_tokens]), window_slot=0,
                            state_slot=0)
    cache.insert(checkpoint, chain, now=0.0)
    return checkpoint


def test_lookup_takes_the_longest_whole_unit_within_max_tokens():
    cache = PrefixCache(PAGE)
    tokens = list(range(100))
    short, mid, long = (insert(cache, tokens, n) for n in (16, 21, 37))
    assert cache.lookup(tokens, "", 99) == (long, None)
    assert cache.lookup(tokens, "", 36) == (mid, None)  # 37 is past max_tokens
    assert cache.lookup(tokens, "", 20) == (short, None)
    changed = tokens[:20] + [7] + tokens[21:]  # breaks the tail of the 21-token unit
    assert cache.lookup(changed, "", 36) == (short, None)


def test_miss_reasons():
    cache = PrefixCache(PAGE)
    tokens = list(range(100))
    assert cache.lookup(tokens, "", 99) == (None, MissReason.COLD)
    unit = insert(cache, tokens, 40)
    other_tail = tokens[:24] + [5] * 30
    assert cache.lookup(other_tail, "", 53) == (None, MissReason.PARTIAL_UNIT)
    assert cache.lookup(tokens, "other salt", 99) == (None, MissReason.COLD)
    cache.remove(unit, evicted=True)
    assert cache.lookup(tokens, "", 99) == (None, MissReason.EVICTED)
    assert PrefixCache(PAGE, enabled=False).lookup(tokens, "", 99) == (None, MissReason.DISABLED)
    again = insert(cache, tokens, 40)  # re-created: no longer reported as evicted
    assert cache.lookup(tokens, "", 99) == (again, None)
    cache.check_integrity()


def test_reason_for_the_tokens_after_a_hit():
    cache = PrefixCache(PAGE)
    tokens = list(range(100))
    short, long = insert(cache, tokens, 16), insert(cache, tokens, 40)
    chain = cache.new_chain("")
    diverging = tokens[:30] + [7] * 20  # shares 30 tokens, hits only the 16-token unit
    assert cache.lookup(diverging, "", 49, chain) == (short, None)
    assert cache.uncached_reason(diverging, chain, 16, 49) is MissReason.PARTIAL_UNIT
    cache.remove(long, evicted=True)
    chain = cache.new_chain("")
    assert cache.lookup(tokens, "", 99, chain) == (short, None)
    assert cache.uncached_reason(tokens, chain, 16, 99) is MissReason.EVICTED
    chain = cache.new_chain("")
    fresh = tokens[:16] + [7] * 20  # diverges right at the unit: the rest is new
    assert cache.lookup(fresh, "", 35, chain) == (short, None)
    assert cache.uncached_reason(fresh, chain, 16, 35) is MissReason.COLD


def test_sharing_less_than_a_page_is_cold():
    cache = PrefixCache(PAGE)
    insert(cache, [1] + list(range(100, 140)), 41)  # both prompts start with a BOS-like 1
    assert cache.lookup([1] + list(range(500, 540)), "", 40) == (None, MissReason.COLD)


def test_evicted_keys_are_bounded():
    cache = PrefixCache(PAGE, max_evicted_keys=2)
    prompts = [[i] * 16 for i in range(3)]
    for checkpoint in [insert(cache, p, 16) for p in prompts]:
        cache.remove(checkpoint, evicted=True)
    assert cache.num_evictions == 3
    # The oldest evicted key is forgotten; its pages are still known, so only a partial match.
    assert cache.lookup(prompts[0] + [1], "", 16)[1] is MissReason.PARTIAL_UNIT
    assert cache.lookup(prompts[2] + [1], "", 16)[1] is MissReason.EVICTED


# ---- unit hits through the scheduler ------------------------------------------------------------


def unit_lengths(scheduler):
    return sorted(c.num_tokens for c in scheduler.kv.prefix_cache.checkpoints())


def test_a_plus_b_then_a_plus_b_plus_c_hits_the_prompt_unit_of_a_plus_b_with_restores():
    scheduler = tiny_scheduler()
    serve(scheduler, make_request("first", A + B))
    # The prompt unit (49) and the end-of-output unit (50 + 3 outputs - 1 = 52, ending in two
    # sampled 5s that A + B + C does not continue with).
    assert unit_lengths(scheduler) == [49, 52]
    unit = next(c for c in scheduler.kv.prefix_cache.checkpoints() if c.num_tokens == 49)

    second = make_request("second", A + B + C)
    out = serve(scheduler, second)
    assert second.num_cached_tokens == len(A + B) - 1 == 49
    assert second.miss_reason is None
    (chunk,) = out.chunks
    # From the hit up to the second request's own prompt unit (56), checkpointed after it.
    assert chunk.start_pos == 49 and chunk.token_ids == (A + B + C)[49:56] and not chunk.sample
    assert out.copies_after
    table = chunk.block_table
    # 49 tokens: 12 c4 entries = 3 full blocks (shared) and no tail; no c128 entry.
    assert unit.tail_blocks == {}
    assert table.c4_blocks[:3] == unit.full_blocks[CachePool.C4]
    assert out.copies_before == [
        CacheCopy(CachePool.WINDOW, unit.window_slot, table.window_slot),
        CacheCopy(CachePool.STATE, unit.state_slot, table.state_slot),
    ]


def test_hit_with_a_partial_tail_block_copies_it():
    scheduler = tiny_scheduler()
    prefix = A + B[:5]  # prompt unit at 44 tokens: 11 c4 entries = 2 full + a tail of 3
    serve(scheduler, make_request("first", prefix))
    second = make_request("second", prefix + C)
    out = serve(scheduler, second)
    assert second.num_cached_tokens == 44
    unit = next(c for c in scheduler.kv.prefix_cache.checkpoints() if c.num_tokens == 44)
    table = out.chunks[0].block_table
    assert table.c4_blocks[:2] == unit.full_blocks[CachePool.C4]
    assert CacheCopy(CachePool.C4, unit.tail_blocks[CachePool.C4], table.c4_blocks[2]) in out.copies_before
    assert unit.tail_blocks[CachePool.C4] not in table.c4_blocks


def test_a_plus_b_then_a_plus_c_is_a_partial_unit_miss():
    scheduler = tiny_scheduler()
    serve(scheduler, make_request("first", A + B))
    second = make_request("second", A + C)
    out = serve(scheduler, second)
    assert second.num_cached_tokens == 0
    assert second.miss_reason == "partial_unit"
    assert out.copies_before == [] and out.chunks[0].start_pos == 0


def test_next_turn_hits_the_end_of_output_unit():
    scheduler = tiny_scheduler()
    first = make_request("turn1", A + B, max_tokens=4)
    serve(scheduler, first, token=9)
    assert first.output_token_ids == [9] * 4
    # The last sampled token was never fed, so the end-of-output unit is prompt + 3 outputs;
    # it is longer than the prompt unit (49), so the next turn resumes from it.
    assert unit_lengths(scheduler) == [len(A + B) - 1, len(A + B) + 3]
    second = make_request("turn2", first.all_token_ids + C)
    serve(scheduler, second)
    assert second.num_cached_tokens == len(A + B) + 3


@pytest.mark.parametrize(
    ("prompt_len", "units"),
    [
        (50, [49, 52]),  # shorter than one unit interval: previously no hit at all
        (65, [64, 67]),  # the prompt unit coincides with the unit multiple
        (77, [64, 76, 79]),  # previously the 64-token unit was the hit
    ],
)
def test_resent_identical_prompt_hits_all_but_its_last_token(prompt_len, units):
    scheduler = tiny_scheduler()
    prompt = list(range(5000, 5000 + prompt_len))
    serve(scheduler, make_request("first", prompt))
    # Units: multiples of 64 the prefill crossed, the prompt unit, the end of output.
    assert unit_lengths(scheduler) == units
    again = make_request("again", prompt)
    out = serve(scheduler, again)
    assert (again.num_cached_tokens, again.miss_reason) == (prompt_len - 1, None)
    # Only the last prompt token is computed, and its logits give the first output.
    (chunk,) = out.chunks
    assert (chunk.start_pos, chunk.token_ids, chunk.sample) == (prompt_len - 1, prompt[-1:], True)
    assert out.copies_after == []
    assert unit_lengths(scheduler) == units  # same outputs: its end-of-output unit deduplicates
    assert scheduler.stats()["prefix_cache"]["hit_tokens"] == prompt_len - 1


def test_cache_salt_isolates_users():
    scheduler = tiny_scheduler()
    serve(scheduler, make_request("alice-1", A + B, salt="alice"))
    bob = make_request("bob", A + B + C, salt="bob")
    serve(scheduler, bob)
    assert (bob.num_cached_tokens, bob.miss_reason) == (0, "cold")
    alice = make_request("alice-2", A + B + C, salt="alice")
    serve(scheduler, alice)
    assert (alice.num_cached_tokens, alice.miss_reason) == (len(A + B) - 1, None)


def test_prefix_counters_count_tokens():
    scheduler = tiny_scheduler()
    serve(scheduler, make_request("first", A + B))
    serve(scheduler, make_request("second", A + B + C))
    serve(scheduler, make_request("third", A + C))
    stats = scheduler.stats()["prefix_cache"]
    assert stats["query_tokens"] == 50 + 57 + 47
    assert stats["hit_tokens"] == 49  # the second resumed from the first's prompt unit
    # Reasons per token: the hit's 8 new tokens (B's last and C) are cold; the third shares
    # A's 40 tokens with cached prefixes (partial_unit), its 7 tokens of C are cold. Every
    # queried token is a hit or a miss with a reason.
    assert stats["miss_tokens_by_reason"] == {"disabled": 0, "cold": 50 + 8 + 7, "partial_unit": 40,
                                              "evicted": 0}
    assert stats["miss_tokens"] == 50 + 8 + 47


def test_disabled_cache_reports_disabled_and_keeps_nothing():
    scheduler = tiny_scheduler(enable_prefix_cache=False)
    serve(scheduler, make_request("first", A + B))
    second = make_request("second", A + B + C)
    serve(scheduler, second)
    assert (second.num_cached_tokens, second.miss_reason) == (0, "disabled")
    assert all(pool.num_used == 0 for pool in scheduler.kv.pools.values())


def test_eviction_takes_superseded_units_first_then_lru_and_reports_evicted_per_token():
    # 5 window slots: one live request + four checkpoints. With max_tokens=1 every 20-token
    # prompt leaves two units: its prompt unit (19), superseded by its end-of-output unit (20).
    scheduler = tiny_scheduler(window=5, state=5)
    prompts = {base: list(range(base, base + 20)) for base in (100, 200, 300, 400)}

    def units():
        """(prompt base, length, kind) of every checkpoint, least recently used first."""
        return [(c.key.tail[0] - 16, c.num_tokens, c.kind.value) for c in scheduler.kv.prefix_cache.checkpoints()]

    for base in (100, 200):
        serve(scheduler, make_request(f"r{base}", prompts[base], max_tokens=1))
    assert units() == [(100, 19, "superseded"), (100, 20, "leaf"), (200, 19, "superseded"), (200, 20, "leaf")]
    # Re-sending prompt 100 hits its prompt unit and moves it to the back; its end-of-output
    # unit already exists, so the re-send adds nothing.
    again = make_request("r100-again", prompts[100], max_tokens=1)
    serve(scheduler, again)
    assert again.num_cached_tokens == 19
    assert [u[:2] for u in units()] == [(100, 20), (200, 19), (200, 20), (100, 19)]
    assert scheduler.kv.prefix_cache.num_evictions == 0
    # r300 takes the free slot; its prompt-unit snapshot evicts the least recently used
    # *superseded* unit, (200, 19) — not the older leaf (100, 20).
    serve(scheduler, make_request("r300", prompts[300], max_tokens=1))
    assert [u[:2] for u in units()] == [(100, 20), (200, 20), (100, 19), (300, 19), (300, 20)]
    # r400 needs two slots: the two remaining superseded units go, every leaf stays.
    serve(scheduler, make_request("r400", prompts[400], max_tokens=1))
    assert [u[:2] for u in units()] == [(100, 20), (200, 20), (300, 20), (400, 19), (400, 20)]
    evictions = scheduler.kv.prefix_cache.evictions
    assert evictions == {("window", "superseded"): 3}

    # Prompt 200 plus two tokens hits its end-of-output unit (20); prompt 300's first 19
    # tokens plus others: the 19-token unit was evicted, so those tokens are `evicted`
    # misses, the rest cold — reasons are counted per token.
    stats_before = scheduler.stats()["prefix_cache"]["miss_tokens_by_reason"]
    partly = make_request("q300", prompts[300][:19] + [1, 2, 3])
    serve(scheduler, partly)
    assert (partly.num_cached_tokens, partly.miss_reason) == (0, "evicted")
    after = scheduler.stats()["prefix_cache"]["miss_tokens_by_reason"]
    moved = {reason: after[reason] - stats_before[reason] for reason in after if after[reason] != stats_before[reason]}
    assert moved == {"evicted": 19, "cold": 3}


def test_a_unit_several_sessions_hit_outlives_leaves():
    # 4 window slots: one live request + three checkpoints. A shared 17-token "system" unit
    # (a hint) is hit by sessions that continue differently: it becomes shared and survives.
    scheduler = tiny_scheduler(window=4, state=4)
    system = list(range(500, 517))

    def session(i):
        return make_request(f"s{i}", system + list(range(600 + 10 * i, 605 + 10 * i)), max_tokens=1,
                            hints=CacheHints(unit_ends=(len(system),), keep_output=False))

    serve(scheduler, session(0))
    serve(scheduler, session(1))  # hits the 17-token unit with a new continuation
    shared = next(c for c in scheduler.kv.prefix_cache.checkpoints() if c.num_tokens == len(system))
    assert shared.kind.value == "shared"
    # Unrelated prompts now fill the cache; the shared unit is the least recently used one,
    # yet only leaves are evicted.
    for i in range(4):
        serve(scheduler, make_request(f"other{i}", list(range(700 + 30 * i, 720 + 30 * i)), max_tokens=1))
    assert scheduler.kv.prefix_cache.checkpoints()[0] is shared
    evictions = scheduler.kv.prefix_cache.evictions
    assert sum(evictions.values()) >= 4 and all(kind != "shared" for _, kind in evictions)
    late = session(9)
    serve(scheduler, late)
    assert late.num_cached_tokens == len(system)


def test_hinted_unit_and_no_end_of_output_unit():
    scheduler = tiny_scheduler()
    request = make_request("r", A + B, max_tokens=3, hints=CacheHints(unit_ends=(21, 200), keep_output=False))
    out = serve(scheduler, request)
    assert out.chunks[0].token_ids == (A + B)[:21]  # the first chunk stops at the hint
    # Units: the hint (21), the prompt unit (49); no end-of-output unit, 200 is past the prompt.
    assert unit_lengths(scheduler) == [21, 49]


def test_abort_leaves_only_checkpoints_and_evicting_them_empties_every_pool():
    scheduler = tiny_scheduler(budget=32)
    request = make_request("long", list(range(200)), max_tokens=50)
    scheduler.add_request(request)
    for _ in range(5):  # 160 tokens prefilled: units at 64 and 128 were checkpointed
        step(scheduler)
    assert scheduler.abort_request("long") is request
    assert request.status.is_finished and request.finish_reason == "abort"
    usage = scheduler.kv.usage()
    assert all(p.live == 0 for p in usage.pools.values())
    assert {c.num_tokens for c in scheduler.kv.prefix_cache.checkpoints()} == {64, 128}
    scheduler.kv.check_integrity()
    scheduler.kv.evict_all_checkpoints()
    assert all(pool.num_used == 0 for pool in scheduler.kv.pools.values())
    scheduler.kv.check_integrity()
