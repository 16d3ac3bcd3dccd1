"""Test-only helpers around transformers' DeepseekV4ForCausalLM, the parity reference."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from engine.model.loader import CheckpointReader
from kernels.quant import fp8_block_dequantize, mxfp4_dequantize

# Two tiny configs that together cover every block: all three layer types, hash + routed MoE,
# hc_mult > 1, o_groups > 1, YaRN on the compress rope, sparse top-k (index_topk < entries).
HF_CONFIGS = {
    "A": dict(
        vocab_size=512, hidden_size=128, moe_intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, head_dim=64, partial_rotary_factor=0.25, q_lora_rank=64,
        o_groups=2, o_lora_rank=32, num_experts_per_tok=2, n_routed_experts=8,
        layer_types=["sliding_attention", "compressed_sparse_attention",
                     "heavily_compressed_attention", "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
        index_n_heads=16, index_head_dim=32, index_topk=16, hc_mult=4,
    ),
    "B": dict(
        vocab_size=384, hidden_size=96, moe_intermediate_size=32, num_hidden_layers=5,
        num_attention_heads=8, head_dim=32, partial_rotary_factor=0.25, q_lora_rank=48,
        o_groups=4, o_lora_rank=16, num_experts_per_tok=3, n_routed_experts=6,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention",
                     "compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe", "moe", "moe"],
        index_n_heads=16, index_head_dim=16, index_topk=24, hc_mult=2, routed_scaling_factor=2.5,
    ),
}


def build_hf_model(name: str, seed: int):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    kw = dict(HF_CONFIGS[name])
    cfg = DeepseekV4Config(
        num_key_value_heads=1, n_shared_experts=1, scoring_func="sqrtsoftplus",
        routed_scaling_factor=kw.pop("routed_scaling_factor", 1.5), sliding_window=128,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        hc_sinkhorn_iters=20, max_position_embeddings=1048576, num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, **kw,
    )
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).eval()
    randomize_constants(model, seed)
    return model


@torch.no_grad()
def randomize_constants(model, seed: int) -> None:
    """transformers initialises sinks, position biases, mHC base/scale, norms and the gate bias
    to constants and tid2eid to zeros; randomise them so wrong code cannot hide behind them."""
    g = torch.Generator().manual_seed(seed + 1)
    n_exp = model.config.n_routed_experts
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("tid2eid"):
            vocab, k = p.shape
            p.copy_(torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(vocab)]))
        elif "inv_freq" in name:
            continue
        elif p.is_floating_point() and p.numel() > 0 and (p.numel() == 1 or float(p.std()) == 0.0):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if name.endswith("sinks") else 0.1))


def official_to_hf_dir(src: str, dst: str) -> str:
    """Dequantise an official-layout checkpoint into a plain fp32 one transformers can load
    (it accepts the official tensor names and legacy config keys)."""
    os.makedirs(dst, exist_ok=True)
    reader = CheckpointReader(src)
    names = set(reader.names())
    out = {}
    for n in names:
        if n.endswith(".scale"):
            continue
        t = reader.get(n)
        scale = n[: -len(".weight")] + ".scale"
        if scale in names:
            s = reader.get(scale)
            t = fp8_block_dequantize(t, s) if t.dtype == torch.float8_e4m3fn else mxfp4_dequantize(t, s)
        out[n] = t.float().contiguous() if t.is_floating_point() else t.contiguous()
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        raw = json.load(f)
    raw.pop("quantization_config", None)
    raw.pop("expert_dtype", None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(raw, f)
    return dst


def load_hf(model_dir: str):
    from transformers import DeepseekV4ForCausalLM

    return DeepseekV4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, use_cache=True)
    return out[0, len(prompt):].tolist()
