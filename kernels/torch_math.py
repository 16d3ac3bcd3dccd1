"""Plain-torch building blocks shared by the model and the kernels' twins: RMSNorm, V4's
interleaved partial RoPE, Sinkhorn-Knopp, the clamped SwiGLU. Each is the reference math a fused kernel reproduces."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32; the weight multiplies in fp32 before the cast back (spec §3.10)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of the last ``2*cos.shape[-1]`` channels of ``x``.

    ``x``: ``[T, ..., D]``; ``cos``/``sin``: ``[T, rope_dim/2]``. ``inverse`` applies the
    conjugate rotation (used on the attention output, whose V carried rotated dims)."""
    rd = cos.shape[-1] * 2
    shape = [cos.shape[0]] + [1] * (x.dim() - 2) + [rd]
    c = cos.repeat_interleave(2, dim=-1).view(shape)
    s = sin.repeat_interleave(2, dim=-1).view(shape)
    if inverse:
        s = -s
    nope, rope = x[..., :-rd], x[..., -rd:]
    rotated_half = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)
    out = (rope.float() * c + rotated_half.float() * s).to(x.dtype)
    return torch.cat([nope, out], dim=-1)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row softmax + eps, column-normalise, then ``iters - 1`` row/column rounds (spec §3.2.1)."""
    c = torch.softmax(logits, dim=-1) + eps
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
    return c


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """SiLU-gated unit with V4's clamps: the gate one-sided (max), up two-sided (spec §3.8)."""
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up
