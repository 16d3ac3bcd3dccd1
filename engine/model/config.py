"""Model configuration: one dataclass read from a checkpoint's ``config.json``.

Two spellings exist in the wild and both are accepted:
- DeepSeek's official file: ``compress_ratios`` (0 / 4 / 128 per layer, possibly with trailing
  MTP entries), ``num_hash_layers``, ``qk_rope_head_dim``, a flat YaRN ``rope_scaling`` and a
  ``quantization_config`` describing FP8 block weights (+ ``expert_dtype: fp4``).
- The one transformers writes: ``layer_types``, ``mlp_layer_types``, ``partial_rotary_factor``
  and nested ``rope_parameters = {"main": ..., "compress": ...}``.

Unknown keys and unsupported values fail with a message naming the key, so a checkpoint we
cannot run exactly is refused instead of silently served wrong.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

LAYER_TYPE_TO_RATIO = {
    "sliding_attention": 0,
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 128,
}
SUPPORTED_RATIOS = (0, 4, 128)
SUPPORTED_SCORING = ("sqrtsoftplus", "softmax", "sigmoid")

# Keys that carry no information we need (bookkeeping, training-only, or MTP/DSpark heads we
# do not run). Anything not here and not consumed below is reported as unknown.
_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "attention_dropout", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "pad_token_id",
    "auto_map", "_name_or_path", "name_or_path", "mlp_bias", "attention_bias",
    "dspark_block_size", "dspark_markov_rank", "dspark_noise_token_id", "dspark_target_layer_ids",
    "tie_word_embeddings", "topk_method", "norm_topk_prob", "hidden_act", "num_key_value_heads",
    "n_shared_experts", "compress_rates", "max_position_embeddings",
}


class ConfigError(ValueError):
    """A config.json we cannot serve exactly; the message names the offending key."""


@dataclass(frozen=True)
class YarnParams:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    compress_ratios: tuple[int, ...]  # per main layer: 0 sliding-only, 4 CSA, 128 HCA
    num_hash_layers: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    sliding_window: int = 128
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn: YarnParams | None = None
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_id: int = 1
    # Quantised storage: FP8 block size for F8_E4M3 weights, and the routed experts' format.
    fp8_block: tuple[int, int] | None = None
    expert_dtype: str | None = None  # None (same as other weights), "fp4" or "fp8"
    # Multi-token-prediction layers shipped as ``mtp.N.*`` (spec §3.11; V4 ships one). Each is a
    # sliding-only, non-hash block after the main layers; speculative decoding drafts with it.
    num_mtp_layers: int = 0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived ----------------------------------------------------------------------
    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    @property
    def csa_layers(self) -> list[int]:
        return [i for i, r in enumerate(self.compress_ratios) if r == 4]

    @property
    def hca_layers(self) -> list[int]:
        return [i for i, r in enumerate(self.compress_ratios) if r == 128]

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"no config.json in {model_dir!r}")
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        cfg = dict(raw)
        used: set[str] = set()

        def take(key, default=..., *aliases):
            for k in (key, *aliases):
                if k in cfg:
                    used.add(k)
                    return cfg[k]
            if default is ...:
                raise ConfigError(f"config.json is missing required key {key!r}")
            return default

        if cfg.get("model_type", "deepseek_v4") != "deepseek_v4":
            raise ConfigError(f"model_type {cfg['model_type']!r} is not supported (need 'deepseek_v4')")
        if cfg.get("num_key_value_heads", 1) != 1:
            raise ConfigError("num_key_value_heads must be 1 (V4 uses one shared K=V head)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {cfg['hidden_act']!r} is not supported (need 'silu')")
        if cfg.get("n_shared_experts", 1) != 1:
            raise ConfigError(f"n_shared_experts {cfg['n_shared_experts']!r} is not supported (need 1)")
        if cfg.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ConfigError(f"topk_method {cfg['topk_method']!r} is not supported (need 'noaux_tc')")
        if cfg.get("norm_topk_prob", True) is not True:
            raise ConfigError("norm_topk_prob must be true")
        if cfg.get("tie_word_embeddings", False):
            raise ConfigError("tie_word_embeddings must be false (V4 has separate embed and head)")
        if cfg.get("attention_bias", False) or cfg.get("mlp_bias", False):
            raise ConfigError("attention_bias / mlp_bias must be false")

        num_layers = int(take("num_hidden_layers", ..., "n_layers"))
        head_dim = int(take("head_dim"))

        # Layer schedule: transformers' layer_types win, else the official compress_ratios.
        if "layer_types" in cfg:
            used.add("layer_types")
            bad = [t for t in cfg["layer_types"] if t not in LAYER_TYPE_TO_RATIO]
            if bad:
                raise ConfigError(f"layer_types has unsupported entries {bad}")
            rates = cfg.get("compress_rates") or {}
            for name, want in (("compressed_sparse_attention", 4), ("heavily_compressed_attention", 128)):
                if rates.get(name, want) != want:
                    raise ConfigError(f"compress_rates[{name!r}] = {rates[name]} is not supported (need {want})")
            ratios = [LAYER_TYPE_TO_RATIO[t] for t in cfg["layer_types"]]
        elif "compress_ratios" in cfg:
            used.add("compress_ratios")
            ratios = list(cfg["compress_ratios"])
        else:
            raise ConfigError("config.json needs 'compress_ratios' or 'layer_types'")
        if len(ratios) < num_layers:
            raise ConfigError(f"compress_ratios/layer_types has {len(ratios)} entries for {num_layers} layers")
        ratios = [int(r) for r in ratios[:num_layers]]  # trailing entries belong to MTP layers
        bad = sorted({r for r in ratios if r not in SUPPORTED_RATIOS})
        if bad:
            raise ConfigError(f"compress_ratios contains unsupported ratios {bad} (supported: {SUPPORTED_RATIOS})")

        if "mlp_layer_types" in cfg:
            used.add("mlp_layer_types")
            kinds = list(cfg["mlp_layer_types"])[:num_layers]
            bad = [k for k in kinds if k not in ("hash_moe", "moe")]
            if bad:
                raise ConfigError(f"mlp_layer_types has unsupported entries {bad}")
            n_hash = sum(k == "hash_moe" for k in kinds)
            if kinds != ["hash_moe"] * n_hash + ["moe"] * (len(kinds) - n_hash):
                raise ConfigError("mlp_layer_types: hash_moe layers must come first")
        else:
            n_hash = int(take("num_hash_layers", 3, "n_hash_layers"))

        if "qk_rope_head_dim" in cfg or "rope_head_dim" in cfg:
            rope_dim = int(take("qk_rope_head_dim", ..., "rope_head_dim"))
        else:
            factor = take("partial_rotary_factor", 64 / 512)
            rope_dim = int(head_dim * factor)
        used.add("partial_rotary_factor")
        if rope_dim % 2 or rope_dim > head_dim:
            raise ConfigError(f"rope head dim {rope_dim} must be even and <= head_dim {head_dim}")

        rope_theta = float(take("rope_theta", 10000.0))
        compress_theta = float(take("compress_rope_theta", 160000.0))
        yarn = None
        rp = cfg.get("rope_parameters")
        rs = cfg.get("rope_scaling")
        used.update({"rope_parameters", "rope_scaling"})
        if isinstance(rp, dict) and isinstance(rp.get("compress"), dict):
            main, comp = rp.get("main") or {}, rp["compress"]
            if main.get("rope_type", "default") != "default":
                raise ConfigError(f"rope_parameters.main.rope_type {main.get('rope_type')!r} is not supported")
            rope_theta = float(main.get("rope_theta", rope_theta))
            compress_theta = float(comp.get("rope_theta", compress_theta))
            yarn = _yarn_from(comp, "rope_parameters.compress")
        else:
            flat = rs if isinstance(rs, dict) else (rp if isinstance(rp, dict) else None)
            if flat:
                yarn = _yarn_from(flat, "rope_scaling")

        quant = cfg.get("quantization_config")
        used.add("quantization_config")
        fp8_block = None
        if quant:
            if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
                raise ConfigError(f"quantization_config {quant!r} is not supported (need fp8 e4m3)")
            block = quant.get("weight_block_size", [128, 128])
            fp8_block = (int(block[0]), int(block[1]))
            if quant.get("scale_fmt", "ue8m0") not in ("ue8m0", None):
                raise ConfigError(f"quantization_config.scale_fmt {quant.get('scale_fmt')!r} is not supported")
        expert_dtype = take("expert_dtype", None)
        if expert_dtype is None and quant:
            expert_dtype = quant.get("expert_dtype")
        if expert_dtype not in (None, "fp4", "fp8"):
            raise ConfigError(f"expert_dtype {expert_dtype!r} is not supported (fp4, fp8)")

        scoring = take("scoring_func", "sqrtsoftplus", "score_func")
        if scoring not in SUPPORTED_SCORING:
            raise ConfigError(f"scoring_func {scoring!r} is not supported ({SUPPORTED_SCORING})")

        num_heads = int(take("num_attention_heads", ..., "n_heads"))
        o_groups = int(take("o_groups"))
        if num_heads % o_groups:
            raise ConfigError(f"num_attention_heads {num_heads} is not divisible by o_groups {o_groups}")
        eos = take("eos_token_id", 1)
        if isinstance(eos, list):
            eos = eos[0]

        out = cls(
            vocab_size=int(take("vocab_size")),
            hidden_size=int(take("hidden_size", ..., "dim")),
            num_layers=num_layers,
            num_heads=num_heads,
            head_dim=head_dim,
            rope_dim=rope_dim,
            q_lora_rank=int(take("q_lora_rank")),
            o_groups=o_groups,
            o_lora_rank=int(take("o_lora_rank")),
            compress_ratios=tuple(ratios),
            num_hash_layers=min(n_hash, num_layers),
            n_routed_experts=int(take("n_routed_experts")),
            num_experts_per_tok=int(take("num_experts_per_tok", ..., "n_activated_experts")),
            moe_intermediate_size=int(take("moe_intermediate_size", ..., "moe_inter_dim")),
            sliding_window=int(take("sliding_window", 128, "window_size")),
            rope_theta=rope_theta,
            compress_rope_theta=compress_theta,
            yarn=yarn,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 1048576)),
            index_n_heads=int(take("index_n_heads", 64)),
            index_head_dim=int(take("index_head_dim", 128)),
            index_topk=int(take("index_topk", 512)),
            scoring_func=scoring,
            routed_scaling_factor=float(take("routed_scaling_factor", 1.0, "route_scale")),
            swiglu_limit=float(take("swiglu_limit", 0.0)),
            hc_mult=int(take("hc_mult", 4)),
            hc_sinkhorn_iters=int(take("hc_sinkhorn_iters", 20)),
            hc_eps=float(take("hc_eps", 1e-6)),
            rms_norm_eps=float(take("rms_norm_eps", 1e-6, "norm_eps")),
            bos_token_id=int(take("bos_token_id", 0)),
            eos_token_id=int(eos),
            fp8_block=fp8_block,
            expert_dtype=expert_dtype,
            num_mtp_layers=int(take("num_nextn_predict_layers", 0, "n_mtp_layers")),
            extra={k: cfg[k] for k in cfg if k in _IGNORED_KEYS},
        )
        unknown = sorted(set(cfg) - used - _IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"config.json has unknown or unsupported keys: {unknown}")
        out.validate()
        return out

    def validate(self) -> None:
        if self.index_head_dim < self.rope_dim and self.csa_layers:
            raise ConfigError(f"index_head_dim {self.index_head_dim} must be >= rope dims {self.rope_dim}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError("num_experts_per_tok exceeds n_routed_experts")
        if self.hc_mult < 1:
            raise ConfigError("hc_mult must be >= 1")

    def to_official_dict(self) -> dict:
        """The official DeepSeek spelling (what ``dsv4 make-tiny`` writes)."""
        d = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.rope_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window,
            "compress_ratios": list(self.compress_ratios) + [0] * max(1, self.num_mtp_layers),  # + MTP layers
            "compress_rope_theta": self.compress_rope_theta,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": 1,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hash_layers": self.num_hash_layers,
            "scoring_func": self.scoring_func,
            "topk_method": "noaux_tc",
            "norm_topk_prob": True,
            "routed_scaling_factor": self.routed_scaling_factor,
            "swiglu_limit": self.swiglu_limit,
            "hidden_act": "silu",
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rms_norm_eps": self.rms_norm_eps,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
        if self.yarn:
            d["rope_scaling"] = {
                "type": "yarn",
                "factor": self.yarn.factor,
                "original_max_position_embeddings": self.yarn.original_max_position_embeddings,
                "beta_fast": self.yarn.beta_fast,
                "beta_slow": self.yarn.beta_slow,
            }
        if self.fp8_block:
            d["quantization_config"] = {
                "quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                "activation_scheme": "dynamic", "weight_block_size": list(self.fp8_block),
            }
        if self.expert_dtype:
            d["expert_dtype"] = self.expert_dtype
        return d


def _yarn_from(d: dict, where: str) -> YarnParams | None:
    kind = d.get("rope_type", d.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"{where}.rope_type {kind!r} is not supported (default or yarn)")
    att = d.get("attention_factor", 1.0)
    if att not in (None, 1.0):
        # V4 never rescales attention (spec: no YaRN mscale); refuse a file that says otherwise.
        raise ConfigError(f"{where}.attention_factor {att!r} is not supported (V4 uses 1.0)")
    if d.get("mscale") not in (None, 0, 1) or d.get("mscale_all_dim") not in (None, 0, 1):
        raise ConfigError(f"{where}.mscale is not supported (V4 uses no YaRN mscale)")
    try:
        return YarnParams(
            factor=float(d["factor"]),
            original_max_position_embeddings=int(d["original_max_position_embeddings"]),
            beta_fast=float(d.get("beta_fast") or 32),
            beta_slow=float(d.get("beta_slow") or 1),
        )
    except KeyError as e:
        raise ConfigError(f"{where} is missing {e.args[0]!r}") from None
