"""The DeepSeek-V4 model over a flat varlen batch (spec §3.1).

``forward(batch, cache)`` reads only the ``ForwardBatch`` (token ids, positions, per-sequence
cache handles) and the ``KVCache`` tensors; it returns final hidden states for the rows whose
logits are wanted. ``compute_logits`` applies the head in fp32.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from engine.worker.input_batch import ForwardBatch
from engine.model.config import ModelConfig
from engine.worker.kv_cache import KVCache
from engine.model.attention import Attention
from engine.model.layers import RMSNorm, model_rotaries
from engine.model.mhc import HyperConnection, HyperHead
from engine.model.moe import MoE
from engine.model.sharding import Split, tensor_split


class Parallel:
    """What the model needs to know about tensor/expert parallelism. World size 1 = no-op."""

    def __init__(self, tp_size: int = 1, tp_rank: int = 0, ep: bool = False,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 all_gather_vocab: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
        if tp_size > 1 and (all_reduce is None or all_gather_vocab is None):
            raise ValueError("tp_size > 1 needs the all_reduce and all_gather_vocab collectives")
        self.tp_size, self.tp_rank, self.ep = tp_size, tp_rank, ep
        self.all_reduce = all_reduce if tp_size > 1 else None
        self.all_gather_vocab = all_gather_vocab if tp_size > 1 else None

    def expert_range(self, n_experts: int) -> tuple[int, int]:
        if not self.ep or self.tp_size == 1:
            return 0, n_experts
        per = n_experts // self.tp_size
        return self.tp_rank * per, (self.tp_rank + 1) * per

    def vocab_range(self, vocab: int) -> tuple[int, int]:
        per = -(-vocab // self.tp_size)
        return min(vocab, self.tp_rank * per), min(vocab, (self.tp_rank + 1) * per)

    def split_for(self, name: str, cfg: ModelConfig) -> Split | None:
        """This rank's part of checkpoint tensor ``name`` (None: replicated or owned whole)."""
        return tensor_split(name, cfg, self.tp_size, self.tp_rank, self.ep, self.vocab_range(cfg.vocab_size))


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
            from dataclasses import replace
            moe_cfg = replace(cfg, moe_intermediate_size=cfg.moe_intermediate_size // inter_split)
        self.ffn = MoE(moe_cfg, layer, dtype, par.expert_range(cfg.n_routed_experts),
                       shared_inter=cfg.moe_intermediate_size // par.tp_size)

    def forward(self, streams, batch: ForwardBatch, cache: KVCache, rotaries, reduce):
        x, post, comb = self.hc_attn.pre(streams)
        y = self.attn(self.attn_norm(x), batch, cache, rotaries[self.rope_kind], reduce)
        streams = HyperConnection.post(y, streams, post, comb)
        x, post, comb = self.hc_ffn.pre(streams)
        y = self.ffn(self.ffn_norm(x), batch.input_ids, reduce)
        return HyperConnection.post(y, streams, post, comb)


class DeepseekV4(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, par: Parallel | None = None):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.par = par or Parallel()
        lo, hi = self.par.vocab_range(cfg.vocab_size)
        self.vocab_start, self.vocab_end = lo, hi
        self.embed = nn.Parameter(torch.zeros(hi - lo, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.layers = nn.ModuleList([Block(cfg, i, dtype, self.par) for i in range(cfg.num_layers)])
        self.hc_head = HyperHead(cfg.hc_mult, cfg.hidden_size, cfg.hc_eps, cfg.rms_norm_eps)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Parameter(torch.zeros(hi - lo, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.rotaries = nn.ModuleDict(model_rotaries(cfg))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.par.tp_size == 1:
            return self.embed[ids]
        # Vocab-parallel: each rank looks up its rows, zeros elsewhere, then all-reduce.
        local = (ids >= self.vocab_start) & (ids < self.vocab_end)
        out = self.embed[(ids - self.vocab_start).clamp(0, self.embed.shape[0] - 1)]
        out = out * local[:, None].to(out.dtype)
        return self.par.all_reduce(out)

    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Final-normed hidden states ``[len(batch.logits_rows), D]``."""
        x = self.embed_tokens(batch.input_ids)
        streams = x.unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()
        for block in self.layers:
            streams = block(streams, batch, cache, self.rotaries, self.par.all_reduce)
        return self.norm(self.hc_head(streams[batch.logits_rows]))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 head (spec §3.1 step 4); vocab-parallel ranks gather their slices."""
        logits = hidden.float() @ self.head.float().t()
        if self.par.all_gather_vocab is not None:
            logits = self.par.all_gather_vocab(logits)[:, : self.cfg.vocab_size]
        return logits
