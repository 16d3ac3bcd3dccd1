"""Mixture of experts (spec §3.8): hash-routed layers (token id → fixed experts) and routed
top-k layers (sqrt-softplus scores, bias-corrected selection), plus one shared expert.

Expert parallelism: a rank owns experts ``[expert_start, expert_end)``; tokens routed to
other ranks' experts contribute zero here and the partial outputs are summed by an
all-reduce in the caller's ``reduce`` hook.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.config import ModelConfig
from engine.model.layers import Linear, swiglu


def score_fn(logits: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


class Expert(nn.Module):
    """SwiGLU MLP: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, inter: int, dtype: torch.dtype, limit: float):
        super().__init__()
        self.w1 = Linear(dim, inter, dtype)
        self.w2 = Linear(inter, dim, dtype)
        self.w3 = Linear(dim, inter, dtype)
        self.limit = limit

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        h = swiglu(self.w1(x).float(), self.w3(x).float(), self.limit)
        if weight is not None:
            # The routing weight multiplies the activation before w2 (reference order).
            h = h * weight.unsqueeze(-1)
        return self.w2(h.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, expert_range: tuple[int, int] | None = None,
                 shared_inter: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.is_hash = cfg.is_hash_layer(layer)
        self.top_k = cfg.num_experts_per_tok
        n = cfg.n_routed_experts
        self.expert_start, self.expert_end = expert_range or (0, n)
        self.gate_weight = nn.Parameter(torch.zeros(n, cfg.hidden_size, dtype=torch.float32), requires_grad=False)
        if self.is_hash:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.top_k, dtype=torch.long))
            self.gate_bias = None
        else:
            self.gate_bias = nn.Parameter(torch.zeros(n, dtype=torch.float32), requires_grad=False)
        self.experts = nn.ModuleDict({
            str(e): Expert(cfg.hidden_size, cfg.moe_intermediate_size, dtype, cfg.swiglu_limit)
            for e in range(self.expert_start, self.expert_end)
        })
        self.shared = Expert(cfg.hidden_size, shared_inter or cfg.moe_intermediate_size, dtype, cfg.swiglu_limit)

    def route(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (expert indices [T, k], weights [T, k] fp32). Router math is fp32."""
        scores = score_fn(x.float() @ self.gate_weight.float().t(), self.cfg.scoring_func)
        if self.is_hash:
            idx = self.tid2eid[token_ids].long()
        else:
            idx = torch.topk(scores + self.gate_bias.float(), self.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * self.cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        idx, weights = self.route(x, token_ids)
        routed = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for e in torch.unique(idx).tolist():
            if not (self.expert_start <= e < self.expert_end):
                continue
            tok, slot = torch.where(idx == e)
            routed.index_add_(0, tok, self.experts[str(e)](x[tok], weights[tok, slot]).float())
        shared = self.shared(x).float()
        if reduce is not None:
            # Under tensor/expert parallelism each rank holds part of the sum.
            return reduce(routed + shared).to(x.dtype)
        return (routed + shared).to(x.dtype)
