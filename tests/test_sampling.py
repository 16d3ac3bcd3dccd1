"""SamplingParams validation and the batched Sampler (greedy, temperature, top-k/top-p, seeds,
logprobs). Everything runs on CPU with fixed seeds, so a failure reproduces."""

import math

import pytest
import torch

from engine.sampling_params import SamplingParams
from engine.worker.sampler import Sampler, make_generator


def _sample_many(logits_row: torch.Tensor, params: SamplingParams, num_draws: int,
                 seed: int = 0) -> torch.Tensor:
    """Draws num_draws tokens for one logits row by batching copies of it (shared generator)."""
    sampler = Sampler(seed=seed)
    logits = logits_row.unsqueeze(0).expand(num_draws, -1).contiguous()
    out = sampler.sample(logits, [params] * num_draws, [None] * num_draws)
    return torch.tensor(out.token_ids)


def _counts(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab_size).float()


# ---------------------------------------------------------------- SamplingParams


def test_defaults_and_stop_string_wrapped():
    params = SamplingParams(stop="###")
    assert params.stop == ["###"]
    assert params.max_tokens == 256 and params.temperature == 1.0 and params.logprobs is None
    assert not params.greedy
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(stop=None).stop == []


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.1}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": [3]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"seed": 1.5}, "seed"),
])
def test_validation_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_boundary_values_are_accepted():
    SamplingParams(temperature=2.0, top_p=1.0, top_k=0, logprobs=20, max_tokens=1,
                   stop=[f"s{i}" for i in range(16)], seed=-5)
    SamplingParams(temperature=0.0, top_p=1e-9, top_k=-1, logprobs=0)


# ---------------------------------------------------------------- greedy


def test_greedy_is_argmax_with_ties_to_lowest_id():
    torch.manual_seed(0)
    logits = torch.randn(5, 64)
    logits[3] = torch.tensor([1.0, 5.0, 5.0, 2.0] + [0.0] * 60)
    params = [SamplingParams(temperature=0.0)] * 5
    out = Sampler(seed=0).sample(logits, params, [None] * 5)
    expected = logits.argmax(dim=-1).tolist()
    assert out.token_ids == expected
    assert out.token_ids[3] == 1
    assert out.logprobs == [None] * 5 and out.top_logprobs == [None] * 5


# ---------------------------------------------------------------- temperature, top-k, top-p


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    temperature = 0.7
    num_draws = 20_000
    tokens = _sample_many(logits, SamplingParams(temperature=temperature), num_draws)
    observed = _counts(tokens, 4)
    expected = torch.softmax(logits / temperature, dim=-1) * num_draws
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    # 3 degrees of freedom: p = 0.001 at 16.27. Ignoring the temperature gives chi-square > 500.
    assert chi_square < 16.27, (observed, expected)


def test_top_k_never_samples_outside_the_k_best():
    torch.manual_seed(1)
    logits = torch.randn(10)
    best3 = set(logits.topk(3).indices.tolist())
    tokens = _sample_many(logits, SamplingParams(temperature=1.5, top_k=3), 5000)
    assert set(tokens.tolist()) == best3


@pytest.mark.parametrize("top_p, kept", [(0.75, {0, 1}), (0.85, {0, 1, 2}), (1e-6, {0})])
def test_top_p_keeps_smallest_set_reaching_top_p(top_p, kept):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    tokens = _sample_many(logits, SamplingParams(top_p=top_p), 5000)
    assert set(tokens.tolist()) == kept


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # After top_k=2 the probabilities are [4/7, 3/7]: top_p=0.5 keeps token 0 only. Applied to
    # the unfiltered [0.4, 0.3, 0.2, 0.1] it would keep tokens 0 and 1.
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    tokens = _sample_many(logits, SamplingParams(top_k=2, top_p=0.5), 2000)
    assert set(tokens.tolist()) == {0}


def test_mixed_batch_applies_each_rows_own_filters():
    torch.manual_seed(2)
    vocab_size, num_copies = 32, 400
    logits = torch.randn(vocab_size)
    rows = [SamplingParams(top_k=2), SamplingParams(temperature=0.0),
            SamplingParams(top_p=1.0, temperature=1.0), SamplingParams(top_k=5, top_p=0.999)]
    params = rows * num_copies
    batch = logits.unsqueeze(0).expand(len(params), -1).contiguous()
    out = Sampler(seed=3).sample(batch, params, [None] * len(params))
    by_kind = [set(out.token_ids[k::len(rows)]) for k in range(len(rows))]
    ranked = logits.argsort(descending=True).tolist()
    assert by_kind[0] == set(ranked[:2])
    assert by_kind[1] == {ranked[0]}
    assert len(by_kind[2]) > 5   # unfiltered: the tail gets sampled too
    assert by_kind[3] <= set(ranked[:5])


# ---------------------------------------------------------------- per-request seeds


def _seeded_run(seed: int, position: int, num_neighbours: int, neighbour_seed: int,
                num_steps: int = 25) -> list[int]:
    """Samples a seeded request for num_steps steps at a given batch position among neighbours."""
    vocab_size = 50
    target_logits = torch.randn(num_steps, vocab_size, generator=torch.Generator().manual_seed(7))
    noise = torch.Generator().manual_seed(neighbour_seed)
    neighbour_params = [SamplingParams(top_k=3), SamplingParams(top_p=0.5, temperature=0.3),
                        SamplingParams(temperature=0.0), SamplingParams(seed=neighbour_seed)]
    target = SamplingParams(seed=seed, temperature=0.9, top_p=0.95)
    generators = {n: make_generator(neighbour_seed + n) for n in range(num_neighbours)}
    target_generator = make_generator(seed)
    sampler = Sampler(seed=neighbour_seed)
    tokens = []
    for step in range(num_steps):
        rows = torch.randn(num_neighbours + 1, vocab_size, generator=noise) * 3
        rows[position] = target_logits[step]
        params, gens = [], []
        for n in range(num_neighbours):
            p = neighbour_params[n % len(neighbour_params)]
            params.append(p)
            gens.append(generators[n] if p.seed is not None else None)
        params.insert(position, target)
        gens.insert(position, target_generator)
        tokens.append(sampler.sample(rows, params, gens).token_ids[position])
    return tokens


def test_seeded_request_is_independent_of_batch_position_and_neighbours():
    alone = _seeded_run(seed=1234, position=0, num_neighbours=0, neighbour_seed=1)
    first = _seeded_run(seed=1234, position=0, num_neighbours=3, neighbour_seed=2)
    middle = _seeded_run(seed=1234, position=2, num_neighbours=5, neighbour_seed=3)
    last = _seeded_run(seed=1234, position=7, num_neighbours=7, neighbour_seed=4)
    assert alone == first == middle == last
    other_seed = _seeded_run(seed=99, position=0, num_neighbours=0, neighbour_seed=1)
    assert other_seed != alone


def test_make_generator_is_reproducible_and_folds_any_integer():
    a = torch.empty(8).exponential_(generator=make_generator(5))
    b = torch.empty(8).exponential_(generator=make_generator(5))
    assert torch.equal(a, b)
    make_generator(-1)
    make_generator(2**70)
    with pytest.raises(ValueError, match="seed"):
        make_generator("5")


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_with_sorted_top_n():
    torch.manual_seed(4)
    logits = torch.randn(3, 40)
    params = [SamplingParams(temperature=0.5, logprobs=5), SamplingParams(),
              SamplingParams(temperature=0.0, logprobs=0)]
    out = Sampler(seed=0).sample(logits, params, [None] * 3)
    reference = torch.log_softmax(logits, dim=-1)

    assert math.isclose(out.logprobs[0], reference[0, out.token_ids[0]].item(), abs_tol=1e-6)
    top = out.top_logprobs[0]
    assert len(top) == 5
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True)
    expected = reference[0].topk(5)
    assert [t for t, _ in top] == expected.indices.tolist()
    assert values == pytest.approx(expected.values.tolist(), abs=1e-6)

    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.top_logprobs[2] == []
    assert math.isclose(out.logprobs[2], reference[2].max().item(), abs_tol=1e-6)


def test_logprobs_larger_than_vocab_returns_whole_vocab():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = Sampler(seed=0).sample(logits, [SamplingParams(logprobs=20)], [None])
    assert [t for t, _ in out.top_logprobs[0]] == [2, 1, 0]


# ---------------------------------------------------------------- input checks


def test_sampler_rejects_mismatched_inputs():
    sampler = Sampler(seed=0)
    with pytest.raises(ValueError, match="params"):
        sampler.sample(torch.zeros(2, 4), [SamplingParams()], [None, None])
    with pytest.raises(ValueError, match="generators"):
        sampler.sample(torch.zeros(2, 4), [SamplingParams()] * 2, [None])
    with pytest.raises(ValueError, match="logits"):
        sampler.sample(torch.zeros(4), [SamplingParams()], [None])


def test_first_argmax_is_argmax_with_ties_nan_and_inf():
    """The greedy pick (max(dim=-1).indices, faster on CPU) keeps argmax's first-index rule."""
    from engine.worker.sampler import first_argmax

    g = torch.Generator().manual_seed(0)
    for vocab in (7, 1024, 4099):
        ties = torch.randint(0, 3, (33, vocab), generator=g).float()
        assert torch.equal(first_argmax(ties), ties.argmax(dim=-1))
        special = torch.randn(8, vocab, generator=g)
        special[:4, [vocab // 3, vocab // 2]] = float("nan")
        special[4:, [vocab // 3, vocab - 1]] = float("inf")
        assert torch.equal(first_argmax(special), special.argmax(dim=-1))
