"""One V4 decoder block: mHC around attention and around the MoE (spec §3.1–§3.2)."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.model.attention import Attention
from engine.model.config import ModelConfig
from engine.model.layers import RMSNorm
from engine.model.mhc import HyperConnection
from engine.model.moe import MoE
from engine.worker.input_batch import ForwardBatch
from engine.worker.kv_cache import KVCache
from engine.model.step_tables import StepTables

if TYPE_CHECKING:
    from engine.model.deepseek_v4 import Parallel


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, par: Parallel):
        super().__init__()
        self.layer = layer
        self.rope_kind = "compress" if cfg.compress_ratios[layer] else "main"
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        hc_args = (cfg.hc_mult, cfg.hidden_size, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
        self.hc_attn = HyperConnection(*hc_args)
        self.hc_ffn = HyperConnection(*hc_args)
        self.attn = Attention(cfg, layer, dtype, par.tp_size)
        # Under plain TP every expert's intermediate is split; under EP experts are whole.
        inter_split = 1 if par.ep else par.tp_size
        moe_cfg = cfg
        if inter_split > 1:
            moe_cfg = replace(cfg, moe_intermediate_size=cfg.moe_intermediate_size // inter_split)
        self.ffn = MoE(moe_cfg, layer, dtype, par.expert_range(cfg.n_routed_experts),
                       shared_inter=cfg.moe_intermediate_size // par.tp_size)

    def forward(self, streams, batch: ForwardBatch, cache: KVCache, tables: StepTables, reduce):
        x, post, comb = self.hc_attn.pre(streams, self.attn_norm)
        y = self.attn(x, batch, cache, tables, self.rope_kind, reduce)
        streams = HyperConnection.post(y, streams, post, comb)
        x, post, comb = self.hc_ffn.pre(streams, self.ffn_norm)
        y = self.ffn(x, batch.input_ids, reduce)
        return HyperConnection.post(y, streams, post, comb)
