import argparse
import os

import pytest
import torch
from safetensors import safe_open

from engine.model.config import ModelConfig
from engine.model.loader import load_weights
from engine.model.deepseek_v4 import DeepseekV4
from demo.train_demo import (
    TrainSettings, add_arguments, batch_loss, batch_losses, export_checkpoint, export_mtp_head, heldout_accuracy,
    init_model, lr_at, make_batch, mtp_logits, step_examples, train, train_mtp_head,
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


def test_joint_loss_trains_the_mtp_head(trained):
    _, _, result = trained
    assert len(result.model.mtp) == 1 and result.cfg.num_mtp_layers == 1
    assert len(result.mtp_losses) == 20
    assert sum(result.mtp_losses[-5:]) / 5 < 0.8 * sum(result.mtp_losses[:3]) / 3


def test_mtp_batch_scores_the_token_after_next(trained):
    settings, _, result = trained
    examples = step_examples(settings.seed, 3, 2, result.tokenizer)
    batch = make_batch(result.cfg, examples)
    mb, row, want_rows, want_targets = batch.mtp_forward, 0, [], []
    assert mb.input_ids.tolist() == [t for ids, _ in examples for t in ids[1:]]
    assert mb.positions.tolist() == [p for ids, _ in examples for p in range(len(ids) - 1)]
    for i, (ids, mask) in enumerate(examples):
        assert batch.mtp_rows[row - i: row - i + len(ids) - 1].tolist() == list(range(row, row + len(ids) - 1))
        want_rows += [row - i + t for t in range(len(ids) - 2) if mask[t + 2]]
        want_targets += [ids[t + 2] for t in range(len(ids) - 2) if mask[t + 2]]
        row += len(ids)
    assert mb.logits_rows.tolist() == want_rows and batch.mtp_targets.tolist() == want_targets


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
    mtp = model.mtp[0]
    for p in (mtp.e_proj.dense, mtp.h_proj.dense, mtp.attn.wq_a.dense, mtp.hc_head.fn, mtp.ffn.experts.gate_up_dense):
        assert p.grad.abs().sum() > 0


def test_mtp_loss_reaches_the_main_model(trained):
    settings, _, result = trained
    model = init_model(result.cfg, seed=2)
    examples = step_examples(settings.seed, 0, 2, result.tokenizer)
    main, mtp = batch_losses(model, make_batch(result.cfg, examples), main=False)
    assert main is None and mtp.requires_grad
    mtp.backward()
    assert model.layers[0].attn.wq_a.dense.grad is None  # main=False: the main model runs without autograd
    assert model.mtp[0].e_proj.dense.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    main, mtp = batch_losses(model, make_batch(result.cfg, examples))
    mtp.backward()  # joint training: the MTP loss's gradient reaches the main layers through the streams
    for block in model.layers:
        assert block.attn.wq_a.dense.grad.abs().sum() > 0
    assert model.head.grad.abs().sum() > 0 and model.embed.grad.abs().sum() > 0


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

    assert dtypes["mtp.0.e_proj.weight"] == dtypes["mtp.0.h_proj.weight"] == torch.float8_e4m3fn
    assert dtypes["mtp.0.attn.wq_a.weight"] == dtypes["mtp.0.ffn.shared_experts.w1.weight"] == torch.float8_e4m3fn
    assert dtypes["mtp.0.ffn.experts.0.w1.weight"] in (torch.int8, torch.uint8)
    assert dtypes["mtp.0.enorm.weight"] == torch.bfloat16 and dtypes["mtp.0.hc_head_fn"] == torch.float32
    cfg = ModelConfig.from_dir(out)
    assert cfg.num_mtp_layers == 1

    examples = step_examples(settings.seed, 99, 2, result.tokenizer)
    loaded = DeepseekV4(cfg, torch.float32)  # without the MTP layer: the loader skips mtp.*
    assert load_weights(loaded, out)["skipped_mtp"] > 0
    with torch.no_grad():
        want = result.model.compute_logits(result.model(*_fwd(result.cfg, examples)))
        got = loaded.compute_logits(loaded(*_fwd(result.cfg, examples)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    with_mtp = DeepseekV4(cfg, torch.float32, mtp=True)
    load_weights(with_mtp, out)
    with torch.no_grad():
        want, got = (_mtp_logits(m, result.cfg, examples) for m in (result.model, with_mtp))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _mtp_logits(model, cfg, examples):
    batch = make_batch(cfg, examples)
    return mtp_logits(model, model.streams(batch.forward, batch.cache), batch)


def _tensors(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_head_only_training_keeps_every_main_tensor(trained, tmp_path):
    settings, work, result = trained
    base, out = str(tmp_path / "base"), str(tmp_path / "with_head")
    export_checkpoint(result.model, work, base)
    head_settings = TrainSettings(seed=3, steps=12, batch_size=2, lr=1e-2, warmup=2, qat_fraction=0.25, threads=1)
    head = train_mtp_head(head_settings, base)
    assert head.losses == [] and len(head.mtp_losses) == 12
    assert sum(head.mtp_losses[-4:]) / 4 < sum(head.mtp_losses[:3]) / 3
    export_mtp_head(head.model, base, out)

    old, new = _tensors(base), _tensors(out)
    main = {k for k in old if not k.startswith("mtp.")}
    assert main == {k for k in new if not k.startswith("mtp.")}
    for k in main:  # byte for byte
        assert old[k].dtype == new[k].dtype and torch.equal(old[k].view(torch.uint8), new[k].view(torch.uint8)), k
    assert {k for k in new if k.startswith("mtp.")} == {k for k in old if k.startswith("mtp.")}
    assert not torch.equal(old["mtp.0.e_proj.weight"].float(), new["mtp.0.e_proj.weight"].float())  # trained anew
    assert ModelConfig.from_dir(out).num_mtp_layers == 1
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(base, name)).read() == open(os.path.join(out, name)).read()
    with pytest.raises(ValueError, match="out_dir"):
        export_mtp_head(head.model, base, base)

    loaded = DeepseekV4(ModelConfig.from_dir(out), torch.float32, mtp=True)
    load_weights(loaded, out)
    examples = step_examples(settings.seed, 98, 2, result.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(_mtp_logits(loaded, result.cfg, examples),
                                   _mtp_logits(head.model, result.cfg, examples), atol=1e-5, rtol=1e-5)
    scores = heldout_accuracy(loaded, result.tokenizer, count=4, batch_size=2)
    assert 0 <= scores["mtp_top1"] <= 1 and 0 <= scores["mtp_agrees_with_main"] <= 1 and scores["mtp_tokens"] > 0


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
    with pytest.raises(ValueError, match="mtp_loss_weight"):
        TrainSettings(mtp_loss_weight=-1.0).validate()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--minutes", "3", "--seed", "5"])
    assert (args.out, args.minutes, args.seed, args.steps) == ("x", 3.0, 5, None)
    assert (args.mtp_loss_weight, args.mtp_head_from) == (TrainSettings.mtp_loss_weight, None)
    args = parser.parse_args(["--out", "x", "--mtp-head-from", "base", "--mtp-loss-weight", "0.1"])
    assert (args.mtp_head_from, args.mtp_loss_weight) == ("base", 0.1)


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
