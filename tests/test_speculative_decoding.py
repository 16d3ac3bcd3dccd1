"""Speculative decoding (drafts verified in one forward of the target) must give exactly the
tokens of plain decoding: greedy with k = 1, 2, 3 drafts equals k = 0, under continuous batching
with staggered arrivals, prefix-cache hits, forced preemption, stop tokens and max_tokens inside a
verify chunk, with sampled requests in the same batches; sampled requests keep the target
distribution (chi-squared) and their seeds; the pools are empty afterwards."""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.core.cache_layout import CachePool
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore
from engine.tiny.make_tiny import make_tiny
from engine.worker.spec_decode import SpecCounts, accept_greedy

LENGTHS = [1, 300, 37, 129, 250, 3, 64, 17, 200, 5, 90, 128, 20, 11, 45, 60]


def _prompts(vocab: int, seed: int = 21, lengths=LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def _params(prompts) -> list[SamplingParams]:
    """Mostly greedy with different lengths; a stop token that the tiny models do emit; two
    seeded sampled requests (speculating too: compared only to themselves, see `_greedy`)."""
    params = [SamplingParams(max_tokens=5 + (7 * i) % 20, temperature=0, ignore_eos=True) for i in range(len(prompts))]
    params[3] = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[prompts[3][-1]])
    params[5] = SamplingParams(max_tokens=16, temperature=0.8, seed=7, ignore_eos=True)
    params[9] = SamplingParams(max_tokens=16, temperature=1.0, top_k=20, seed=11, ignore_eos=True)
    return params


def _run(core: EngineCore, prompts, params, tag: str, per_step: int = 4):
    """Staggered arrivals; returns ({index: tokens}, {index: finish reason}, spec counters)."""
    tokens, reasons = {i: [] for i in range(len(prompts))}, {}
    pending = list(range(len(prompts)))
    counts = {"drafts": 0, "draft_tokens": 0, "accepted": 0}
    steps = 0
    while pending or core.has_unfinished():
        for _ in range(per_step):
            if pending:
                i = pending.pop(0)
                core.add_request(f"{tag}{i}", prompts[i], params[i])
        for out in core.step():
            i = int(out.request_id[len(tag):])
            tokens[i] += out.new_token_ids
            if out.finished:
                reasons[i] = out.finish_reason
        s = core.last_step_stats
        counts["drafts"] += s.spec_num_drafts
        counts["draft_tokens"] += s.spec_num_draft_tokens
        counts["accepted"] += s.spec_num_accepted_tokens
        assert sum(s.spec_accepted_per_position) == s.spec_num_accepted_tokens
        steps += 1
        assert steps < 5000
    return tokens, reasons, counts


def _assert_pools_empty(core: EngineCore) -> None:
    assert core.stats()["kv_cache"]["live_fraction"] == 0.0
    core.kv_manager.evict_all_checkpoints()
    core.kv_manager.check_integrity()
    pools = core.stats()["kv_cache"]["pools"]
    assert all(p["live"] == 0 and p["cached"] == 0 for p in pools.values()), pools


SAMPLED = (5, 9)


def _greedy(tokens: dict) -> dict:
    """The greedy requests' tokens (sampled ones draw differently with speculation)."""
    return {i: t for i, t in tokens.items() if i not in SAMPLED}


@pytest.fixture(scope="module")
def second_tiny_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_seed1"))
    make_tiny(d, seed=1)
    return d


@pytest.fixture(scope="module", params=["seed0", "seed1"])
def checkpoint(request, tiny_dir, second_tiny_dir):
    model = tiny_dir if request.param == "seed0" else second_tiny_dir
    prompts = _prompts(1024)
    params = _params(prompts)
    plain = EngineCore(EngineConfig(model=model, max_num_seqs=16, prefix_cache_unit=64))
    want = _run(plain, prompts, params, "p")[:2]
    return model, prompts, params, want


# MTP drafts at every k; n-gram drafts (which random weights accept, unlike their MTP layer) at one.
@pytest.mark.parametrize("k, method", [(1, "mtp"), (2, "mtp"), (3, "mtp"), (2, "ngram")])
def test_greedy_with_k_drafts_equals_plain_decoding(checkpoint, k, method):
    model, prompts, params, (want, want_reasons) = checkpoint
    core = EngineCore(EngineConfig(model=model, max_num_seqs=16, prefix_cache_unit=64, speculative_tokens=k,
                                   speculative_method=method, speculative_max_batch=16))
    got, reasons, counts = _run(core, prompts, params, "s")
    assert _greedy(got) == _greedy(want) and reasons == want_reasons
    assert counts["drafts"] > 0 and 0 <= counts["accepted"] <= counts["draft_tokens"], counts
    if method == "ngram":  # random MTP weights rarely agree with the target; the demo model's do
        assert counts["accepted"] > 0, counts
    # The same prompts again: prefix-cache hits, then verify chunks on top of restored state.
    hits_before = core.kv_manager.prefix_cache.counters()["hit_tokens"]
    again, reasons, _ = _run(core, prompts, params, "h")
    assert core.kv_manager.prefix_cache.counters()["hit_tokens"] > hits_before
    assert _greedy(again) == _greedy(want) and reasons == want_reasons
    _assert_pools_empty(core)


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_speculation_under_forced_preemption(tiny_dir, method):
    # Long prompts (as in test_engine_paths) so that growing sequences run out of blocks.
    prompts = _prompts(1024, seed=4, lengths=[1, 1000, 37, 129, 250, 3, 64, 17, 300, 5, 90, 128, 200, 11, 45, 500])
    params = _params(prompts)
    plain = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=16, prefix_cache_unit=64))
    want = _run(plain, prompts, params, "p", per_step=16)[0]
    probe = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=1, speculative_tokens=2, speculative_method=method))
    per_seq = sum(probe.layout.unit_bytes(p) for p in CachePool if probe.layout.pool_is_used(p))
    core = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=16, max_num_batched_tokens=997, prefix_cache_unit=64,
                                   kv_cache_memory=16 * per_seq, speculative_tokens=2,
                                   speculative_method=method, speculative_max_batch=16))
    got, _, counts = _run(core, prompts, params, "s", per_step=16)
    assert core.stats()["preemptions"] > 0, "the test must really preempt"
    assert counts["accepted"] > 0 if method == "ngram" else counts["drafts"] > 0
    assert _greedy(got) == _greedy(want)
    _assert_pools_empty(core)


def test_no_drafts_above_the_saturation_batch(tiny_dir):
    prompts = _prompts(1024, seed=8)[:6]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)] * 6
    core = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=16, speculative_tokens=3, speculative_max_batch=2))
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, params[i])
    drafted_while_crowded = 0
    while core.has_unfinished():
        running_before = core.scheduler.num_running
        core.step()
        if running_before > 2:
            drafted_while_crowded += core.last_step_stats.spec_num_drafts
    assert drafted_while_crowded == 0


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_llm_speculative_tokens_and_abort_free_the_pools(tiny_dir, method):
    prompts = _prompts(1024, seed=2)[:4]
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in LLM(tiny_dir).generate(prompts, greedy)]
    llm = LLM(tiny_dir, speculative_tokens=3, speculative_method=method)
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == want
    core = llm.engine
    core.add_request("x", prompts[1], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    for _ in range(8):
        core.step()
    core.abort("x")
    core.step()
    _assert_pools_empty(core)


def test_accept_greedy_keeps_the_agreeing_prefix_and_the_target_token():
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accept_greedy([5], [4, 1]) == [4]
    counts = SpecCounts()
    counts.add(3, 2)
    counts.add(2, 0)
    assert (counts.num_drafts, counts.num_draft_tokens, counts.num_accepted_tokens) == (2, 5, 2)
    assert counts.accepted_per_position == [1, 1, 0]


def test_speculative_tokens_is_checked():
    with pytest.raises(ValueError, match="speculative_tokens"):
        EngineConfig(speculative_tokens=-1)
    with pytest.raises(ValueError, match="speculative_method"):
        EngineConfig(speculative_method="eagle")


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


CHI2_DF5_P001 = 20.52  # chi-squared critical value, 5 degrees of freedom, p = 0.001


def _draws(rule, probs, drafts, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [rule(probs, drafts, g) for _ in range(n)]


def test_rejection_sampling_keeps_the_target_distribution():
    """Position by position, the tokens speculation yields follow the target's p: the first token
    ~ p0, the one after an accepted first draft ~ p1, the one after both drafts ~ p2. A rule
    that samples the rejected position from p instead of the residual fails the same test."""
    from engine.worker.spec_decode import _race, accept_sampled

    probs = torch.tensor([[0.30, 0.05, 0.25, 0.10, 0.20, 0.10],
                          [0.10, 0.10, 0.05, 0.15, 0.40, 0.20],
                          [0.20, 0.20, 0.10, 0.30, 0.10, 0.10]])
    drafts = [2, 4]
    n = 30000
    out = _draws(accept_sampled, probs, drafts, n)
    first = torch.bincount(torch.tensor([o[0] for o in out]), minlength=6).float()
    assert _chi2(first, probs[0]) < CHI2_DF5_P001
    second = torch.bincount(torch.tensor([o[1] for o in out if o[0] == drafts[0]]), minlength=6).float()
    assert _chi2(second, probs[1]) < CHI2_DF5_P001
    third = torch.bincount(torch.tensor([o[2] for o in out if o[:2] == drafts]), minlength=6).float()
    assert _chi2(third, probs[2]) < CHI2_DF5_P001
    assert all(1 <= len(o) <= 3 for o in out)

    def wrong(probs, drafts, g):  # rejection resamples from p, not from the residual
        for i, d in enumerate(drafts):
            if torch.rand((), generator=g).item() >= probs[i, d].item():
                return [_race(probs[i], g)]
        return [_race(probs[-1], g)]
    bad = torch.bincount(torch.tensor([o[0] for o in _draws(wrong, probs, drafts, n)]), minlength=6).float()
    assert _chi2(bad, probs[0]) > 5 * CHI2_DF5_P001


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_sampled_requests_speculate_and_stay_reproducible_by_seed(tiny_dir, method):
    prompts = _prompts(1024, seed=6)[:6]
    params = [SamplingParams(max_tokens=32, temperature=0.3, top_k=3, seed=100 + i, ignore_eos=True)
              for i in range(6)]

    def run():
        core = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=8, speculative_tokens=2,
                                       speculative_method=method))
        tokens, _, counts = _run(core, prompts, params, "r")
        _assert_pools_empty(core)
        return tokens, counts
    first, counts = run()
    assert counts["drafts"] > 0 and (counts["accepted"] > 0 or method == "mtp"), counts
    assert run()[0] == first


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_speculation_with_tensor_and_expert_parallel(tiny_dir, method):
    """Verify chunks through the tensor-parallel driver and its worker (rank 0 verifies; with
    MTP every rank runs the MTP passes on its shard)."""
    prompts = _prompts(1024, seed=12)[:6]
    params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)] * 6
    want = _run(EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=8)), prompts, params, "p")[0]
    core = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=8, kv_cache_memory=32 << 20, speculative_tokens=2,
                                   speculative_method=method, tensor_parallel_size=2, enable_expert_parallel=True))
    try:
        got, _, counts = _run(core, prompts, params, "s")
        assert counts["accepted"] > 0 if method == "ngram" else counts["drafts"] > 0
        assert got == want
        _assert_pools_empty(core)
    finally:
        core.shutdown()


def test_logprobs_of_accepted_tokens_equal_plain_decoding(tiny_dir):
    prompts = _prompts(1024, seed=14)[:6]
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=3)] * 6
    plain = LLM(tiny_dir).generate(prompts, params)
    core = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=8, speculative_tokens=3))
    logprobs = {i: [] for i in range(6)}
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, params[i])
    accepted = 0
    while core.has_unfinished():
        for out in core.step():
            assert len(out.logprobs) == len(out.new_token_ids)
            logprobs[int(out.request_id[1:])] += out.logprobs
        accepted += core.last_step_stats.spec_num_accepted_tokens
    assert accepted > 0
    for i, want in enumerate(plain):
        got = logprobs[i]
        assert [t.token_id for t in got] == want.token_ids
        for a, b in zip(got, want.logprobs):
            assert abs(a.logprob - b.logprob) < 1e-5
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) < 1e-5
