import json

import pytest

from engine.model.config import ConfigError, ModelConfig

OFFICIAL_FLASH = {  # V4-Flash's config.json (official spelling), spec §1.1
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
    "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
    "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
    "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "compress_rope_theta": 160000, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
    "num_hash_layers": 3, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hidden_act": "silu", "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
    "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    "transformers_version": "4.57.1",
}


def test_official_flash_config():
    cfg = ModelConfig.from_dict(OFFICIAL_FLASH)
    assert cfg.num_layers == 43 and len(cfg.compress_ratios) == 43  # MTP entry dropped
    assert len(cfg.csa_layers) == 21 and len(cfg.hca_layers) == 20
    assert cfg.compress_ratios[:2] == (0, 0) and cfg.rope_dim == 64 and cfg.num_hash_layers == 3
    assert cfg.yarn.factor == 16 and cfg.fp8_block == (128, 128) and cfg.expert_dtype == "fp4"


def test_transformers_spelling_matches_official(hf_saved_dirs):
    with open(f"{hf_saved_dirs['A']}/config.json") as f:
        raw = json.load(f)
    cfg = ModelConfig.from_dict(raw)
    assert cfg.compress_ratios == (0, 4, 128, 4) and cfg.num_hash_layers == 2
    assert cfg.rope_dim == 16 and cfg.yarn is not None and cfg.compress_rope_theta == 160000
    # Round trip through the official spelling gives the same model.
    again = ModelConfig.from_dict(cfg.to_official_dict())
    assert again.compress_ratios == cfg.compress_ratios and again.yarn == cfg.yarn


@pytest.mark.parametrize("key,value,needle", [
    ("compress_ratios", [0, 0] + [4, 64] * 20 + [4, 0], "unsupported ratios [64]"),
    ("scoring_func", "relu", "scoring_func"),
    ("num_key_value_heads", 8, "num_key_value_heads"),
    ("hidden_act", "gelu", "hidden_act"),
    ("quantization_config", {"quant_method": "awq"}, "quantization_config"),
    ("expert_dtype", "int4", "expert_dtype"),
    ("fancy_new_feature", True, "fancy_new_feature"),
])
def test_unsupported_settings_name_the_key(key, value, needle):
    raw = dict(OFFICIAL_FLASH, **{key: value})
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(raw)
    assert needle in str(e.value)


def test_missing_required_key():
    raw = dict(OFFICIAL_FLASH)
    del raw["head_dim"]
    with pytest.raises(ConfigError, match="head_dim"):
        ModelConfig.from_dict(raw)


def test_yarn_with_mscale_refused():
    raw = dict(OFFICIAL_FLASH, rope_scaling=dict(OFFICIAL_FLASH["rope_scaling"], attention_factor=1.3))
    with pytest.raises(ConfigError, match="attention_factor"):
        ModelConfig.from_dict(raw)
