import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.model.config import ModelConfig
from engine.model.loader import CheckpointError, load_weights
from engine.tiny.make_tiny import make_tiny
from engine.model.deepseek_v4 import DeepseekV4
from tests_util import forward_logits


def _load(d, **kw):
    m = DeepseekV4(ModelConfig.from_dir(d))
    load_weights(m, d, **kw)
    return m


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_official_layout_is_quantized(tiny_dir):
    tensors = load_file(os.path.join(tiny_dir, "model.safetensors"))
    assert tensors["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert tensors["layers.0.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert tensors["layers.1.ffn.experts.0.w1.weight"].dtype == torch.int8
    assert tensors["layers.1.ffn.experts.0.w1.scale"].shape[1] * 32 == tensors["layers.1.ffn.experts.0.w1.weight"].shape[1] * 2
    assert tensors["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    with open(os.path.join(tiny_dir, "config.json")) as f:
        raw = json.load(f)
    assert "compress_ratios" in raw and "num_hash_layers" in raw and raw["expert_dtype"] == "fp4"


def test_sharded_equals_single(tiny_dir, tmp_path):
    sharded = str(tmp_path / "sharded")
    make_tiny(sharded, seed=0, shards=3)
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    ids = list(range(5, 60))
    assert torch.equal(forward_logits(_load(tiny_dir), ids), forward_logits(_load(sharded), ids))


def test_quantized_storage_matches_dequantized(tiny_dir):
    ids = list(range(5, 140))
    lean = _load(tiny_dir, keep_dense=False)
    assert lean.layers[0].attn.wq_a.qweight is not None and lean.layers[0].attn.wq_a.dense.numel() == 0
    torch.testing.assert_close(forward_logits(lean, ids), forward_logits(_load(tiny_dir), ids), rtol=0, atol=0)


def test_transformers_in_memory_names_load(hf_saved_dirs, tmp_path):
    """transformers' module names (self_attn.q_a_proj…, merged experts) load like its files."""
    from hf_reference import build_hf_model

    hf = build_hf_model("A", seed=3)
    d = str(tmp_path / "sd")
    os.makedirs(d)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, os.path.join(d, "model.safetensors"))
    shutil.copy(os.path.join(hf_saved_dirs["A"], "config.json"), d)
    ids = list(range(3, 200))
    # Same weights; float summation order may differ with tensor layout, hence not bit-exact.
    torch.testing.assert_close(forward_logits(_load(d), ids), forward_logits(_load(hf_saved_dirs["A"]), ids),
                               rtol=0, atol=1e-5)


def _rewrite(d, fn):
    path = os.path.join(d, "model.safetensors")
    t = load_file(path)
    fn(t)
    save_file(t, path)


def test_missing_and_unexpected_tensors_are_listed(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "bad")
    _rewrite(d, lambda t: (t.pop("layers.2.attn.compressor.ape"), t.update({"layers.9.attn.wq_z.weight": torch.zeros(2)})))
    with pytest.raises(CheckpointError) as e:
        _load(d)
    msg = str(e.value)
    assert "missing tensors (1): layers.2.attn.compressor.ape" in msg
    assert "unexpected tensors (1): layers.9.attn.wq_z.weight" in msg


def test_shape_mismatch_names_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "shape")
    _rewrite(d, lambda t: t.update({"norm.weight": torch.ones(7, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=r"norm.weight: shape \(7,\) does not match expected \(128,\)"):
        _load(d)


def test_quantized_weight_without_scale(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "noscale")
    _rewrite(d, lambda t: t.pop("layers.0.attn.wkv.scale"))
    with pytest.raises(CheckpointError, match="layers.0.attn.wkv.weight: quantised weight"):
        _load(d)


def test_mtp_tensors_are_skipped(tiny_dir, caplog):
    mtp = [n for n in load_file(os.path.join(tiny_dir, "model.safetensors")) if n.startswith("mtp.")]
    with caplog.at_level("INFO"):
        m = DeepseekV4(ModelConfig.from_dir(tiny_dir))
        report = load_weights(m, tiny_dir)
    assert report["skipped_mtp"] == len(mtp) > 0 and "mtp" in caplog.text


def test_make_tiny_writes_the_mtp_layer_in_the_official_layout(tiny_dir):
    """spec §2.2 / §3.11: ``mtp.0.`` + a sliding-only block (no compressor, non-hash gate with a
    bias) + FP8 ``e_proj``/``h_proj``, ``enorm``/``hnorm``/``norm`` and its own hc head."""
    t = load_file(os.path.join(tiny_dir, "model.safetensors"))
    cfg = ModelConfig.from_dir(tiny_dir)
    D = cfg.hidden_size
    for name in ("e_proj", "h_proj"):
        assert t[f"mtp.0.{name}.weight"].dtype == torch.float8_e4m3fn and t[f"mtp.0.{name}.weight"].shape == (D, D)
        assert t[f"mtp.0.{name}.scale"].dtype == torch.float8_e8m0fnu
    for name in ("enorm", "hnorm", "norm"):
        assert t[f"mtp.0.{name}.weight"].dtype == torch.bfloat16 and t[f"mtp.0.{name}.weight"].shape == (D,)
    assert {f"mtp.0.hc_head_{x}" for x in ("fn", "base", "scale")} <= set(t)
    sliding = next(i for i, r in enumerate(cfg.compress_ratios) if r == 0)
    block = {n[len(f"layers.{sliding}."):]: v for n, v in t.items() if n.startswith(f"layers.{sliding}.")}
    block.pop("ffn.gate.tid2eid", None)  # the first sliding layers are hash layers; the MTP gate is not
    mtp = {n[len("mtp.0."):]: v for n, v in t.items() if n.startswith("mtp.0.")}
    assert set(block) | {"ffn.gate.bias"} <= set(mtp)
    assert all(mtp[n].dtype == v.dtype and mtp[n].shape == v.shape for n, v in block.items())
    assert not any("compressor" in n or "indexer" in n for n in mtp)
    with open(os.path.join(tiny_dir, "config.json")) as f:
        raw = json.load(f)
    assert raw["num_nextn_predict_layers"] == 1 and raw["compress_ratios"][-1] == 0
    assert len(raw["compress_ratios"]) == raw["num_hidden_layers"] + 1


def test_missing_files_are_readable(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        ModelConfig.from_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_dir(str(tmp_path))


def test_expected_names_come_from_the_module_tree():
    """The loader's expected names are derived from the model (no second list): they equal the
    independent writer's official names for sliding/CSA/HCA and hash/score layers, a module added
    to the tree shows up under its path, and a sub-module can be named under a checkpoint prefix."""
    from engine.model.layers import Linear, RMSNorm
    from engine.model.loader import expected_tensors
    from engine.tiny.make_tiny import random_official_tensors, tiny_config

    cfg = tiny_config(1024, num_layers=5, compress_ratios=(0, 4, 128, 4, 128))
    model = DeepseekV4(cfg)
    written = set(random_official_tensors(cfg, 0))
    assert set(expected_tensors(model)) == {n for n in written if not n.startswith("mtp.")}  # the loader skips mtp.*
    extra = torch.nn.Module()
    extra.enorm, extra.e_proj = RMSNorm(8, 1e-6), Linear(8, 4, torch.float32)
    model.mtp = torch.nn.ModuleList([extra])
    names = set(expected_tensors(model))
    assert {"mtp.0.enorm.weight", "mtp.0.e_proj.weight"} <= names
    assert set(expected_tensors(model.layers[2], prefix="layers.2.")) == {
        n for n in random_official_tensors(cfg, 0) if n.startswith("layers.2.")}
