"""Routed-expert SwiGLU MLPs of one rank (spec §3.8), weights in their stored forms.

For token ``t`` and each of its ``k`` assignments ``(e, w) = (experts[t, j], weights[t, j])`` with
``e`` in this rank's ``[expert_start, expert_start + E)`` (other ranks' experts count zero: expert
parallelism, summed by the caller's all-reduce)::

    act     = swiglu(x[t] @ w1_e.T, x[t] @ w3_e.T, limit) * w     # gate, up; weight before w2
    out[t] += act.to(x.dtype) @ w2_e.T                            # fp32 [T, D]

Weights: ``w1, w3 [E, I, D]`` and ``w2 [E, D, I]`` each in one format of ``kernels/gemm.py``
(dense views of the stacks ``gate_up[:, :I]``, ``gate_up[:, I:]``, ``down``; or FP8 / MXFP4 with
per-expert scales ``[E, ...]``).

``moe_experts_torch`` is the twin: ``StackedExperts.forward`` of the engine (assignments sorted by
expert into tiles, each tile one batched matmul). ``moe_experts_triton`` has two paths, each two
weight-reading launches:

- decode (few assignments per expert; the default below ``TILED_MIN_PER_EXPERT`` per expert):
  1. gate/up, one program per (assignment, block of I): both projections of ``x[t]`` as
     matrix-vector products, SwiGLU and the routing weight, stored in x's dtype to ``act [T*k, I]``;
  2. down, one program per (token, block of D): the k assignments' ``act @ w2_e.T`` summed in
     registers (no atomics, deterministic) into the fp32 output.
  Nothing is sorted (sorting costs a dozen small launches per layer), and each program reads its
  expert's weight rows once; tokens sharing an expert re-read them through L2.
- prefill (many assignments per expert): one launch (``expert_tiles_triton``, the twin of
  ``expert_tiles``) sorts the assignments into tiles of ``TILE_M`` rows of one expert (foreign
  ones into an extra bucket that computes nothing); the
  same two stages run as ``tl.dot`` tiles, so each weight tile is read once per ``TILE_M``
  assignments; the down stage writes per-assignment rows and one ``sum`` over k finishes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gemm import check_weight, dequantize_weight, kernel_weight_args, load_weight_tile, weight_shape
from kernels.torch_math import swiglu

MAX_TILE = 64  # rows per expert tile for large batches
TILES_PER_CHUNK = 256  # bounds the gathered weight workspace of the torch path

BLOCK_N = 64
BLOCK_K = 64  # divides the FP8 scale block, multiple of the FP4 one
TILE_M = 64  # assignments per expert tile (prefill path)
TILED_MIN_PER_EXPERT = 16  # mean assignments per local expert from which tiles beat per-assignment


# ---- argument checks ----------------------------------------------------------------------
def check_moe_args(x, experts, weights, expert_start, w1, s1, w3, s3, w2, s2, fmt) -> None:
    """Raise ValueError (naming the parameter) unless the arguments describe one rank's experts."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise ValueError("x must be a floating tensor [T, D]")
    T, D = x.shape
    if not isinstance(experts, torch.Tensor) or experts.dim() != 2 or experts.shape[0] != T \
            or experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"experts must be int32/int64 [T={T}, k], got {getattr(experts, 'shape', experts)}")
    if not isinstance(weights, torch.Tensor) or weights.dtype != torch.float32 \
            or weights.shape != experts.shape:
        raise ValueError(f"weights must be float32 of experts' shape {tuple(experts.shape)}")
    if not isinstance(expert_start, int) or expert_start < 0:
        raise ValueError(f"expert_start must be a non-negative int, got {expert_start!r}")
    for w, s, name in ((w1, s1, "w1"), (w3, s3, "w3"), (w2, s2, "w2")):
        check_weight(w, s, fmt, name, f"s{name[1]}")
        if w.dim() != 3:
            raise ValueError(f"{name} must be [E, out, in], got shape {tuple(w.shape)}")
    E = w1.shape[0]
    inter, w_dim = weight_shape(w1, fmt)
    if w_dim != D:
        raise ValueError(f"x must be [T, D={w_dim}] for these experts, got shape {tuple(x.shape)}")
    for w, name, want in ((w1, "w1", (E, inter, D)), (w3, "w3", (E, inter, D)), (w2, "w2", (E, D, inter))):
        if (w.shape[0], *weight_shape(w, fmt)) != want:
            raise ValueError(f"{name} must be logically {want} ({fmt}), got stored shape {tuple(w.shape)}")
    if E == 0:
        raise ValueError("w1 must hold at least one expert")
    if fmt != "dense" and not s1.dtype == s3.dtype == s2.dtype:
        raise ValueError(f"s1, s3 and s2 must share one dtype, got {s1.dtype}, {s3.dtype}, {s2.dtype}")
    tensors = (x, experts, weights, w1, s1, w3, s3, w2, s2)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, experts, weights and the expert weights must share one device, "
                         f"got {sorted(map(str, devices))}")


# ---- torch twin ---------------------------------------------------------------------------
def dequantize_stack(w: torch.Tensor, s: torch.Tensor | None, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """``[E, out, in]`` dense stack of a stored ``[E, ...]`` part (dense parts pass through)."""
    if fmt == "dense":
        return w
    if fmt == "fp4":  # rows are independent: dequantise the stack as one matrix
        return dequantize_weight(w.flatten(0, 1), s.flatten(0, 1), fmt, dtype).view(w.shape[0], w.shape[1], -1)
    return torch.stack([dequantize_weight(w[e], s[e], fmt, dtype) for e in range(w.shape[0])])


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


def moe_experts_torch(x, experts, weights, expert_start, w1, s1, w3, s3, w2, s2, fmt, limit) -> torch.Tensor:
    """Plain-torch twin: ``StackedExperts.forward`` (tiles sorted by expert, one bmm per chunk)."""
    # Dense stacks compute in their own dtype (as the engine's); stored ones decode to x's.
    wdtype = w1.dtype if fmt == "dense" else x.dtype
    w1, w3, down = (dequantize_stack(w, s, fmt, wdtype) for w, s in ((w1, s1), (w3, s3), (w2, s2)))
    T, k = experts.shape
    n_local, inter = w1.shape[0], w1.shape[1]
    local = experts - expert_start
    owned = (local >= 0) & (local < n_local)
    weights = torch.where(owned, weights, 0.0).flatten()
    assignments = local.clamp(0, n_local - 1).flatten().long()
    A = T * k
    tile = min(MAX_TILE, _next_pow2(-(-A // n_local)))
    rows, tile_expert = expert_tiles(assignments, n_local, tile)
    x_pad = torch.cat([x, x.new_zeros(1, x.shape[1])])  # row T: the padding source
    w_pad = torch.cat([weights, weights.new_zeros(1)])
    token = torch.where(rows < A, rows // k, T)
    out = torch.zeros(T + 1, x.shape[1], dtype=torch.float32, device=x.device)
    for c in range(0, tile_expert.shape[0], TILES_PER_CHUNK):
        te = tile_expert[c:c + TILES_PER_CHUNK]
        tok = token[c * tile:(c + te.shape[0]) * tile]
        xs = x_pad[tok].view(te.shape[0], tile, -1)
        gate_up = torch.cat([w1[te], w3[te]], dim=1)  # the engine's gate_up[te], same layout and values
        h = torch.bmm(xs.to(wdtype), gate_up.transpose(1, 2)).float()
        act = swiglu(h[..., :inter], h[..., inter:], limit)
        # The routing weight multiplies the activation before w2 (reference order).
        act = act * w_pad[rows[c * tile:(c + te.shape[0]) * tile]].view(te.shape[0], tile, 1)
        y = torch.bmm(act.to(down.dtype), down[te].transpose(1, 2))
        out.index_add_(0, tok, y.reshape(-1, y.shape[-1]).float())
    return out[:T]


# ---- Triton -------------------------------------------------------------------------------
@triton.jit
def _expert_of(experts_ptr, weights_ptr, a, TOPK, stride_et, stride_ek, stride_wt, stride_wk, expert_start, E):
    """(local expert id clamped into the stack, routing weight, owned) of assignment ``a``."""
    t = a // TOPK
    j = a % TOPK
    e = tl.load(experts_ptr + t * stride_et + j * stride_ek).to(tl.int64) - expert_start
    owned = (e >= 0) & (e < E)
    w = tl.load(weights_ptr + t * stride_wt + j * stride_wk)
    return tl.where(owned, e, 0), w, owned


@triton.jit
def _gate_up_kernel(
    x_ptr, experts_ptr, weights_ptr, act_ptr,
    w1_ptr, s1_ptr, w3_ptr, s3_ptr,
    TOPK, expert_start, E, INTER, D, limit,
    stride_xt, stride_xd, stride_et, stride_ek, stride_rt, stride_rk, stride_aa, stride_ai,
    stride_w1e, stride_w1n, stride_w1k, stride_s1e, stride_s1n, stride_s1k,
    stride_w3e, stride_w3n, stride_w3k, stride_s3e, stride_s3n, stride_s3k,
    FMT: tl.constexpr, SCALE_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # act[a, n] = swiglu(x[t] . w1_e[n], x[t] . w3_e[n]) * weight[a]; foreign experts read nothing -> 0.
    a = tl.program_id(0).to(tl.int64)
    e, route_w, owned = _expert_of(experts_ptr, weights_ptr, a, TOPK, stride_et, stride_ek, stride_rt, stride_rk,
                                   expert_start, E)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Foreign experts get empty extents (a scalar-bool mask term trips the interpreter).
    d_end = tl.where(owned, D, 0)
    n_ok = n < tl.where(owned, INTER, 0)
    rows = n.to(tl.int64)[:, None]
    x_row = x_ptr + (a // TOPK) * stride_xt
    h = tl.zeros([BLOCK_N], dtype=tl.float32)
    u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < d_end
        xv = tl.load(x_row + k * stride_xd, mask=k_ok, other=0.0).to(tl.float32)
        ok = n_ok[:, None] & k_ok[None, :]
        cols = k.to(tl.int64)[None, :]
        g1 = load_weight_tile(w1_ptr + e * stride_w1e, s1_ptr + e * stride_s1e, rows, cols, ok,
                              stride_w1n, stride_w1k, stride_s1n, stride_s1k, FMT, SCALE_F32)
        h += tl.sum(g1 * xv[None, :], axis=1)
        g3 = load_weight_tile(w3_ptr + e * stride_w3e, s3_ptr + e * stride_s3e, rows, cols, ok,
                              stride_w3n, stride_w3k, stride_s3n, stride_s3k, FMT, SCALE_F32)
        u += tl.sum(g3 * xv[None, :], axis=1)
    act = _swiglu(h, u, limit) * tl.where(owned, route_w, 0.0)
    tl.store(act_ptr + a * stride_aa + n * stride_ai, act.to(act_ptr.dtype.element_ty), mask=n < INTER)


@triton.jit
def _swiglu(h, u, limit):
    """silu(min(h, limit)) * clamp(u, -limit, limit); no clamps when limit <= 0."""
    if limit > 0:
        h = tl.minimum(h, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    return h * tl.sigmoid(h) * u


@triton.jit
def _tile_dot(acc, a_ptrs, a_ok, w_ptr, s_ptr, rows, n_ok, KDIM, stride_ak, stride_wn, stride_wk, stride_sn, stride_sk,
              FMT: tl.constexpr, SCALE_F32: tl.constexpr, IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc [BM, BN] += A [BM, KDIM] @ W[rows, :KDIM].T`` (A rows at ``a_ptrs [BM, 1]``), W decoded."""
    for k0 in range(0, KDIM, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < KDIM
        at = tl.load(a_ptrs + k[None, :] * stride_ak, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        wt = load_weight_tile(w_ptr, s_ptr, rows, k.to(tl.int64)[None, :], n_ok[:, None] & k_ok[None, :],
                              stride_wn, stride_wk, stride_sn, stride_sk, FMT, SCALE_F32)
        if IEEE:
            acc = tl.dot(at, tl.trans(wt), acc, input_precision="ieee")
        else:
            acc = tl.dot(at, tl.trans(wt.to(at.dtype)), acc)
    return acc


@triton.jit
def _tile_assignments(rows_ptr, tile_expert_ptr, A, E, BLOCK_M: tl.constexpr):
    """This program's tile: its assignment ids, which of them compute (tiles of bucket E hold
    foreign ones: none), and its expert clamped into the stack."""
    tile = tl.program_id(0).to(tl.int64)
    a = tl.load(rows_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    return a, a < tl.where(e < E, A, 0), tl.minimum(e, E - 1)


@triton.jit
def _gate_up_tiled_kernel(
    x_ptr, rows_ptr, tile_expert_ptr, weights_ptr, act_ptr,
    w1_ptr, s1_ptr, w3_ptr, s3_ptr,
    A, TOPK, E, INTER, D, limit,
    stride_xt, stride_xd, stride_aa, stride_ai,
    stride_w1e, stride_w1n, stride_w1k, stride_s1e, stride_s1n, stride_s1k,
    stride_w3e, stride_w3n, stride_w3k, stride_s3e, stride_s3n, stride_s3k,
    FMT: tl.constexpr, SCALE_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per (tile of one expert's assignments, block of I): the expert's weight tile is
    # read once for BLOCK_M assignments. Tiles of expert E hold foreign assignments: act = 0.
    a, a_ok, e = _tile_assignments(rows_ptr, tile_expert_ptr, A, E, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < INTER
    rows = n.to(tl.int64)[:, None]
    x_rows = x_ptr + (a // TOPK)[:, None] * stride_xt
    h = _tile_dot(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), x_rows, a_ok, w1_ptr + e * stride_w1e,
                  s1_ptr + e * stride_s1e, rows, n_ok, D, stride_xd, stride_w1n, stride_w1k, stride_s1n, stride_s1k,
                  FMT, SCALE_F32, IEEE, BLOCK_K)
    u = _tile_dot(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), x_rows, a_ok, w3_ptr + e * stride_w3e,
                  s3_ptr + e * stride_s3e, rows, n_ok, D, stride_xd, stride_w3n, stride_w3k, stride_s3n, stride_s3k,
                  FMT, SCALE_F32, IEEE, BLOCK_K)
    route_w = tl.load(weights_ptr + a, mask=a_ok, other=0.0)  # weights flattened [T * k]
    act = _swiglu(h, u, limit) * route_w[:, None]
    tl.store(act_ptr + a[:, None] * stride_aa + n[None, :] * stride_ai, act.to(act_ptr.dtype.element_ty),
             mask=(a < A)[:, None] & n_ok[None, :])


@triton.jit
def _down_tiled_kernel(
    act_ptr, rows_ptr, tile_expert_ptr, y_ptr, w2_ptr, s2_ptr,
    A, E, INTER, D,
    stride_aa, stride_ai, stride_ya, stride_yd,
    stride_w2e, stride_w2n, stride_w2k, stride_s2e, stride_s2n, stride_s2k,
    FMT: tl.constexpr, SCALE_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # y[a, n] = act[a] . w2_e[n] per assignment (foreign: 0); the caller sums each token's k rows.
    a, a_ok, e = _tile_assignments(rows_ptr, tile_expert_ptr, A, E, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D
    y = _tile_dot(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), act_ptr + a[:, None] * stride_aa, a_ok,
                  w2_ptr + e * stride_w2e, s2_ptr + e * stride_s2e, n.to(tl.int64)[:, None], n_ok, INTER, stride_ai,
                  stride_w2n, stride_w2k, stride_s2n, stride_s2k, FMT, SCALE_F32, IEEE, BLOCK_K)
    tl.store(y_ptr + a[:, None] * stride_ya + n[None, :] * stride_yd, y, mask=(a < A)[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr, experts_ptr, weights_ptr, out_ptr, w2_ptr, s2_ptr,
    TOPK, expert_start, E, INTER, D,
    stride_aa, stride_ai, stride_et, stride_ek, stride_rt, stride_rk, stride_ot, stride_od,
    stride_w2e, stride_w2n, stride_w2k, stride_s2e, stride_s2n, stride_s2k,
    FMT: tl.constexpr, SCALE_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[t, n] = sum_j act[t*k + j] . w2_{e_j}[n]: the sum over k stays in registers.
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = n.to(tl.int64)[:, None]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(0, TOPK):
        a = t * TOPK + j
        e, route_w, owned = _expert_of(experts_ptr, weights_ptr, a, TOPK, stride_et, stride_ek, stride_rt,
                                       stride_rk, expert_start, E)
        n_ok = n < tl.where(owned, D, 0)
        i_end = tl.where(owned, INTER, 0)
        for k0 in range(0, INTER, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < i_end
            av = tl.load(act_ptr + a * stride_aa + k * stride_ai, mask=k_ok, other=0.0).to(tl.float32)
            wt = load_weight_tile(w2_ptr + e * stride_w2e, s2_ptr + e * stride_s2e, rows, k.to(tl.int64)[None, :],
                                  n_ok[:, None] & k_ok[None, :], stride_w2n, stride_w2k, stride_s2n, stride_s2k,
                                  FMT, SCALE_F32)
            acc += tl.sum(wt * av[None, :], axis=1)
    tl.store(out_ptr + t * stride_ot + n * stride_od, acc, mask=n < D)


def _weight_strides(w: torch.Tensor, s: torch.Tensor | None) -> tuple[int, ...]:
    return (*w.stride(), *(s.stride() if s is not None else (0, 0, 0)))


def moe_experts_triton(x, experts, weights, expert_start, w1, s1, w3, s3, w2, s2, fmt, limit,
                       tiled: bool | None = None) -> torch.Tensor:
    """``[T, D]`` float32 by the per-assignment kernels (decode) or, once the batch gives each expert
    about ``TILED_MIN_PER_EXPERT`` assignments (``tiled`` None: by shape; no sync), the expert tiles."""
    T, D = x.shape
    k = experts.shape[1]
    E = w1.shape[0]
    if T == 0 or k == 0:
        return torch.zeros(T, D, dtype=torch.float32, device=x.device)
    if tiled is None:
        tiled = T * k >= TILED_MIN_PER_EXPERT * E
    parts = [kernel_weight_args(w, s, fmt) for w, s in ((w1, s1), (w3, s3), (w2, s2))]
    weight_args = [(w, s) for w, s, _, _ in parts]
    strides = [_weight_strides(w, s) for w, s in ((w1, s1), (w3, s3), (w2, s2))]
    _, _, code, scale_f32 = parts[0]
    run = _moe_tiled if tiled else _moe_per_assignment
    return run(x, experts, weights, expert_start, E, w1.shape[1], weight_args, strides, float(limit),
               dict(FMT=code, SCALE_F32=scale_f32, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K))


def _moe_per_assignment(x, experts, weights, expert_start, E, inter, weight_args, strides, limit, meta):
    """Two launches, nothing sorted: gate/up per (assignment, I block), down + sum per (token, D block)."""
    T, D = x.shape
    k = experts.shape[1]
    (w1k, s1k), (w3k, s3k), (w2k, s2k) = weight_args
    act = torch.empty(T * k, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(T, D, dtype=torch.float32, device=x.device)
    _gate_up_kernel[(T * k, triton.cdiv(inter, BLOCK_N))](
        x, experts, weights, act, w1k, s1k, w3k, s3k,
        k, expert_start, E, inter, D, limit,
        *x.stride(), *experts.stride(), *weights.stride(), *act.stride(), *strides[0], *strides[1], **meta)
    _down_kernel[(T, triton.cdiv(D, BLOCK_N))](
        act, experts, weights, out, w2k, s2k,
        k, expert_start, E, inter, D,
        *act.stride(), *experts.stride(), *weights.stride(), *out.stride(), *strides[2], **meta)
    return out


@triton.jit
def _bucket(experts_ptr, a, ok, expert_start, E):
    """Bucket of assignments ``a``: the local expert, E for a foreign one, -1 past the end."""
    local = tl.load(experts_ptr + a, mask=ok, other=0).to(tl.int32) - expert_start
    return tl.where(ok, tl.where((local >= 0) & (local < E), local, E), -1)


@triton.jit
def _expert_tiles_kernel(experts_ptr, rows_ptr, tile_expert_ptr, A, expert_start, E, n_tiles,
                         TILE: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    # One program: count per bucket (local expert, or E for foreign ones), pad each bucket to whole
    # tiles, then place every assignment at its bucket's start + its rank among the bucket's earlier
    # assignments (the stable order of expert_tiles), padding rows holding A.
    lanes = tl.arange(0, E_PAD)
    idx = tl.arange(0, BLOCK)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for a0 in range(0, A, BLOCK):
        a = a0 + idx
        ok = a < A
        bucket = _bucket(experts_ptr, a, ok, expert_start, E)
        counts += tl.sum((bucket[:, None] == lanes[None, :]).to(tl.int32), axis=0)
    padded = (counts + TILE - 1) // TILE * TILE
    seg_end = tl.cumsum(padded, axis=0)
    placed = seg_end - padded  # each bucket's next free row
    for s0 in range(0, n_tiles * TILE, BLOCK):
        s = s0 + idx
        tl.store(rows_ptr + s, (s * 0 + A).to(tl.int64), mask=s < n_tiles * TILE)
    for a0 in range(0, A, BLOCK):
        a = a0 + idx
        ok = a < A
        bucket = _bucket(experts_ptr, a, ok, expert_start, E)
        onehot = bucket[:, None] == lanes[None, :]
        earlier = (bucket[:, None] == bucket[None, :]) & (idx[None, :] < idx[:, None])
        slot = tl.sum(tl.where(onehot, placed[None, :], 0), axis=1) + tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(rows_ptr + slot, a.to(tl.int64), mask=ok)
        placed += tl.sum(onehot.to(tl.int32), axis=0)
    real = lanes <= E
    for t0 in range(0, n_tiles, BLOCK):
        t = t0 + idx
        # searchsorted(seg_end, t * TILE, right=True) over the E + 1 buckets, clamped to the last.
        ahead = (seg_end[None, :] <= (t * TILE)[:, None]) & real[None, :]
        te = tl.minimum(tl.sum(ahead.to(tl.int32), axis=1), E)
        tl.store(tile_expert_ptr + t, te.to(tl.int64), mask=t < n_tiles)


def expert_tiles_triton(experts: torch.Tensor, expert_start: int, E: int, tile: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``expert_tiles`` of the assignments ``experts`` (global ids, any shape) bucketed to local
    experts ``[0, E)`` and ``E`` for foreign ones, in one launch."""
    flat = experts.reshape(-1)
    A = flat.shape[0]
    n_buckets = E + 1
    n_tiles = -(-(A + min(A, n_buckets) * (tile - 1)) // tile)
    rows = torch.empty(n_tiles * tile, dtype=torch.long, device=experts.device)
    tile_expert = torch.empty(n_tiles, dtype=torch.long, device=experts.device)
    if n_tiles:
        _expert_tiles_kernel[(1,)](flat, rows, tile_expert, A, expert_start, E, n_tiles,
                                   TILE=tile, BLOCK=64, E_PAD=triton.next_power_of_2(n_buckets))
    return rows, tile_expert


def _moe_tiled(x, experts, weights, expert_start, E, inter, weight_args, strides, limit, meta):
    """Prefill: assignments sorted into tiles of one expert each (``expert_tiles``; foreign ones into
    a bucket ``E`` that computes nothing), ``tl.dot`` tiles reading each weight tile once per tile,
    then the sum over each token's k rows."""
    T, D = x.shape
    k = experts.shape[1]
    A = T * k
    (w1k, s1k), (w3k, s3k), (w2k, s2k) = weight_args
    rows, tile_expert = expert_tiles_triton(experts, expert_start, E, TILE_M)
    act = torch.empty(A, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(A, D, dtype=torch.float32, device=x.device)
    meta = dict(meta, IEEE=x.dtype == torch.float32, BLOCK_M=TILE_M)
    n_tiles = tile_expert.shape[0]
    _gate_up_tiled_kernel[(n_tiles, triton.cdiv(inter, BLOCK_N))](
        x, rows, tile_expert, weights.reshape(-1), act, w1k, s1k, w3k, s3k,
        A, k, E, inter, D, limit,
        *x.stride(), *act.stride(), *strides[0], *strides[1], **meta)
    _down_tiled_kernel[(n_tiles, triton.cdiv(D, BLOCK_N))](
        act, rows, tile_expert, y, w2k, s2k,
        A, E, inter, D,
        *act.stride(), *y.stride(), *strides[2], **meta)
    return y.view(T, k, D).sum(1)
