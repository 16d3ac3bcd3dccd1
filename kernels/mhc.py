"""Manifold-constrained hyper-connections (mHC, spec §3.2) as fused kernels.

The residual is ``hc`` streams ``X: [T, hc, D]``. Around each sublayer:

    flat  = rms_norm(X.flatten(1))                      # no weight
    mix   = flat @ fn.T                                 # (2 + hc) * hc outputs per row
    pre   = sigmoid(mix[:hc] * s0 + b_pre) + hc_eps
    post  = 2 * sigmoid(mix[hc:2hc] * s1 + b_post)
    comb  = sinkhorn((mix[2hc:] * s2 + b_comb).view(hc, hc), iters, hc_eps)
    x     = rms_norm((pre[:, None] * X).sum(0).to(X.dtype), norm_weight)   # the sublayer's input
    X'_k  = post_k * y + sum_j comb[j, k] X_j           # after the sublayer (y = sublayer(x))

The head (``HyperHead`` then the final RMSNorm) is ``pre``'s collapse with only the ``hc`` pre rows.

``*_torch`` are the reference twins (the engine's math, op for op); ``*_triton`` launch one kernel
each. ``hc_pre`` and ``hc_head`` share one kernel (``HEAD`` picks the head's variant).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.torch_math import rms_norm, sinkhorn

BLOCK_K = 256  # columns of the flattened streams per step of the mixing projection
BLOCK_D = 256  # hidden channels per step of the collapse / per program of hc_post


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------
def check_hc_mix_args(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                      norm_weight: torch.Tensor, *, head: bool, iters: int = 1) -> None:
    """Raise ValueError (naming the parameter) unless the shapes describe one pre/head collapse."""
    if streams.dim() != 3 or not streams.is_floating_point():
        raise ValueError(f"streams must be a floating [T, hc, D] tensor, got {streams.dtype} {tuple(streams.shape)}")
    _, hc, D = streams.shape
    n = hc if head else (2 + hc) * hc
    expected = {"fn": (fn, (n, hc * D)), "base": (base, (n,)), "scale": (scale, (1 if head else 3,)),
                "norm_weight": (norm_weight, (D,))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating {list(shape)} tensor, got {t.dtype} {tuple(t.shape)}")
    if not head and iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    devices = {t.device for t in (streams, fn, base, scale, norm_weight)}
    if len(devices) != 1:
        raise ValueError(f"streams, fn, base, scale and norm_weight must share one device, "
                         f"got {sorted(map(str, devices))}")


def check_hc_post_args(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> None:
    if streams.dim() != 3 or not streams.is_floating_point():
        raise ValueError(f"streams must be a floating [T, hc, D] tensor, got {streams.dtype} {tuple(streams.shape)}")
    T, hc, D = streams.shape
    if tuple(out.shape) != (T, D) or out.dtype != streams.dtype:
        raise ValueError(f"out must be [T={T}, D={D}] in {streams.dtype}, got {out.dtype} {tuple(out.shape)}")
    if tuple(post.shape) != (T, hc) or not post.is_floating_point():
        raise ValueError(f"post must be a floating [T={T}, hc={hc}] tensor, got {post.dtype} {tuple(post.shape)}")
    if tuple(comb.shape) != (T, hc, hc) or not comb.is_floating_point():
        raise ValueError(f"comb must be a floating [T={T}, hc={hc}, hc={hc}] tensor, "
                         f"got {comb.dtype} {tuple(comb.shape)}")
    devices = {t.device for t in (out, streams, post, comb)}
    if len(devices) != 1:
        raise ValueError(f"out, streams, post and comb must share one device, got {sorted(map(str, devices))}")


# ---------------------------------------------------------------------------------------------
# Torch twins (HyperConnection.pre / .post, HyperHead.forward, op for op)
# ---------------------------------------------------------------------------------------------
def _mix(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    flat = rms_norm(streams.flatten(1).float(), None, eps)
    return flat @ fn.float().t()


def _collapse(pre: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)


def hc_pre_torch(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                 norm_weight: torch.Tensor, iters: int, hc_eps: float,
                 norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``HyperConnection.pre`` then the sublayer's RMSNorm: (x [T, D], post [T, hc], comb [T, hc, hc])."""
    hc = streams.shape[1]
    pre_w, post_w, comb_w = _mix(streams, fn, norm_eps).split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.float().split([hc, hc, hc * hc])
    s_pre, s_post, s_comb = scale.float().unbind(0)
    pre = torch.sigmoid(pre_w * s_pre + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * s_post + post_b)
    comb = sinkhorn((comb_w * s_comb + comb_b).view(-1, hc, hc), iters, hc_eps)
    return rms_norm(_collapse(pre, streams), norm_weight, norm_eps), post, comb


def hc_head_torch(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                  norm_weight: torch.Tensor, hc_eps: float, norm_eps: float) -> torch.Tensor:
    """``HyperHead.forward`` then the final RMSNorm: ``[T, D]`` in streams' dtype."""
    pre = torch.sigmoid(_mix(streams, fn, norm_eps) * scale.float() + base.float()) + hc_eps
    return rms_norm(_collapse(pre, streams), norm_weight, norm_eps)


def hc_post_torch(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """``X'_k = post_k * out + sum_j comb[j, k] X_j`` in streams' dtype (``HyperConnection.post``)."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


# ---------------------------------------------------------------------------------------------
# Triton: pre / head (one program per token row)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _sinkhorn_tile(logits, ok, iters, eps):
    """kernels.torch_math.sinkhorn on one [BLOCK_HC, BLOCK_HC] tile; entries off ``ok`` stay 0."""
    logits = tl.where(ok, logits, float("-inf"))
    m = tl.max(logits, axis=1)
    e = tl.exp(logits - tl.where(m == float("-inf"), 0.0, m)[:, None])  # padding rows: all -inf, e = 0
    s = tl.sum(e, axis=1)
    c = tl.where(ok, e / tl.where(s > 0, s, 1.0)[:, None] + eps, 0.0)
    c = c / (tl.sum(c, axis=0)[None, :] + eps)
    for _ in range(iters - 1):
        c = c / (tl.sum(c, axis=1)[:, None] + eps)
        c = c / (tl.sum(c, axis=0)[None, :] + eps)
    return c


# One program per token row: the whole row (hc * D values) and all of fn pass through it. A decode
# batch of T rows therefore runs on T SMs, each streaming fn from L2; splitting the projection over
# K (or several rows per program with tl.dot, for prefill) is the next step if this shows in profiles.
@triton.jit
def _hc_mix_kernel(
    s_ptr, fn_ptr, base_ptr, scale_ptr, w_ptr, x_ptr, post_ptr, comb_ptr,
    HC, D, iters, hc_eps, norm_eps,
    stride_st, stride_sh, stride_sd,
    stride_fn, stride_fk,
    stride_xt, stride_pt, stride_ct,
    HEAD: tl.constexpr, BLOCK_HC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # int64: T * hc * D can pass 2**31 in a long prefill
    row = s_ptr + t * stride_st
    i_idx = tl.arange(0, BLOCK_HC)
    i_ok = i_idx < HC
    ij_ok = i_ok[:, None] & i_ok[None, :]
    K = HC * D

    # Pass 1 over the flattened row: its sum of squares and the raw mixing dot products
    # (the RMSNorm scale factors out of the dots, applied once after the loop).
    sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_pre = tl.zeros([BLOCK_HC, BLOCK_K], dtype=tl.float32)
    acc_post = tl.zeros([BLOCK_HC, BLOCK_K], dtype=tl.float32)
    acc_comb = tl.zeros([BLOCK_HC, BLOCK_HC, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xk = tl.load(row + (k // D) * stride_sh + (k % D) * stride_sd, mask=k_ok, other=0.0).to(tl.float32)
        sumsq += xk * xk
        fk = fn_ptr + k[None, :] * stride_fk
        acc_pre += tl.load(fk + i_idx[:, None] * stride_fn, mask=i_ok[:, None] & k_ok[None, :],
                           other=0.0).to(tl.float32) * xk[None, :]
        if not HEAD:
            acc_post += tl.load(fk + (HC + i_idx[:, None]) * stride_fn, mask=i_ok[:, None] & k_ok[None, :],
                                other=0.0).to(tl.float32) * xk[None, :]
            comb_rows = 2 * HC + i_idx[:, None, None] * HC + i_idx[None, :, None]
            acc_comb += tl.load(fn_ptr + comb_rows * stride_fn + k[None, None, :] * stride_fk,
                                mask=ij_ok[:, :, None] & k_ok[None, None, :], other=0.0).to(tl.float32) \
                * xk[None, None, :]
    rstd = 1.0 / tl.sqrt(tl.sum(sumsq, axis=0) / K + norm_eps)

    s_pre = tl.load(scale_ptr).to(tl.float32)
    pre = _sigmoid(tl.sum(acc_pre, axis=1) * rstd * s_pre
                   + tl.load(base_ptr + i_idx, mask=i_ok, other=0.0).to(tl.float32)) + hc_eps
    pre = tl.where(i_ok, pre, 0.0)
    if not HEAD:
        s_post = tl.load(scale_ptr + 1).to(tl.float32)
        s_comb = tl.load(scale_ptr + 2).to(tl.float32)
        post = 2.0 * _sigmoid(tl.sum(acc_post, axis=1) * rstd * s_post
                              + tl.load(base_ptr + HC + i_idx, mask=i_ok, other=0.0).to(tl.float32))
        tl.store(post_ptr + t * stride_pt + i_idx, post, mask=i_ok)
        ij = i_idx[:, None] * HC + i_idx[None, :]
        logits = tl.sum(acc_comb, axis=2) * rstd * s_comb \
            + tl.load(base_ptr + 2 * HC + ij, mask=ij_ok, other=0.0).to(tl.float32)
        tl.store(comb_ptr + t * stride_ct + ij, _sinkhorn_tile(logits, ij_ok, iters, hc_eps), mask=ij_ok)

    # Pass 2: the collapse, rounded to the streams' dtype as the twin does, and its sum of squares;
    # pass 3 recomputes it (cheaper than a round trip through memory) and writes the RMSNorm.
    out_ty = x_ptr.dtype.element_ty
    csq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        xs = tl.load(row + i_idx[:, None] * stride_sh + d[None, :] * stride_sd,
                     mask=i_ok[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        c = tl.sum(pre[:, None] * xs, axis=0).to(out_ty).to(tl.float32)
        csq += c * c
    crstd = 1.0 / tl.sqrt(tl.sum(csq, axis=0) / D + norm_eps)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xs = tl.load(row + i_idx[:, None] * stride_sh + d[None, :] * stride_sd,
                     mask=i_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        c = tl.sum(pre[:, None] * xs, axis=0).to(out_ty).to(tl.float32)
        w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        tl.store(x_ptr + t * stride_xt + d, (w * (c * crstd)).to(out_ty), mask=d_ok)


def _launch_mix(streams, fn, base, scale, norm_weight, iters, hc_eps, norm_eps, head):
    T, hc, D = streams.shape
    x = torch.empty(T, D, dtype=streams.dtype, device=streams.device)
    post = torch.empty(T, 0 if head else hc, dtype=torch.float32, device=streams.device)
    comb = torch.empty(T, 0 if head else hc, 0 if head else hc, dtype=torch.float32, device=streams.device)
    if T == 0 or D == 0:
        return x, post, comb
    _hc_mix_kernel[(T,)](
        streams, fn, base, scale, norm_weight, x, post, comb,
        hc, D, int(iters), float(hc_eps), float(norm_eps),
        *streams.stride(), *fn.stride(),
        x.stride(0), max(1, post.stride(0)), max(1, comb.stride(0)),
        HEAD=head, BLOCK_HC=triton.next_power_of_2(hc), BLOCK_K=BLOCK_K,
        BLOCK_D=min(BLOCK_D, triton.next_power_of_2(D)),
        num_warps=8,  # the (2 + hc) * hc running dot products are ~6k fp32 accumulators per program
    )
    return x, post, comb


def hc_pre_triton(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                  norm_weight: torch.Tensor, iters: int, hc_eps: float,
                  norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: the twin's (x, post, comb). base/scale/norm_weight are read contiguous."""
    return _launch_mix(streams, fn, base.contiguous(), scale.contiguous(), norm_weight.contiguous(),
                       iters, hc_eps, norm_eps, head=False)


def hc_head_triton(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                   norm_weight: torch.Tensor, hc_eps: float, norm_eps: float) -> torch.Tensor:
    return _launch_mix(streams, fn, base.contiguous(), scale.contiguous(), norm_weight.contiguous(),
                       1, hc_eps, norm_eps, head=True)[0]


# ---------------------------------------------------------------------------------------------
# Triton: post (one program per token row and block of channels)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _hc_post_kernel(
    o_ptr, s_ptr, p_ptr, c_ptr, y_ptr,
    HC, D,
    stride_ot, stride_od, stride_st, stride_sh, stride_sd,
    stride_pt, stride_ph, stride_ct, stride_cj, stride_ck,
    stride_yt, stride_yh, stride_yd,
    BLOCK_HC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_HC)
    h_ok = h < HC
    d_ok = d < D
    hd_ok = h_ok[:, None] & d_ok[None, :]
    ty = y_ptr.dtype.element_ty
    # Rounding points of the twin: post and comb cast to the streams' dtype, the product and the
    # matmul (fp32 accumulation) each rounded, then their sum.
    p = tl.load(p_ptr + t * stride_pt + h * stride_ph, mask=h_ok, other=0.0).to(ty).to(tl.float32)
    c = tl.load(c_ptr + t * stride_ct + h[:, None] * stride_cj + h[None, :] * stride_ck,
                mask=h_ok[:, None] & h_ok[None, :], other=0.0).to(ty).to(tl.float32)
    o = tl.load(o_ptr + t * stride_ot + d * stride_od, mask=d_ok, other=0.0).to(tl.float32)
    xs = tl.load(s_ptr + t * stride_st + h[:, None] * stride_sh + d[None, :] * stride_sd,
                 mask=hd_ok, other=0.0).to(tl.float32)
    expand = (p[:, None] * o[None, :]).to(ty).to(tl.float32)
    mixed = tl.sum(c[:, :, None] * xs[:, None, :], axis=0).to(ty).to(tl.float32)  # sum over comb's FIRST index
    tl.store(y_ptr + t * stride_yt + h[:, None] * stride_yh + d[None, :] * stride_yd, (expand + mixed).to(ty),
             mask=hd_ok)


def hc_post_triton(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    T, hc, D = streams.shape
    y = torch.empty(T, hc, D, dtype=streams.dtype, device=streams.device)
    if y.numel() == 0:
        return y
    block_d = min(BLOCK_D, triton.next_power_of_2(D))
    _hc_post_kernel[(T, triton.cdiv(D, block_d))](
        out, streams, post, comb, y, hc, D,
        *out.stride(), *streams.stride(), *post.stride(), *comb.stride(), *y.stride(),
        BLOCK_HC=triton.next_power_of_2(hc), BLOCK_D=block_d,
    )
    return y
