"""``dsv4 make-tiny``: a tiny random DeepSeek-V4 checkpoint in the *official* layout.

What it writes (same structure as the released checkpoints, at toy sizes):
- ``config.json`` with DeepSeek's legacy keys (``compress_ratios``, ``num_hash_layers``,
  ``qk_rope_head_dim``, flat YaRN ``rope_scaling``, ``quantization_config``, ``expert_dtype``);
- ``model.safetensors`` (or shards + ``model.safetensors.index.json``): FP8 e4m3 attention and
  shared-expert weights with block-128 e8m0 scales, MXFP4 routed experts (packed e2m1 + per-32
  e8m0 scales), BF16 embeddings/norms/compressors, F32 control parameters, int64 ``tid2eid``;
- a byte-level BPE ``tokenizer.json`` trained on a small local corpus, with DeepSeek's special
  tokens, and ``tokenizer_config.json``.

Every parameter that transformers would initialise to a constant (sinks, ``ape``, mHC base and
scale, norms, gate bias) is random here, and ``tid2eid`` holds distinct random experts per
token, so a wrong implementation cannot hide behind constants.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from engine.model.config import ModelConfig, YarnParams

TINY_SHAPE = dict(
    hidden_size=128, num_layers=4, num_heads=4, head_dim=64, rope_dim=16, q_lora_rank=64,
    o_groups=2, o_lora_rank=32, compress_ratios=(0, 4, 128, 4), num_hash_layers=2,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, sliding_window=128,
    index_n_heads=16, index_head_dim=32, index_topk=16,
)


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    shape = {**TINY_SHAPE, **overrides}
    return ModelConfig(
        vocab_size=vocab_size,
        yarn=YarnParams(factor=16.0, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1),
        routed_scaling_factor=1.5,
        swiglu_limit=10.0,
        fp8_block=(128, 128),
        expert_dtype="fp4",
        **{k: tuple(v) if isinstance(v, list) else v for k, v in shape.items()},
    )


def random_official_tensors(cfg: ModelConfig, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Full-precision random weights under official names (no quantisation yet)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, s=std):
        return torch.randn(*shape, generator=g) * s

    def near_one(n):
        return 1.0 + randn(n, s=0.1)

    D, d, hc = cfg.hidden_size, cfg.head_dim, cfg.hc_mult
    t: dict[str, torch.Tensor] = {
        "embed.weight": randn(cfg.vocab_size, D, s=1.0),
        "head.weight": randn(cfg.vocab_size, D, s=0.1),
        "norm.weight": near_one(D),
        "hc_head_fn": randn(hc, hc * D),
        "hc_head_base": randn(hc, s=0.1),
        "hc_head_scale": near_one(1),
    }
    n_mix = (2 + hc) * hc

    def block(p: str, ratio: int, hash_layer: bool) -> None:
        """One decoder block's tensors under prefix ``p`` (the MTP block is a sliding, non-hash one)."""
        t[p + "attn_norm.weight"] = near_one(D)
        t[p + "ffn_norm.weight"] = near_one(D)
        for site in ("attn", "ffn"):
            t[f"{p}hc_{site}_fn"] = randn(n_mix, hc * D)
            t[f"{p}hc_{site}_base"] = randn(n_mix, s=0.1)
            t[f"{p}hc_{site}_scale"] = near_one(3)
        t[p + "attn.wq_a.weight"] = randn(cfg.q_lora_rank, D)
        t[p + "attn.q_norm.weight"] = near_one(cfg.q_lora_rank)
        t[p + "attn.wq_b.weight"] = randn(cfg.num_heads * d, cfg.q_lora_rank)
        t[p + "attn.wkv.weight"] = randn(d, D)
        t[p + "attn.kv_norm.weight"] = near_one(d)
        t[p + "attn.wo_a.weight"] = randn(cfg.o_groups * cfg.o_lora_rank, cfg.num_heads * d // cfg.o_groups)
        t[p + "attn.wo_b.weight"] = randn(D, cfg.o_groups * cfg.o_lora_rank)
        t[p + "attn.attn_sink"] = randn(cfg.num_heads, s=0.5)
        comps = []
        if ratio:
            comps.append(("attn.compressor.", d, 2 if ratio == 4 else 1, ratio))
        if ratio == 4:
            comps.append(("attn.indexer.compressor.", cfg.index_head_dim, 2, ratio))
            t[p + "attn.indexer.wq_b.weight"] = randn(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)
            t[p + "attn.indexer.weights_proj.weight"] = randn(cfg.index_n_heads, D)
        for prefix, width, coff, m in comps:
            t[p + prefix + "wkv.weight"] = randn(coff * width, D)
            t[p + prefix + "wgate.weight"] = randn(coff * width, D)
            t[p + prefix + "ape"] = randn(m, coff * width, s=0.1)
            t[p + prefix + "norm.weight"] = near_one(width)
        E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
        t[p + "ffn.gate.weight"] = randn(E, D)
        if hash_layer:
            t[p + "ffn.gate.tid2eid"] = torch.stack(
                [torch.randperm(E, generator=g)[: cfg.num_experts_per_tok] for _ in range(cfg.vocab_size)]
            ).long()
        else:
            t[p + "ffn.gate.bias"] = randn(E, s=0.1)
        for e in range(E):
            t[f"{p}ffn.experts.{e}.w1.weight"] = randn(I, D)
            t[f"{p}ffn.experts.{e}.w2.weight"] = randn(D, I)
            t[f"{p}ffn.experts.{e}.w3.weight"] = randn(I, D)
        for w, shape in (("w1", (I, D)), ("w2", (D, I)), ("w3", (I, D))):
            t[f"{p}ffn.shared_experts.{w}.weight"] = randn(*shape)

    for i, ratio in enumerate(cfg.compress_ratios):
        block(f"layers.{i}.", ratio, cfg.is_hash_layer(i))
    # The MTP layer (spec §3.11), drawn after the main layers so that their weights do not change.
    block("mtp.0.", 0, False)
    t["mtp.0.e_proj.weight"] = randn(D, D)
    t["mtp.0.h_proj.weight"] = randn(D, D)
    for name in ("enorm", "hnorm", "norm"):
        t[f"mtp.0.{name}.weight"] = near_one(D)
    t["mtp.0.hc_head_fn"] = randn(hc, hc * D)
    t["mtp.0.hc_head_base"] = randn(hc, s=0.1)
    t["mtp.0.hc_head_scale"] = near_one(1)
    return t


# Which official tensors are stored FP8 (block scales) in the released checkpoints.
_FP8_SUFFIXES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight",
                 "attn.wo_b.weight", "attn.indexer.wq_b.weight", "mtp.0.e_proj.weight", "mtp.0.h_proj.weight")
_F32_SUFFIXES = ("hc_head_fn", "hc_head_base", "hc_head_scale", "_fn", "_base", "_scale", "attn_sink", "ape",
                 "gate.bias")


def quantize_official(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Store tensors the way the official checkpoints do (spec §2.2–2.3)."""
    from kernels.quant import fp8_block_quantize, mxfp4_quantize

    out: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        base = name[: -len(".weight")]
        if cfg.fp8_block and (name.endswith(_FP8_SUFFIXES) or ".ffn.shared_experts." in name):
            out[name], out[base + ".scale"] = fp8_block_quantize(w, cfg.fp8_block[0])
        elif ".ffn.experts." in name and cfg.expert_dtype == "fp4":
            out[name], out[base + ".scale"] = mxfp4_quantize(w)
        elif ".ffn.experts." in name and cfg.expert_dtype == "fp8":
            out[name], out[base + ".scale"] = fp8_block_quantize(w, 128)
        elif w.dtype == torch.long or name.endswith(_F32_SUFFIXES):
            out[name] = w.contiguous()
        else:
            out[name] = w.to(torch.bfloat16).contiguous()
    return out


def save_safetensors(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int | None = None) -> None:
    """One ``model.safetensors``, or shards + ``model.safetensors.index.json``."""
    os.makedirs(out_dir, exist_ok=True)
    if not max_shard_bytes:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                   "weight_map": weight_map}, f, indent=1)


def make_tiny(out_dir: str, seed: int = 0, vocab_size: int = 1024, shards: int = 1, **overrides) -> ModelConfig:
    """Write a tiny official-layout checkpoint with its tokenizer; returns its config."""
    from engine.tiny.corpus import tiny_corpus
    from engine.tiny.tokenizer_train import DEEPSEEK_SPECIAL_TOKENS, train_tokenizer

    os.makedirs(out_dir, exist_ok=True)
    tok = train_tokenizer(tiny_corpus(seed), out_dir, vocab_size=vocab_size, special_tokens=DEEPSEEK_SPECIAL_TOKENS)
    cfg = tiny_config(vocab_size=_round_up(tok.vocab_size, 64), bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      **overrides)
    tensors = quantize_official(random_official_tensors(cfg, seed), cfg)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    save_safetensors(tensors, out_dir, max_shard_bytes=(total // shards + 1) if shards > 1 else None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**cfg.to_official_dict(), "num_nextn_predict_layers": 1}, f, indent=2)  # mtp.0.* is written
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "temperature": 1.0, "top_p": 1.0,
                   "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, f, indent=2)
    return cfg


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k
