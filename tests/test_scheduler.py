"""Scheduler driven by hand-written sampled tokens (no model): order, budgets, chunking,
stop rules, preemption, aborts, leaks and errors. Integrity is checked after every step."""

from types import SimpleNamespace

import pytest

from engine.core.cache_layout import CacheLayout
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import FinishReason, Request, RequestStatus
from engine.core.scheduler import Scheduler, SchedulerConfig

EOS = 1
UNIT = 32


def layout():
    # E4 = 4 c4 entries (16 tokens) per block, E128 = 1 entry (128 tokens) per block.
    return CacheLayout.from_model([0, 4, 128, 4], head_dim=8, index_head_dim=4, sliding_window=8,
                                  rope_dim=2, kv_dtype_bytes=2, c4_block_tokens=16, c128_block_tokens=128)


def make_scheduler(budget=64, max_num_seqs=4, prefix=False, window=8, state=8, c4=64, c128=8, **config):
    manager = KVCacheManager(layout(), window, state, c4, c128, enable_prefix_cache=prefix,
                             unit_interval=UNIT, hash_page=8)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, **config), manager)


def make_request(request_id, num_prompt=20, max_tokens=4, min_tokens=0, ignore_eos=False,
                 stop_token_ids=(), base=100):
    params = SimpleNamespace(max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=ignore_eos,
                             stop_token_ids=list(stop_token_ids))
    return Request(request_id, list(range(base, base + num_prompt)), params, eos_token_id=EOS,
                   arrival_time=0.0)


def counting_token(request):
    """The n-th output of every request is 1000 + n: lost or repeated tokens show up."""
    return 1000 + request.num_output_tokens


def step(scheduler, token_fn=counting_token):
    out = scheduler.schedule()
    assert out.num_batched_tokens == sum(len(c.token_ids) for c in out.chunks)
    assert out.num_batched_tokens <= scheduler.config.max_num_batched_tokens
    sampled = {c.request_id: token_fn(scheduler.requests[c.request_id]) for c in out.chunks if c.sample}
    deltas = scheduler.update(out, sampled)
    scheduler.kv.check_integrity()
    return out, deltas


def run(scheduler, token_fn=counting_token, max_steps=500):
    outputs, deltas = [], []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return outputs, deltas
        out, new = step(scheduler, token_fn)
        outputs.append(out)
        deltas += new
    raise AssertionError("scheduler did not finish")


def chunk_plan(outputs):
    return [[(c.request_id, c.start_pos, len(c.token_ids)) for c in out.chunks] for out in outputs]


def all_pools_empty(scheduler):
    return all(pool.num_used == 0 for pool in scheduler.kv.pools.values())


# ---- order, budgets, chunking ---------------------------------------------------------------------


def test_fcfs_with_one_slot():
    scheduler = make_scheduler(max_num_seqs=1)
    for name in ("a", "b", "c"):
        scheduler.add_request(make_request(name, max_tokens=2))
    outputs, deltas = run(scheduler)
    finished = [d.request_id for d in deltas if d.finished]
    assert finished == ["a", "b", "c"]
    assert all(len(out.chunks) == 1 for out in outputs)


def test_odd_budget_chunks_and_decode_first():
    scheduler = make_scheduler(budget=37)
    scheduler.add_request(make_request("a", num_prompt=100, max_tokens=3))
    scheduler.add_request(make_request("b", num_prompt=50, max_tokens=2))
    outputs, _ = run(scheduler)
    assert chunk_plan(outputs) == [
        [("a", 0, 37)],
        [("a", 37, 37)],
        [("a", 74, 26), ("b", 0, 11)],
        [("a", 100, 1), ("b", 11, 36)],  # a's decode goes first
        [("a", 101, 1), ("b", 47, 3)],
        [("b", 50, 1)],
    ]
    assert all(out.num_batched_tokens <= 37 for out in outputs)


def test_sample_flag_only_on_chunks_reaching_the_last_token():
    scheduler = make_scheduler(budget=37)
    scheduler.add_request(make_request("a", num_prompt=60, max_tokens=2))
    outputs, deltas = run(scheduler)
    assert [c.sample for out in outputs for c in out.chunks] == [False, True, True]
    assert [d.new_token_ids for d in deltas] == [[1000], [1001]]


def test_prefill_chunks_stop_at_unit_multiples_and_one_token_short_of_the_prompt_end():
    scheduler = make_scheduler(budget=37, prefix=True)
    scheduler.add_request(make_request("a", num_prompt=100, max_tokens=1))
    outputs, _ = run(scheduler)
    # Units at 32, 64, 96 and the prompt unit at 99; the last prompt token goes alone.
    assert chunk_plan(outputs) == [[("a", 0, 32)], [("a", 32, 32)], [("a", 64, 32)], [("a", 96, 3)],
                                   [("a", 99, 1)]]
    assert [bool(out.copies_after) for out in outputs] == [True, True, True, True, False]
    assert [c.sample for out in outputs for c in out.chunks] == [False, False, False, False, True]
    # 100 is the end-of-output unit (prompt + 1 output - 1), kept when the request finished.
    assert sorted(c.num_tokens for c in scheduler.kv.prefix_cache.checkpoints()) == [32, 64, 96, 99, 100]


def test_decode_reaching_a_unit_multiple_checkpoints():
    scheduler = make_scheduler(prefix=True)
    scheduler.add_request(make_request("a", num_prompt=30, max_tokens=6, ignore_eos=True))
    outputs, _ = run(scheduler)
    ends = [c.start_pos + len(c.token_ids) for out in outputs for c in out.chunks]
    assert ends == [29, 30, 31, 32, 33, 34, 35]
    with_copies = [end for end, out in zip(ends, outputs) if out.copies_after]
    assert with_copies == [29, 32]  # the prompt unit, then the decode that reaches 32
    assert sorted(c.num_tokens for c in scheduler.kv.prefix_cache.checkpoints()) == [29, 32, 35]


def test_one_token_prompt_has_no_prompt_unit_and_no_empty_chunk():
    # The prompt unit of a 1-token prompt would sit at 0: nothing to snapshot, nothing to cut.
    scheduler = make_scheduler(prefix=True)
    scheduler.add_request(make_request("a", num_prompt=1, max_tokens=3, ignore_eos=True))
    outputs, _ = run(scheduler)
    assert chunk_plan(outputs) == [[("a", 0, 1)], [("a", 1, 1)], [("a", 2, 1)]]
    assert [c.sample for out in outputs for c in out.chunks] == [True, True, True]
    assert not any(out.copies_after for out in outputs)
    assert [c.num_tokens for c in scheduler.kv.prefix_cache.checkpoints()] == [3]  # end of output only
    # Re-sent, it has no unit to resume from: a unit must leave a token to compute logits from.
    again = make_request("b", num_prompt=1, max_tokens=1)
    scheduler.add_request(again)
    out, _ = step(scheduler)
    assert chunk_plan([out]) == [[("b", 0, 1)]] and out.chunks[0].sample and not out.copies_after
    assert (again.num_cached_tokens, again.miss_reason) == (0, "cold")
    assert not scheduler.has_unfinished()


def test_two_token_prompt_checkpoints_after_its_first_token_and_a_resend_resumes_there():
    scheduler = make_scheduler(prefix=True)
    scheduler.add_request(make_request("a", num_prompt=2, max_tokens=1))
    outputs, _ = run(scheduler)
    assert chunk_plan(outputs) == [[("a", 0, 1)], [("a", 1, 1)]]
    assert [bool(out.copies_after) for out in outputs] == [True, False]
    assert sorted(c.num_tokens for c in scheduler.kv.prefix_cache.checkpoints()) == [1, 2]
    again = make_request("b", num_prompt=2, max_tokens=1)
    scheduler.add_request(again)
    out, _ = step(scheduler)
    assert chunk_plan([out]) == [[("b", 1, 1)]] and out.chunks[0].sample
    assert (again.num_cached_tokens, again.miss_reason) == (1, None)


def test_max_num_seqs_caps_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    for name in ("a", "b", "c"):
        scheduler.add_request(make_request(name, max_tokens=3))
    out, _ = step(scheduler)
    assert [c.request_id for c in out.chunks] == ["a", "b"]
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1
    run(scheduler)


# ---- stop rules ---------------------------------------------------------------------------------


def run_with_tokens(request, tokens):
    scheduler = make_scheduler()
    scheduler.add_request(request)
    feed = iter(tokens)
    _, deltas = run(scheduler, lambda _: next(feed))
    return deltas


def test_eos_stops():
    request = make_request("a", max_tokens=10)
    deltas = run_with_tokens(request, [5, 6, EOS, 7])
    assert request.output_token_ids == [5, 6, EOS]
    assert request.status is RequestStatus.FINISHED_STOPPED
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason is None


def test_ignore_eos_runs_to_max_tokens():
    request = make_request("a", max_tokens=4, ignore_eos=True)
    deltas = run_with_tokens(request, [EOS] * 10)
    assert request.output_token_ids == [EOS] * 4
    assert request.status is RequestStatus.FINISHED_LENGTH and deltas[-1].finish_reason == "length"


def test_min_tokens_delays_eos_and_stop_tokens():
    request = make_request("a", max_tokens=10, min_tokens=3, stop_token_ids=[9])
    run_with_tokens(request, [EOS, 9, 5, EOS])
    assert request.output_token_ids == [EOS, 9, 5, EOS]


def test_stop_token_ids_stop_with_the_token_as_reason():
    request = make_request("a", max_tokens=10, stop_token_ids=[42, 43])
    deltas = run_with_tokens(request, [5, 43, 6])
    assert request.output_token_ids == [5, 43]
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", 43)


def test_max_model_len_finishes_with_length():
    scheduler = make_scheduler(max_model_len=24)
    request = make_request("a", num_prompt=20, max_tokens=None)
    scheduler.add_request(request)
    run(scheduler)
    assert request.num_tokens == 24 and request.finish_reason == "length"


def test_finish_request_for_a_stop_string_caches_the_output():
    scheduler = make_scheduler(prefix=True)
    request = make_request("a", max_tokens=50)
    scheduler.add_request(request)
    for _ in range(3):
        step(scheduler)
    assert scheduler.finish_request("a", "stop", stop_reason="</end>") is request
    assert request.status is RequestStatus.FINISHED_STOPPED and request.stop_reason == "</end>"
    assert request.num_computed_tokens in {c.num_tokens for c in scheduler.kv.prefix_cache.checkpoints()}
    assert not scheduler.has_unfinished()
    assert scheduler.finish_request("a", "stop") is None
    with pytest.raises(ValueError, match="reason"):
        scheduler.finish_request("x", "done")


# ---- preemption ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [False, True])
def test_preemption_with_a_tiny_pool_loses_nothing(prefix):
    # Each request grows to 60 tokens = 4 c4 blocks; 10 blocks cannot hold all three.
    scheduler = make_scheduler(prefix=prefix, c4=10, c128=2)
    requests = [make_request(f"r{i}", num_prompt=n, max_tokens=40, ignore_eos=True, base=100 * i)
                for i, n in enumerate((20, 40, 30))]
    for request in requests:
        scheduler.add_request(request)
    outputs, _ = run(scheduler)
    assert scheduler.stats()["preemptions"] >= 1
    assert any(out.preempted_ids for out in outputs)
    for request in requests:
        assert request.output_token_ids == [1000 + i for i in range(40)]
        assert request.status is RequestStatus.FINISHED_LENGTH
    victim = next(r for r in requests if r.num_preemptions)
    assert victim is requests[-1]  # the most recently arrived goes first
    if prefix:
        assert len(scheduler.kv.prefix_cache) > 0
        scheduler.kv.evict_all_checkpoints()
    assert all_pools_empty(scheduler)


def test_preempted_request_recomputes_prompt_and_outputs_and_can_hit_its_own_checkpoint():
    # Two c128 blocks (128 tokens each). V reaches 256 tokens first and needs a third: its
    # c128 block is shared by its live table, so no checkpoint can be evicted and V (the
    # newer request) is preempted. Its checkpoints below 128 tokens hold no c128 block and
    # survive; once E finishes, V resumes from its prompt unit (119, one token short of its
    # 120-token prompt) instead of from zero.
    scheduler = make_scheduler(prefix=True, window=32, state=32, c4=64, c128=2)
    early = make_request("E", num_prompt=100, max_tokens=200, ignore_eos=True, base=0)
    victim = make_request("V", num_prompt=120, max_tokens=200, ignore_eos=True, base=500)
    scheduler.add_request(early)
    scheduler.add_request(victim)
    outputs, _ = run(scheduler)
    preempted_at = next(i for i, out in enumerate(outputs) if "V" in out.preempted_ids)
    assert outputs[preempted_at].chunks[0].request_id == "E"
    readmitted = next(c for out in outputs[preempted_at + 1:] for c in out.chunks if c.request_id == "V")
    assert readmitted.start_pos == 119  # its own prompt-unit checkpoint
    assert victim.num_preemptions == 1 and victim.num_cached_tokens == 0  # usage: first admission
    # The recompute feeds already generated outputs as tokens, from the prompt unit up to the
    # next unit multiple (128); nothing is lost or repeated.
    assert readmitted.token_ids == victim.all_token_ids[119:128]
    assert early.output_token_ids == victim.output_token_ids == [1000 + i for i in range(200)]


# ---- aborts and leaks --------------------------------------------------------------------------------


def test_abort_while_waiting_mid_prefill_and_mid_decode():
    scheduler = make_scheduler(budget=16, max_num_seqs=2)
    prefill = make_request("prefill", num_prompt=40, max_tokens=5)
    decode = make_request("decode", num_prompt=4, max_tokens=50, base=500)
    waiting = make_request("waiting", max_tokens=5, base=900)
    for request in (decode, prefill, waiting):
        scheduler.add_request(request)
    step(scheduler)  # decode: 4-token prompt; prefill: 12 of 40
    step(scheduler)
    assert decode.num_output_tokens == 2 and 0 < prefill.num_computed_tokens < 40
    for request in (waiting, prefill, decode):
        assert scheduler.abort_request(request.request_id) is request
        assert request.status is RequestStatus.FINISHED_ABORTED
        assert request.finish_reason is FinishReason.ABORT
        scheduler.kv.check_integrity()
    assert scheduler.abort_request("decode") is None
    assert not scheduler.has_unfinished()
    assert scheduler.schedule().is_empty
    assert all_pools_empty(scheduler)


def test_abort_between_schedule_and_update_is_skipped_by_update():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a"))
    out = scheduler.schedule()
    scheduler.abort_request("a")
    assert scheduler.update(out, {"a": 7}) == []
    assert all_pools_empty(scheduler)


def test_no_leaks_with_prefix_cache_off():
    scheduler = make_scheduler(budget=37, max_num_seqs=3)
    for i in range(8):
        scheduler.add_request(make_request(f"r{i}", num_prompt=10 + 13 * i, max_tokens=1 + i % 4, base=50 * i))
    run(scheduler)
    assert all_pools_empty(scheduler)


def test_only_checkpoints_remain_with_prefix_cache_on():
    scheduler = make_scheduler(budget=37, max_num_seqs=3, prefix=True)
    for i in range(8):
        scheduler.add_request(make_request(f"r{i}", num_prompt=10 + 13 * i, max_tokens=1 + i % 4, base=50 * i))
    run(scheduler)
    usage = scheduler.kv.usage()
    assert all(p.live == 0 for p in usage.pools.values())
    assert usage.pools["window"].cached == len(scheduler.kv.prefix_cache) > 0
    scheduler.kv.evict_all_checkpoints()
    assert all_pools_empty(scheduler)


# ---- requests that can never fit -------------------------------------------------------------------


def test_oversized_prompt_errors_instead_of_deadlocking():
    scheduler = make_scheduler(c4=2, c128=1)  # at most 35 tokens
    big = make_request("big", num_prompt=60)
    small = make_request("small", num_prompt=10, max_tokens=2, base=700)
    scheduler.add_request(big)
    scheduler.add_request(small)
    _, deltas = run(scheduler)
    assert big.status is RequestStatus.FINISHED_ERROR
    assert "exceeds the KV cache capacity" in big.stop_reason
    assert deltas[0].request_id == "big" and deltas[0].finish_reason == "error"
    assert small.status is RequestStatus.FINISHED_LENGTH
    assert all_pools_empty(scheduler)


def test_sequence_growing_past_capacity_alone_errors():
    scheduler = make_scheduler(c4=2, c128=1)
    request = make_request("grows", num_prompt=30, max_tokens=100, ignore_eos=True)
    scheduler.add_request(request)
    run(scheduler)
    assert request.status is RequestStatus.FINISHED_ERROR
    assert request.num_computed_tokens <= scheduler.kv.max_num_tokens
    assert all_pools_empty(scheduler)


# ---- interface checks ----------------------------------------------------------------------------------


def test_update_requires_a_token_for_every_sampling_chunk():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a"))
    out = scheduler.schedule()
    with pytest.raises(ValueError, match="sampled"):
        scheduler.update(out, {})
    assert scheduler.requests["a"].num_computed_tokens == 0  # nothing applied


def test_bad_configuration_and_requests_are_value_errors():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="unit_interval"):  # the KV manager owns the prefix-cache knobs
        KVCacheManager(layout(), 8, 8, 64, 8, unit_interval=UNIT + 1, hash_page=8)
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a"))
    with pytest.raises(ValueError, match="already queued"):
        scheduler.add_request(make_request("a"))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        make_request("empty", num_prompt=0)


def test_stats_report_queues_pools_and_prefix_counters():
    scheduler = make_scheduler(max_num_seqs=1, prefix=True)
    scheduler.add_request(make_request("a"))
    scheduler.add_request(make_request("b"))
    step(scheduler)
    stats = scheduler.stats()
    assert (stats["running"], stats["waiting"], stats["preemptions"]) == (1, 1, 0)
    assert stats["kv_cache"]["pools"]["window"]["live"] == 1
    assert stats["prefix_cache"]["query_tokens"] == 20
    assert 0 < stats["kv_cache"]["used_fraction"] <= 1


# ---- verify chunks (speculative decoding) ---------------------------------------------------

def _prefill(scheduler, request):
    scheduler.add_request(request)
    step(scheduler)  # the whole prompt, first token sampled
    assert request.num_computed_tokens == request.num_tokens - 1


def test_verify_chunk_keeps_accepted_drafts_and_rolls_back_the_rest():
    s = make_scheduler()
    r = make_request("a", num_prompt=14, max_tokens=10)
    _prefill(s, r)
    p = r.num_computed_tokens
    r.draft_token_ids = [7, 8, 9]
    out = s.schedule()
    (chunk,) = out.chunks
    assert chunk.token_ids == [r.output_token_ids[-1], 7, 8, 9] and chunk.num_drafts == 3 and chunk.start_pos == p
    assert out.num_batched_tokens == 4 and r.draft_token_ids == []
    # Two drafts accepted, then the target's own token: three new tokens, two of the drafts computed.
    (delta,) = s.update(out, {}, {"a": [7, 8, 55]})
    assert delta.new_token_ids == [7, 8, 55] and not delta.finished
    assert r.output_token_ids[-3:] == [7, 8, 55]
    assert r.num_computed_tokens == p + 3 == r.num_tokens - 1
    s.kv.check_integrity()
    # The next step feeds the target's token at the rolled-back position.
    (chunk,) = s.schedule().chunks
    assert chunk.token_ids == [55] and chunk.start_pos == p + 3


def test_verify_chunk_stops_at_the_first_stop_token_and_at_max_tokens():
    s = make_scheduler()
    r = make_request("a", num_prompt=14, max_tokens=10, stop_token_ids=[8])
    _prefill(s, r)
    r.draft_token_ids = [7, 8, 9]
    out = s.schedule()
    (delta,) = s.update(out, {}, {"a": [7, 8, 9, 10]})
    assert delta.finished and delta.new_token_ids == [7, 8] and delta.stop_reason == 8
    assert r.output_token_ids[-2:] == [7, 8] and "a" not in s.requests
    s2 = make_scheduler()
    r2 = make_request("b", num_prompt=14, max_tokens=3)
    _prefill(s2, r2)
    r2.draft_token_ids = [7, 8, 9]
    (delta,) = s2.update(s2.schedule(), {}, {"b": [7, 8, 9, 10]})
    assert delta.finished and delta.finish_reason == "length" and len(r2.output_token_ids) == 3
    assert s2.kv.usage().live_fraction == 0.0


def test_verify_chunk_drafts_are_cut_to_the_budget_and_bad_results_refused():
    s = make_scheduler(budget=3)
    r = make_request("a", num_prompt=3, max_tokens=10)
    _prefill(s, r)
    r.draft_token_ids = [7, 8, 9, 10]
    out = s.schedule()
    assert out.chunks[0].num_drafts == 2 and out.num_batched_tokens == 3
    for bad in ({}, {"a": []}, {"a": [1, 2, 3, 4]}, {"a": [1, -2]}, {"a": [True]}):
        with pytest.raises(ValueError, match="verified"):
            s.update(out, {}, bad)
