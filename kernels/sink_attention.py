"""Batched decode attention with per-head attention sinks (spec §3.4), one shared K=V head.

For each sequence ``b`` and head ``h``::

    logits[k] = (q[b, h] . keys[b, k]) * scale   for visible k (mask[b, k]), -inf otherwise
    p         = softmax([logits, sinks[h]])[:-1]  # the sink (unscaled) only joins the denominator
    out[b, h] = sum_k p[k] * keys[b, k]           # V = K

``sink_attention_torch`` is the reference twin (the math ``Attention._decode`` always used);
``sink_attention_triton`` is the same thing as one fused pass with an online softmax.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# ``@triton.jit`` picks the interpreter at decoration time, so this is fixed at import.
INTERPRETED = bool(triton.knobs.runtime.interpret)

BLOCK_H = 16  # tl.dot needs >= 16 rows; spare rows are masked off
BLOCK_K = 32


def check_sink_attention_args(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                              sinks: torch.Tensor) -> None:
    """Raise ValueError (naming the parameter) unless the shapes describe one decode batch."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got shape {tuple(q.shape)}")
    B, H, D = q.shape
    if keys.dim() != 3 or keys.shape[0] != B or keys.shape[2] != D:
        raise ValueError(f"keys must be [B={B}, K, D={D}], got shape {tuple(keys.shape)}")
    if keys.dtype != q.dtype:
        raise ValueError(f"keys dtype {keys.dtype} must match q dtype {q.dtype}")
    if mask.dtype != torch.bool or tuple(mask.shape) != (B, keys.shape[1]):
        raise ValueError(f"mask must be bool [B={B}, K={keys.shape[1]}], "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must be [H={H}], got shape {tuple(sinks.shape)}")
    devices = {t.device for t in (q, keys, mask, sinks)}
    if len(devices) != 1:
        raise ValueError(f"q, keys, mask and sinks must share one device, got {sorted(map(str, devices))}")


def sink_attention_torch(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Plain-torch twin: scores in q's dtype then fp32, softmax with the sink column, P.V in keys' dtype."""
    scores = torch.einsum("bhd,bkd->bhk", q, keys).float() * scale
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    sink = sinks.float()[None, :, None].expand(q.shape[0], -1, 1)
    logits = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return torch.einsum("bhk,bkd->bhd", probs.to(keys.dtype), keys)


@triton.jit
def _sink_attention_kernel(
    q_ptr, k_ptr, mask_ptr, sink_ptr, out_ptr,
    H, K, D, scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kk, stride_kd,
    stride_mb, stride_mk,
    stride_ob, stride_oh, stride_od,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (sequence, block of heads): the keys are read once for all its heads.
    b = tl.program_id(0)
    h_idx = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d_idx = tl.arange(0, BLOCK_D)
    h_ok = h_idx < H
    d_ok = d_idx < D
    q = tl.load(q_ptr + b * stride_qb + h_idx[:, None] * stride_qh + d_idx[None, :] * stride_qd,
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    # The sink seeds the running max and the denominator (exp(sink - sink) = 1) and adds no value,
    # so a row whose keys are all masked ends with out = 0, as in the twin.
    m_i = tl.load(sink_ptr + h_idx, mask=h_ok, other=0.0).to(tl.float32)
    l_i = tl.full([BLOCK_H], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_idx = k0 + tl.arange(0, BLOCK_K)
        k_ok = k_idx < K
        kt = tl.load(k_ptr + b * stride_kb + k_idx[:, None] * stride_kk + d_idx[None, :] * stride_kd,
                     mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        visible = tl.load(mask_ptr + b * stride_mb + k_idx * stride_mk, mask=k_ok, other=0) != 0
        s = tl.dot(q, tl.trans(kt), out_dtype=tl.float32) * scale
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kt.dtype), kt, out_dtype=tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + h_idx[:, None] * stride_oh + d_idx[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])


def sink_attention_triton(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Launch the fused kernel; output ``[B, H, D]`` in keys' dtype, like the twin."""
    B, H, D = q.shape
    K = keys.shape[1]
    out = torch.empty(B, H, D, dtype=keys.dtype, device=q.device)
    if out.numel() == 0:
        return out
    mask_u8 = mask.view(torch.uint8)  # same bytes; Triton loads bytes more portably than i1
    sinks = sinks.float()
    grid = (B, triton.cdiv(H, BLOCK_H))
    _sink_attention_kernel[grid](
        q, keys, mask_u8, sinks, out,
        H, K, D, float(scale),
        *q.stride(), *keys.stride(), *mask_u8.stride(), *out.stride(),
        BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out
