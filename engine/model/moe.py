"""Mixture of experts (spec §3.8): hash-routed layers (token id → fixed experts) and routed
top-k layers (sqrt-softplus scores, bias-corrected selection), plus one shared expert.

Routed experts are stored stacked (the merged checkpoint form): ``gate_up [E, 2I, D]`` (w1 rows
then w3 rows) and ``down [E, D, I]``. The forward sorts the (token, expert) assignments by
expert into fixed-size tiles, each tile owned by one expert (the layout a grouped GEMM kernel
consumes), and runs every tile in one batched matmul: no per-expert Python loop, no host sync,
shapes fixed by the number of tokens.

Expert parallelism: a rank owns experts ``[expert_start, expert_end)``; assignments to other
ranks' experts get weight zero here and the partial outputs are summed by an all-reduce in the
caller's ``reduce`` hook.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.config import ModelConfig
from engine.model.layers import Linear, swiglu

MAX_TILE = 64  # rows per expert tile for large batches
TILES_PER_CHUNK = 256  # bounds the gathered weight workspace of the torch path


def score_fn(logits: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


class Expert(nn.Module):
    """SwiGLU MLP (the shared expert): w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, inter: int, dtype: torch.dtype, limit: float):
        super().__init__()
        self.w1 = Linear(dim, inter, dtype)
        self.w2 = Linear(inter, dim, dtype)
        self.w3 = Linear(dim, inter, dtype)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = swiglu(self.w1(x).float(), self.w3(x).float(), self.limit)
        return self.w2(h.to(x.dtype))


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
    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[t, k] * expert_{experts[t, k]}(x[t])`` in fp32 ``[T, D]``; assignments to
        experts outside this stack count zero."""
        T, k = experts.shape
        n_local = len(self.expert_ids)
        local = experts - self.expert_ids.start
        owned = (local >= 0) & (local < n_local)
        weights = torch.where(owned, weights, 0.0).flatten()
        assignments = local.clamp(0, n_local - 1).flatten()
        A = T * k
        tile = min(MAX_TILE, _next_pow2(-(-A // n_local)))
        rows, tile_expert = expert_tiles(assignments, n_local, tile)
        gate_up, down = self.gate_up, self.down
        x_pad = torch.cat([x, x.new_zeros(1, x.shape[1])])  # row T: the padding source
        w_pad = torch.cat([weights, weights.new_zeros(1)])
        token = torch.where(rows < A, rows // k, T)
        out = torch.zeros(T + 1, x.shape[1], dtype=torch.float32, device=x.device)
        for c in range(0, tile_expert.shape[0], TILES_PER_CHUNK):
            te = tile_expert[c:c + TILES_PER_CHUNK]
            tok = token[c * tile:(c + te.shape[0]) * tile]
            xs = x_pad[tok].view(te.shape[0], tile, -1)
            h = torch.bmm(xs.to(gate_up.dtype), gate_up[te].transpose(1, 2)).float()
            act = swiglu(h[..., :self.inter], h[..., self.inter:], self.limit)
            # The routing weight multiplies the activation before w2 (reference order).
            act = act * w_pad[rows[c * tile:(c + te.shape[0]) * tile]].view(te.shape[0], tile, 1)
            y = torch.bmm(act.to(down.dtype), down[te].transpose(1, 2))
            out.index_add_(0, tok, y.reshape(-1, y.shape[-1]).float())
        return out[:T]


def expert_tiles(assignments: torch.Tensor, n_experts: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignments grouped by expert into tiles of ``tile`` rows, each tile one expert's.

    Returns ``rows [n_tiles * tile]`` (assignment index, ``A`` = padding) and ``tile_expert
    [n_tiles]``. ``n_tiles`` bounds the worst case (every non-empty expert wastes < one tile), so
    it depends only on ``A``, ``n_experts`` and ``tile``; tiles past the last expert are padding."""
    A = assignments.shape[0]
    dev = assignments.device
    counts = torch.zeros(n_experts, dtype=torch.long, device=dev).scatter_add_(
        0, assignments, torch.ones_like(assignments))
    padded = (counts + tile - 1) // tile * tile
    seg_end = padded.cumsum(0)
    order = torch.argsort(assignments, stable=True)
    sorted_e = assignments[order]
    rank = torch.arange(A, device=dev) - (counts.cumsum(0) - counts)[sorted_e]
    slot = (seg_end - padded)[sorted_e] + rank
    n_tiles = -(-(A + min(A, n_experts) * (tile - 1)) // tile)
    rows = torch.full((n_tiles * tile,), A, dtype=torch.long, device=dev).scatter_(0, slot, order)
    tile_start = torch.arange(n_tiles, device=dev) * tile
    tile_expert = torch.searchsorted(seg_end, tile_start, right=True).clamp_(max=n_experts - 1)
    return rows, tile_expert


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


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
        total = self.experts(x, idx, weights) + self.shared(x).float()
        if reduce is not None:
            # Under tensor/expert parallelism each rank holds part of the sum.
            total = reduce(total)
        return total.to(x.dtype)
