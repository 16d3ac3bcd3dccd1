"""Every optimised engine path must give the plain path's tokens: batching, chunked prefill,
staggered arrivals, preemption, prefix-cache hits — and match transformers' generate."""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.engine_config import EngineConfig
from engine.core.cache_layout import CachePool
from engine.engine_core import EngineCore
from hf_reference import hf_greedy, load_hf

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


LOAD_LENGTHS = [1, 1000, 37, 129, 250, 3, 64, 17, 300, 5, 90, 128, 200, 11, 45, 500]


def _prompts(n, vocab, seed=21, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or LOAD_LENGTHS
    return [torch.randint(2, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def _tight_budget(core_cfg_model: str, max_num_seqs: int) -> int:
    """Just above what max_num_seqs live sequences need: growth past it must preempt."""
    probe = EngineCore(EngineConfig(model=core_cfg_model, max_num_seqs=1))
    per_seq = sum(probe.layout.unit_bytes(p) for p in CachePool if probe.layout.pool_is_used(p))
    return int(max_num_seqs * per_seq * 1.09)


def _run_staggered(core: EngineCore, prompts, params, arrivals_per_step=3):
    """Add a few requests per step while others are already running."""
    results = {i: [] for i in range(len(prompts))}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or core.has_unfinished():
        for _ in range(arrivals_per_step):
            if pending:
                i, p = pending.pop(0)
                core.add_request(f"r{i}", p, params)
        for out in core.step():
            results[int(out.request_id[1:])] += out.new_token_ids
        steps += 1
        assert steps < 20000
    return [results[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def reference_outputs(tiny_dir, tiny_hf_dir):
    prompts = _prompts(16, vocab=1024)
    alone = LLM(tiny_dir)
    solo = [alone.generate([p], GREEDY)[0].token_ids for p in prompts]
    hf = load_hf(tiny_hf_dir)
    hf_out = [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]
    return prompts, solo, hf_out


def test_solo_runs_match_transformers(reference_outputs):
    prompts, solo, hf_out = reference_outputs
    for p, a, b in zip(prompts, solo, hf_out):
        assert a == b, f"prompt of {len(p)} tokens"


def test_greedy_parity_odd_chunks_staggered(tiny_dir, reference_outputs):
    prompts, solo, _ = reference_outputs
    # Token budget 37: prefill goes in chunks of 37 (cut at 64-token cache units), decodes
    # ride along, requests arrive three per step.
    core = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=16, max_num_batched_tokens=37,
                                   prefix_cache_unit=64))
    assert _run_staggered(core, prompts, GREEDY) == solo
    assert core.stats()["kv_cache"]["live_fraction"] == 0.0


def test_greedy_parity_under_forced_preemption(tiny_dir, reference_outputs):
    prompts, solo, _ = reference_outputs
    core = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=16, max_num_batched_tokens=997,
                                   kv_cache_memory=_tight_budget(tiny_dir, 16), prefix_cache_unit=64))
    got = _run_staggered(core, prompts, GREEDY, arrivals_per_step=16)
    stats = core.stats()
    assert stats["preemptions"] > 0, "the test must really preempt"
    assert got == solo
    assert stats["kv_cache"]["live_fraction"] == 0.0
    # Only prefix-cache checkpoints hold anything now; evicting them empties every pool.
    core.kv_manager.evict_all_checkpoints()
    core.kv_manager.check_integrity()
    pools = core.stats()["kv_cache"]["pools"]
    assert all(p["live"] == 0 and p["cached"] == 0 for p in pools.values()), pools


def test_batched_without_prefix_cache_no_leak(tiny_dir, reference_outputs):
    prompts, solo, _ = reference_outputs
    core = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=8, max_num_batched_tokens=300,
                                   enable_prefix_cache=False))
    assert _run_staggered(core, prompts, GREEDY, arrivals_per_step=6) == solo
    pools = core.stats()["kv_cache"]["pools"]
    assert all(p["live"] == 0 and p["cached"] == 0 for p in pools.values()), pools


def test_abort_everywhere_frees_kv(tiny_dir):
    core = EngineCore(EngineConfig(model=tiny_dir, max_num_batched_tokens=64, enable_prefix_cache=False))
    prompts = _prompts(6, vocab=1024, seed=5)
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(f"a{i}", p, long)
    core.abort("a0")  # still waiting
    core.step()
    core.abort("a1")  # mid-prefill or just admitted
    for _ in range(30):
        core.step()
    for i in range(2, 6):
        core.abort(f"a{i}")  # mid-decode
    finished = [o for o in core.step() if o.finished]
    assert {o.finish_reason for o in finished} <= {"abort"}
    assert not core.has_unfinished()
    pools = core.stats()["kv_cache"]["pools"]
    assert all(p["live"] == 0 and p["cached"] == 0 for p in pools.values()), pools


def test_prefix_unit_hits_and_partial_miss(tiny_dir):
    llm = LLM(tiny_dir, prefix_cache_unit=64)
    cold = LLM(tiny_dir, enable_prefix_cache=False)
    a = _prompts(1, 1024, seed=7, lengths=[150])[0]
    first = llm.generate([a], GREEDY)[0]
    assert first.num_cached_tokens == 0
    # A+B then A+B+C: the end-of-output unit (all computed tokens) is fully matched.
    follow = a + first.token_ids + [11, 12, 13]
    hit = llm.generate([follow], GREEDY)[0]
    assert hit.num_cached_tokens == len(a) + len(first.token_ids) - 1
    assert hit.token_ids == cold.generate([follow], GREEDY)[0].token_ids
    # End-of-prompt unit (one token short of the end, so the identical prompt hits too).
    same_prompt_more = a + [5, 6, 7, 8]
    hit2 = llm.generate([same_prompt_more], GREEDY)[0]
    assert hit2.num_cached_tokens == len(a) - 1
    assert hit2.token_ids == cold.generate([same_prompt_more], GREEDY)[0].token_ids
    again = llm.generate([a], GREEDY)[0]
    assert again.num_cached_tokens == len(a) - 1 and again.token_ids == first.token_ids
    # A partial match that is not a full unit is a miss back to the last 64-token unit.
    diverge = a[:100] + [9] * 60
    miss = llm.generate([diverge], GREEDY)[0]
    assert miss.num_cached_tokens == 64
    assert miss.token_ids == cold.generate([diverge], GREEDY)[0].token_ids
    reasons = llm.stats()["prefix_cache"]["miss_tokens_by_reason"]
    assert reasons["cold"] >= len(a) and reasons["partial_unit"] > 0


def test_seeded_sampling_independent_of_batch(tiny_dir):
    llm = LLM(tiny_dir)
    p = _prompts(1, 1024, seed=9, lengths=[40])[0]
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate([p], seeded)[0].token_ids
    others = _prompts(5, 1024, seed=10, lengths=[30, 90, 5, 200, 17])
    crowd = llm.generate(others[:2] + [p] + others[2:],
                         [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)] * 2 + [seeded]
                         + [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)] * 3)
    assert crowd[2].token_ids == alone


def test_stop_strings_logprobs_and_lengths(tiny_dir):
    llm = LLM(tiny_dir)
    p = _prompts(1, 1024, seed=3, lengths=[20])[0]
    base = llm.generate([p], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 24
    stop = base.text[5:9]
    assert stop
    cut = llm.generate([p], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == base.text[: base.text.index(stop)]
    lp = llm.generate([p], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=5))[0]
    assert len(lp.logprobs) == 4
    for tok, entry in zip(lp.token_ids, lp.logprobs):
        assert entry.token_id == tok and len(entry.top) == 5 and entry.top[0][0] == tok
