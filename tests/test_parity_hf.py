"""Parity with transformers' DeepseekV4ForCausalLM (the reference) on tiny random checkpoints.

Config A: sliding / CSA / HCA / CSA, hash + routed MoE, hc_mult 4, o_groups 2.
Config B: HCA / CSA / sliding / CSA / HCA, 1 hash layer, hc_mult 2, o_groups 4, 3 of 6 experts.
Plus our own official-layout checkpoint (FP8 + MXFP4), compared after dequantisation.
"""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.model.config import ModelConfig
from engine.model.loader import load_weights
from engine.model.deepseek_v4 import DeepseekV4
from hf_reference import hf_greedy, load_hf
from tests_util import forward_logits

LENGTHS = [1, 127, 128, 129, 300, 700]
GREEDY_TOKENS = 32


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def _checkpoints(hf_saved_dirs, tiny_dir, tiny_hf_dir):
    # (our dir, the reference's dir)
    return {"A": (hf_saved_dirs["A"], hf_saved_dirs["A"]), "B": (hf_saved_dirs["B"], hf_saved_dirs["B"]),
            "official": (tiny_dir, tiny_hf_dir)}


@pytest.mark.parametrize("which", ["A", "B", "official"])
def test_logits_match_transformers(which, hf_saved_dirs, tiny_dir, tiny_hf_dir):
    ours_dir, ref_dir = _checkpoints(hf_saved_dirs, tiny_dir, tiny_hf_dir)[which]
    cfg = ModelConfig.from_dir(ours_dir)
    model = DeepseekV4(cfg)
    load_weights(model, ours_dir)
    ref = load_hf(ref_dir)
    for ids in _prompts(cfg.vocab_size, seed=11):
        with torch.no_grad():
            expected = ref(torch.tensor([ids]), use_cache=False).logits[0]
        got = forward_logits(model, ids)
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-4, f"{which}: prompt of {len(ids)} tokens, max |dlogit| = {diff:.3e}"


@pytest.mark.parametrize("which", ["A", "B", "official"])
def test_greedy_tokens_match_transformers(which, hf_saved_dirs, tiny_dir, tiny_hf_dir):
    ours_dir, ref_dir = _checkpoints(hf_saved_dirs, tiny_dir, tiny_hf_dir)[which]
    cfg = ModelConfig.from_dir(ours_dir)
    prompts = _prompts(cfg.vocab_size, seed=12)
    ref = load_hf(ref_dir)
    expected = [hf_greedy(ref, p, GREEDY_TOKENS) for p in prompts]
    # All six prompts in one batched engine run (continuous batching, paged cache).
    llm = LLM(ours_dir, max_num_batched_tokens=256)
    outs = llm.generate(prompts, SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True))
    for p, o, e in zip(prompts, outs, expected):
        assert o.token_ids == e, f"{which}: prompt of {len(p)} tokens diverged"
