import argparse
import os

import pytest
import torch
from safetensors import safe_open

from engine.model.config import ModelConfig
from engine.model.loader import load_weights
from engine.model.deepseek_v4 import DeepseekV4
from demo.train_demo import (
    TrainSettings, add_arguments, batch_loss, export_checkpoint, init_model, lr_at, make_batch, step_examples,
    train,
)

# Every layer type (sliding, CSA, HCA) and both MoE kinds, at a size that trains in seconds.
MICRO = dict(
    hidden_size=64, num_layers=3, num_heads=2, head_dim=32, rope_dim=8, q_lora_rank=32, o_groups=2,
    o_lora_rank=16, compress_ratios=(0, 4, 128), num_hash_layers=1, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, sliding_window=64, index_n_heads=4, index_head_dim=16, index_topk=8,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Many small ops: a second thread only adds synchronisation (and stalls on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    settings = TrainSettings(seed=1, steps=20, batch_size=2, lr=5e-3, warmup=3, vocab_size=1000,
                             tokenizer_corpus=200, qat_fraction=0.25, threads=1, shape=tuple(MICRO.items()))
    work = str(tmp_path_factory.mktemp("work"))
    return settings, work, train(settings, work)


def test_loss_decreases(trained):
    _, _, result = trained
    assert result.steps == 20 and len(result.losses) == 20
    assert sum(result.losses[-5:]) / 5 < 0.8 * sum(result.losses[:3]) / 3


def test_gradients_reach_every_layer_type_through_the_cache(trained):
    settings, _, result = trained
    model = init_model(result.cfg, seed=2)
    batch = make_batch(result.cfg, step_examples(settings.seed, 0, 2, result.tokenizer))
    assert max(s.num_tokens for s in batch.forward.seqs) > 128  # the ratio-128 layer compresses
    batch_loss(model, batch).backward()
    for layer in range(result.cfg.num_layers):
        attn = model.layers[layer].attn
        assert attn.wq_a.dense.grad.abs().sum() > 0
        if attn.compressor is not None:  # compressed entries are written to and read from the cache
            assert attn.compressor.wkv.dense.grad.abs().sum() > 0
            assert attn.compressor.ape.grad.abs().sum() > 0
        assert model.layers[layer].hc_attn.fn.grad.abs().sum() > 0
    assert model.embed.grad.abs().sum() > 0
    assert model.layers[1].attn.indexer.wq_b.dense.grad is None  # frozen: top-k passes no gradient


def test_export_is_official_layout_and_reproduces_logits(trained, tmp_path):
    settings, work, result = trained
    out = str(tmp_path / "ckpt")
    export_checkpoint(result.model, work, out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(os.listdir(out))
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes["layers.0.attn.wq_a.weight"] == torch.float8_e4m3fn
    assert dtypes["layers.0.ffn.shared_experts.w1.weight"] == torch.float8_e4m3fn
    assert dtypes["layers.1.ffn.experts.0.w1.weight"] in (torch.int8, torch.uint8)  # MXFP4
    assert dtypes["embed.weight"] == torch.bfloat16 and dtypes["layers.0.ffn.gate.tid2eid"] == torch.int64

    loaded = DeepseekV4(ModelConfig.from_dir(out), torch.float32)
    load_weights(loaded, out)
    examples = step_examples(settings.seed, 99, 2, result.tokenizer)
    with torch.no_grad():
        want = result.model.compute_logits(result.model(*_fwd(result.cfg, examples)))
        got = loaded.compute_logits(loaded(*_fwd(result.cfg, examples)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _fwd(cfg, examples):
    batch = make_batch(cfg, examples)
    return batch.forward, batch.cache


def test_schedule_warms_up_then_decays():
    s = TrainSettings(lr=1e-2, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, s) == pytest.approx(1e-3)
    assert lr_at(9, 100, s) == pytest.approx(1e-2)
    assert lr_at(55, 100, s) < lr_at(20, 100, s)
    assert lr_at(100, 100, s) == pytest.approx(1e-3)


def test_bad_settings_and_cli_arguments():
    with pytest.raises(ValueError, match="steps"):
        TrainSettings(steps=0).validate()
    with pytest.raises(ValueError, match="minutes"):
        TrainSettings(minutes=0).validate()
    with pytest.raises(ValueError, match="qat_fraction"):
        TrainSettings(qat_fraction=2.0).validate()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--minutes", "3", "--seed", "5"])
    assert (args.out, args.minutes, args.seed, args.steps) == ("x", 3.0, 5, None)


def test_eval_greedy_decoding_with_cache_matches_full_recompute(trained):
    from bench.demo_eval import greedy_generate

    settings, _, result = trained
    model = result.model
    long_ids = next(ids for ids, _ in step_examples(settings.seed, 5, 8, result.tokenizer) if len(ids) > 140)
    # Different lengths in one batch; the first crosses the ratio-128 boundary while decoding.
    prompts = [long_ids[:125], long_ids[:37]]
    with torch.no_grad():
        got = greedy_generate(model, prompts, max_new_tokens=6)
        for prompt, (new, _) in zip(prompts, got):
            seq = list(prompt)
            for _ in range(len(new)):
                batch = make_batch(result.cfg, [(seq, [True] * len(seq))])
                batch.forward.logits_rows = [len(seq) - 1]
                seq.append(int(model.compute_logits(model(batch.forward, batch.cache)).argmax(-1)))
            assert seq[len(prompt):] == new
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, prompts, max_new_tokens=0)
