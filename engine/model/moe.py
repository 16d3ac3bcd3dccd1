"""Mixture of experts (spec §3.8): hash-routed layers (token id → fixed experts) and routed
top-k layers (sqrt-softplus scores, bias-corrected selection), plus one shared expert.

Routed experts are stored stacked (the merged checkpoint form): ``gate_up [E, 2I, D]`` (w1 rows
then w3 rows) and ``down [E, D, I]``, or each part in its stored FP8 / MXFP4 form. Routing
(``kernels.moe_route``) and the experts (``kernels.moe_experts``: per-assignment kernels at
decode, assignments sorted into per-expert tiles for prefill; the torch twin batches the tiles)
run on fused ops: no per-expert Python loop, no host sync, shapes fixed by the number of tokens.

Expert parallelism: a rank owns experts ``[expert_start, expert_end)``; assignments to other
ranks' experts get weight zero here and the partial outputs are summed by an all-reduce in the
caller's ``reduce`` hook.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import kernels
from engine.model.config import ModelConfig
from engine.model.layers import Linear


class Expert(nn.Module):
    """SwiGLU MLP (the shared expert): w1 = gate, w3 = up, w2 = down. It runs on the routed
    experts' kernel as a one-expert stack that every token uses at weight 1."""

    def __init__(self, dim: int, inter: int, dtype: torch.dtype, limit: float):
        super().__init__()
        self.w1 = Linear(dim, inter, dtype)
        self.w2 = Linear(inter, dim, dtype)
        self.w3 = Linear(dim, inter, dtype)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 ``[T, D]``."""
        stored = [lin.stored() for lin in (self.w1, self.w3, self.w2)]
        fmts = {fmt for _, _, fmt in stored}
        if len(fmts) != 1:
            raise ValueError(f"the shared expert's w1/w3/w2 must share one stored format, got {sorted(fmts)}")
        parts = [t if t is None else t[None] for w, s, _ in stored for t in (w, s)]
        expert = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        return kernels.moe_experts(x, expert, torch.ones_like(expert, dtype=torch.float32), 0, *parts, fmts.pop(),
                                   self.limit)


@dataclass(frozen=True)
class WeightView:
    weight: torch.Tensor


@dataclass(frozen=True)
class ExpertView:
    """One expert's weights as views into the stacks (for inspection; the forward never uses it)."""

    w1: WeightView
    w2: WeightView
    w3: WeightView


class StackedExperts(nn.Module):
    """Experts ``expert_ids`` of one layer, stacked. Quantised storage (kept on accelerators for
    kernels) holds each of the gate/up/down parts in its checkpoint form ``[E, ...]``; the dense
    stacks are then empty and ``gate_up``/``down`` dequantise on access."""

    PARTS = ("w1", "w3", "w2")  # gate, up, down

    def __init__(self, expert_ids: range, dim: int, inter: int, dtype: torch.dtype, limit: float):
        super().__init__()
        n = len(expert_ids)
        self.expert_ids, self.dim, self.inter, self.limit = expert_ids, dim, inter, limit
        self.gate_up_dense = nn.Parameter(torch.empty(n, 2 * inter, dim, dtype=dtype), requires_grad=False)
        self.down_dense = nn.Parameter(torch.empty(n, dim, inter, dtype=dtype), requires_grad=False)
        for part in self.PARTS:
            self.register_buffer(f"{part}_qweight", None, persistent=False)
            self.register_buffer(f"{part}_qscale", None, persistent=False)
        self.qformat: str | None = None

    # ---- storage ------------------------------------------------------------------------
    def part_shape(self, part: str) -> tuple[int, int]:
        """Logical ``(out, in)`` of one expert's ``part``."""
        return (self.dim, self.inter) if part == "w2" else (self.inter, self.dim)

    def dense_part(self, part: str) -> torch.Tensor:
        """``[E, out, in]`` view of one part in the dense stacks."""
        if part == "w2":
            return self.down_dense
        rows = slice(0, self.inter) if part == "w1" else slice(self.inter, 2 * self.inter)
        return self.gate_up_dense[:, rows]

    def set_dense(self, part: str, local: int, w: torch.Tensor) -> None:
        with torch.no_grad():
            self.dense_part(part)[local].copy_(w.to(self.gate_up_dense.dtype))

    def set_quantized(self, part: str, local: int, qweight: torch.Tensor, qscale: torch.Tensor, fmt: str) -> None:
        """Keep expert ``local``'s ``part`` in its stored form (dense stacks are dropped)."""
        if getattr(self, f"{part}_qweight") is None:
            n = len(self.expert_ids)
            setattr(self, f"{part}_qweight", qweight.new_zeros(n, *qweight.shape))
            setattr(self, f"{part}_qscale", qscale.new_zeros(n, *qscale.shape))
            self.qformat = fmt
            self.gate_up_dense.data = self.gate_up_dense.new_empty(0)
            self.down_dense.data = self.down_dense.new_empty(0)
        getattr(self, f"{part}_qweight")[local].copy_(qweight)
        getattr(self, f"{part}_qscale")[local].copy_(qscale)

    def _dequantized(self, part: str) -> torch.Tensor:
        from kernels.quant import fp8_block_dequantize, mxfp4_dequantize

        q, s = getattr(self, f"{part}_qweight"), getattr(self, f"{part}_qscale")
        dtype = self.gate_up_dense.dtype
        if self.qformat == "fp4":  # rows are independent: dequantise the stack as one matrix
            return mxfp4_dequantize(q.flatten(0, 1), s.flatten(0, 1), dtype).view(q.shape[0], q.shape[1], -1)
        return torch.stack([fp8_block_dequantize(q[e], s[e], dtype) for e in range(q.shape[0])])

    @property
    def gate_up(self) -> torch.Tensor:
        if self.w1_qweight is None:
            return self.gate_up_dense
        return torch.cat([self._dequantized("w1"), self._dequantized("w3")], dim=1)

    @property
    def down(self) -> torch.Tensor:
        return self.down_dense if self.w2_qweight is None else self._dequantized("w2")

    # ---- inspection ---------------------------------------------------------------------
    def __iter__(self):
        return iter(str(e) for e in self.expert_ids)

    def __len__(self) -> int:
        return len(self.expert_ids)

    def __getitem__(self, expert: str) -> ExpertView:
        local = self.expert_ids.index(int(expert))
        gate_up, down = self.gate_up, self.down
        return ExpertView(WeightView(gate_up[local, :self.inter]), WeightView(down[local]),
                          WeightView(gate_up[local, self.inter:]))

    # ---- forward ------------------------------------------------------------------------
    def stored_parts(self) -> tuple:
        """``(w1, s1, w3, s3, w2, s2, fmt)`` as ``kernels.moe_experts`` takes them (dense parts are
        views into the stacks)."""
        if self.qformat is None:
            return (self.dense_part("w1"), None, self.dense_part("w3"), None, self.dense_part("w2"), None, "dense")
        return (self.w1_qweight, self.w1_qscale, self.w3_qweight, self.w3_qscale, self.w2_qweight, self.w2_qscale,
                self.qformat)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[t, k] * expert_{experts[t, k]}(x[t])`` in fp32 ``[T, D]``; assignments to
        experts outside this stack count zero."""
        return kernels.moe_experts(x, experts, weights, self.expert_ids.start, *self.stored_parts(), self.limit)


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
        self.experts = StackedExperts(range(self.expert_start, self.expert_end), cfg.hidden_size,
                                      cfg.moe_intermediate_size, dtype, cfg.swiglu_limit)
        self.shared = Expert(cfg.hidden_size, shared_inter or cfg.moe_intermediate_size, dtype, cfg.swiglu_limit)

    def route(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (expert indices [T, k], weights [T, k] fp32). Router math is fp32."""
        logits = kernels.linear(x.float(), self.gate_weight, None, "dense")
        return kernels.moe_route(logits, None if self.is_hash else self.gate_bias, token_ids,
                                 self.tid2eid if self.is_hash else None, top_k=self.top_k,
                                 scoring=self.cfg.scoring_func, scaling=self.cfg.routed_scaling_factor)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        idx, weights = self.route(x, token_ids)
        total = self.experts(x, idx, weights) + self.shared(x)
        if reduce is not None:
            # Under tensor/expert parallelism each rank holds part of the sum.
            total = reduce(total)
        return total.to(x.dtype)
