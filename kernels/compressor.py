"""The compressor's pooling (spec §3.6) after its two fp32 GEMMs, as two fused kernels.

Inputs are the raw GEMM outputs of the step's ``T`` rows, ``kv``/``score`` ``[T, coff*d]`` fp32
(``coff`` = 2 with ``overlap`` (CSA), else 1; ``score`` without the positional bias ``ape``), and
the compressor's state ring ``state_kv``/``state_score`` ``[slots + 1, S, coff*d]`` fp32 (position
``p`` at row ``p % S``, the last slot the padding row addressed as ``NO_SLOT``; ring scores hold
the bias already). The slot at position ``p`` of a sequence is its step row ``row0 + p - start``
when ``p >= start`` (fed this step), else its ring row; a step score gets ``ape[p % ratio]``.

``compress_entries``: entry ``i`` (sequence ``seq[i]``, window ``w = window[i]``) pools, per
channel, a softmax over slots of kv: the ``ratio`` positions ``[w*m, (w+1)*m)`` (channels
``[d, 2d)`` with overlap), and with overlap also the ``ratio`` positions of window ``w - 1``
(channels ``[0, d)``; none for ``w == 0``). Then ``.to(out_dtype)``, RMSNorm with ``norm_weight``
and the interleaved RoPE of the trailing ``2 * cos.shape[1]`` channels at the caller's cos/sin.
Entries whose window is not complete get finite filler (whatever the clamped rows hold).

``store_compressor_state``: each step row ``t`` (position ``p``) goes into its sequence's ring
at ``p % S`` when a later step may pool it: ``p >= keep_from``, the start of the window in
progress (and with overlap, the one before) counted from ``slack = S - coff*ratio`` tokens before
the step's end, since a verify chunk may roll back that many rejected tokens. Others are dropped.

``*_torch`` are the twins (the engine's math before fusion, op for op); ``*_triton`` launch one
kernel each. The Triton kernels need ``d`` even (channels run as even/odd halves for RoPE pairs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.torch_math import apply_rope, rms_norm

NO_SLOT = -1  # a sequence without state slot, or a row not kept: the padding row (engine's NO_SLOT)
TILE_ELEMENTS = 2048  # slots x channel pairs per step of the pooling loops (registers per program)
BLOCK_W = 1024  # state-row channels per step of the store loop


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------
def _check_fp32(name: str, t: torch.Tensor, shape: tuple) -> None:
    if t.dtype != torch.float32 or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be float32 {list(shape)}, got {t.dtype} {tuple(t.shape)}")


def _check_index(name: str, t: torch.Tensor, n: int | None, what: str) -> None:
    if t.dim() != 1 or t.dtype != torch.long or (n is not None and t.shape[0] != n):
        raise ValueError(f"{name} must be int64 [{what}], got {t.dtype} {tuple(t.shape)}")


def _check_common(kv, score, ape, state_kv, state_score, width_of: str, ratio: int, overlap: bool) -> None:
    if kv.dim() != 2 or kv.dtype != torch.float32:
        raise ValueError(f"kv must be float32 [T, coff*d], got {kv.dtype} {tuple(kv.shape)}")
    T, width = kv.shape
    _check_fp32("score", score, (T, width))
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    _check_fp32("ape", ape, (ratio, width))
    if state_kv.dim() != 3 or state_kv.dtype != torch.float32 or state_kv.shape[2] != width \
            or state_kv.shape[0] < 1 or state_kv.shape[1] < (2 if overlap else 1) * ratio:
        raise ValueError(f"state_kv must be float32 [slots + 1, S >= {(2 if overlap else 1) * ratio}, "
                         f"{width_of}={width}], got {state_kv.dtype} {tuple(state_kv.shape)}")
    _check_fp32("state_score", state_score, tuple(state_kv.shape))


def check_compress_entries_args(kv, score, ape, state_kv, state_score, seq, window, start_pos, cu_seqlens,
                                state_slots, norm_weight, cos, sin, ratio, overlap) -> None:
    """Raise ValueError (naming the parameter) unless the arguments describe one step's pooling."""
    if norm_weight.dim() != 1 or not norm_weight.is_floating_point() or norm_weight.shape[0] % 2:
        raise ValueError(f"norm_weight must be a floating [d] tensor, d even (RoPE pairs), "
                         f"got {norm_weight.dtype} {tuple(norm_weight.shape)}")
    d = norm_weight.shape[0]
    coff = 2 if overlap else 1
    if kv.dim() != 2 or kv.shape[1] != coff * d:
        raise ValueError(f"kv must be float32 [T, {coff}*d={coff * d}] ({'' if overlap else 'no '}overlap), "
                         f"got {kv.dtype} {tuple(kv.shape)}")
    _check_common(kv, score, ape, state_kv, state_score, f"{coff}*d", ratio, overlap)
    _check_index("seq", seq, None, "E")
    E = seq.shape[0]
    _check_index("window", window, E, f"E={E}")
    _check_index("start_pos", start_pos, None, "B")
    B = start_pos.shape[0]
    _check_index("cu_seqlens", cu_seqlens, B + 1, f"B+1={B + 1}")
    _check_index("state_slots", state_slots, B, f"B={B}")
    if cos.dim() != 2 or cos.shape[0] != E or not 0 < 2 * cos.shape[1] <= d or sin.shape != cos.shape \
            or not cos.is_floating_point() or sin.dtype != cos.dtype:
        raise ValueError(f"cos and sin must be floating [E={E}, rope_dim/2 in 1..{d // 2}], "
                         f"got {tuple(cos.shape)}, {tuple(sin.shape)}")
    tensors = (kv, score, ape, state_kv, state_score, seq, window, start_pos, cu_seqlens, state_slots,
               norm_weight, cos, sin)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must share one device, got {sorted(map(str, devices))}")


def check_store_compressor_state_args(kv, score, ape, positions, seq_ids, state_slots, end_pos, state_kv,
                                      state_score, ratio, overlap) -> None:
    _check_common(kv, score, ape, state_kv, state_score, "width", ratio, overlap)
    T = kv.shape[0]
    _check_index("positions", positions, T, f"T={T}")
    _check_index("seq_ids", seq_ids, T, f"T={T}")
    _check_index("state_slots", state_slots, None, "B")
    _check_index("end_pos", end_pos, state_slots.shape[0], f"B={state_slots.shape[0]}")
    tensors = (kv, score, ape, positions, seq_ids, state_slots, end_pos, state_kv, state_score)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must share one device, got {sorted(map(str, devices))}")


# ---------------------------------------------------------------------------------------------
# Torch twins (the engine's Compressor.forward before fusion, op for op)
# ---------------------------------------------------------------------------------------------
def _slot_rows(positions, kv, score, ape, state_kv, state_score, start, row0, slot, cols: slice):
    """kv/score of ``positions [E, m]`` (channels ``cols``): this step's rows for positions fed
    now (score + ape), the ring otherwise (read before this step's rows are stored)."""
    in_step = (positions >= start)[..., None]
    rows = (row0 + positions - start).clamp(0, kv.shape[0] - 1)
    ring = positions % state_kv.shape[1]
    step_score = score[rows, cols] + ape[positions % ape.shape[0], cols]
    return (torch.where(in_step, kv[rows, cols], state_kv[slot, ring, cols]),
            torch.where(in_step, step_score, state_score[slot, ring, cols]))


def compress_entries_torch(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, state_kv: torch.Tensor,
                           state_score: torch.Tensor, seq: torch.Tensor, window: torch.Tensor,
                           start_pos: torch.Tensor, cu_seqlens: torch.Tensor, state_slots: torch.Tensor,
                           norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ratio: int,
                           overlap: bool, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Entries ``[E, d]`` in ``out_dtype`` (see the module docstring)."""
    m, d = ratio, norm_weight.shape[0]
    rows = (kv, score, ape, state_kv, state_score,
            start_pos[seq][:, None], cu_seqlens[seq][:, None], state_slots[seq][:, None])
    window_pos = window[:, None] * m + torch.arange(m, device=kv.device)  # [E, m]
    if overlap:  # series A of the window before (zero weight for the first window), B of this one
        cur_kv, cur_sc = _slot_rows(window_pos, *rows, slice(d, 2 * d))
        prev_kv, prev_sc = _slot_rows(window_pos - m, *rows, slice(0, d))
        first = (window == 0)[:, None, None]
        slots_kv = torch.cat([prev_kv.masked_fill(first, 0.0), cur_kv], dim=1)
        slots_sc = torch.cat([prev_sc.masked_fill(first, float("-inf")), cur_sc], dim=1)
    else:
        slots_kv, slots_sc = _slot_rows(window_pos, *rows, slice(0, d))
    pooled = (slots_kv * torch.softmax(slots_sc, dim=1)).sum(dim=1)
    return apply_rope(rms_norm(pooled.to(out_dtype), norm_weight, eps), cos, sin)


def _kept_slots(positions, seq_ids, state_slots, end_pos, span: int, ratio: int, overlap: bool) -> torch.Tensor:
    """[T] ring slot each row is stored into (NO_SLOT: no later step pools it)."""
    slack = span - (2 if overlap else 1) * ratio
    end = end_pos if slack == 0 else (end_pos - slack).clamp(min=0)
    keep_from = (end // ratio - (1 if overlap else 0)) * ratio
    return torch.where(positions >= keep_from[seq_ids], state_slots[seq_ids], NO_SLOT)


def store_compressor_state_torch(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor,
                                 seq_ids: torch.Tensor, state_slots: torch.Tensor, end_pos: torch.Tensor,
                                 state_kv: torch.Tensor, state_score: torch.Tensor, ratio: int,
                                 overlap: bool) -> None:
    """In place: rows later steps pool into the ring (dropped ones land on the padding row)."""
    span = state_kv.shape[1]
    slots = _kept_slots(positions, seq_ids, state_slots, end_pos, span, ratio, overlap)
    state_kv[slots, positions % span] = kv
    state_score[slots, positions % span] = score + ape[positions % ratio]


# ---------------------------------------------------------------------------------------------
# Triton: compress_entries (one program per entry, the whole row of d channels in registers)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _slots(kv_ptr, sc_ptr, ape_ptr, ring_kv, ring_sc, k, c, c_ok, w, start, row0, T, D, M, RING,
           stride_kt, stride_st, stride_ar, stride_rr, stride_rrs, OVERLAP: tl.constexpr, WITH_KV: tl.constexpr):
    """Score (with ape; -inf off the entry's slots) and, ``WITH_KV``, kv of slots ``k [BLOCK_S]``
    of one entry at channels ``c [BLOCK_D2]`` of its series, float32 ``[BLOCK_S, BLOCK_D2]``."""
    if OVERLAP:  # slots [0, M): series A (channels [0, D)) of window w - 1; [M, 2M): series B of window w
        pos = tl.where(k < M, (w - 1) * M + k, w * M + k - M)
        cols = c[None, :] + tl.where(k < M, 0, D)[:, None]
        # The first window has no predecessor. (w broadcast first: the interpreter mis-types
        # tensor | scalar-bool.)
        real = (k < 2 * M) & ((k >= M) | (k * 0 + w > 0))
    else:
        pos = w * M + k
        cols = c[None, :] + (k * 0)[:, None]
        real = k < M
    in_step = real & (pos >= start)
    from_ring = real & (pos < start)
    rows = (tl.minimum(tl.maximum(row0 + pos - start, 0), T - 1).to(tl.int64))[:, None]
    ring_rows = ((pos % RING + RING) % RING).to(tl.int64)[:, None]
    m_step = in_step[:, None] & c_ok[None, :]
    m_ring = from_ring[:, None] & c_ok[None, :]
    s_step = tl.load(sc_ptr + rows * stride_st + cols, mask=m_step, other=0.0) \
        + tl.load(ape_ptr + ((pos % M + M) % M)[:, None] * stride_ar + cols, mask=m_step, other=0.0)
    s_ring = tl.load(ring_sc + ring_rows * stride_rrs + cols, mask=m_ring, other=0.0)
    sc = tl.where(in_step[:, None], s_step, tl.where(real[:, None], s_ring, float("-inf")))
    if WITH_KV:  # off the entry's slots: 0 (its weight is 0)
        kv = tl.where(in_step[:, None], tl.load(kv_ptr + rows * stride_kt + cols, mask=m_step, other=0.0),
                      tl.load(ring_kv + ring_rows * stride_rr + cols, mask=m_ring, other=0.0))
    else:
        kv = sc
    return kv, sc


@triton.jit
def _running_max_sum(m_i, l_i, s):
    """Per-channel running max and sum of exp(s - max) over a block of slots ``s [BLOCK_S, C]``."""
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no real slot yet: nothing to rescale
    l_i = l_i * tl.exp(m_i - safe) + tl.sum(tl.exp(s - safe[None, :]), axis=0)
    return m_new, l_i


@triton.jit
def _compress_entries_kernel(
    kv_ptr, sc_ptr, ape_ptr, skv_ptr, ssc_ptr, seq_ptr, win_ptr, start_ptr, cu_ptr, slot_ptr,
    w_ptr, cos_ptr, sin_ptr, out_ptr,
    T, D, M, RING, n_state_rows, eps,
    stride_kt, stride_st, stride_ar, stride_rb, stride_rr, stride_rsb, stride_rrs,
    stride_ce, stride_cd, stride_se, stride_sd, stride_oe,
    OVERLAP: tl.constexpr, NOPE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    # Channels run as even / odd halves so that RoPE rotates pairs (2i, 2i+1) in registers.
    e = tl.program_id(0)
    seq = tl.load(seq_ptr + e)
    w = tl.load(win_ptr + e)
    start = tl.load(start_ptr + seq)
    row0 = tl.load(cu_ptr + seq)
    slot = tl.load(slot_ptr + seq)
    slot = tl.where(slot < 0, slot + n_state_rows, slot).to(tl.int64)  # NO_SLOT: the padding row
    ring_kv = skv_ptr + slot * stride_rb
    ring_sc = ssc_ptr + slot * stride_rsb
    i = tl.arange(0, BLOCK_D2)
    i_ok = 2 * i < D
    d_e, d_o = 2 * i, 2 * i + 1
    n_slots = (2 if OVERLAP else 1) * M

    # Per channel, the softmax over slots in two passes: max and denominator, then the sum of
    # kv * (exp(s - max) / denominator), the twin's order of operations.
    m_e = tl.full([BLOCK_D2], float("-inf"), dtype=tl.float32)
    m_o = tl.full([BLOCK_D2], float("-inf"), dtype=tl.float32)
    l_e = tl.zeros([BLOCK_D2], dtype=tl.float32)
    l_o = tl.zeros([BLOCK_D2], dtype=tl.float32)
    for k0 in range(0, n_slots, BLOCK_S):
        k = k0 + tl.arange(0, BLOCK_S)
        _, s_e = _slots(kv_ptr, sc_ptr, ape_ptr, ring_kv, ring_sc, k, d_e, i_ok, w, start, row0, T, D, M, RING,
                        stride_kt, stride_st, stride_ar, stride_rr, stride_rrs, OVERLAP, False)
        _, s_o = _slots(kv_ptr, sc_ptr, ape_ptr, ring_kv, ring_sc, k, d_o, i_ok, w, start, row0, T, D, M, RING,
                        stride_kt, stride_st, stride_ar, stride_rr, stride_rrs, OVERLAP, False)
        m_e, l_e = _running_max_sum(m_e, l_e, s_e)
        m_o, l_o = _running_max_sum(m_o, l_o, s_o)
    acc_e = tl.zeros([BLOCK_D2], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_D2], dtype=tl.float32)
    for k0 in range(0, n_slots, BLOCK_S):
        k = k0 + tl.arange(0, BLOCK_S)
        kv_e, s_e = _slots(kv_ptr, sc_ptr, ape_ptr, ring_kv, ring_sc, k, d_e, i_ok, w, start, row0, T, D, M, RING,
                           stride_kt, stride_st, stride_ar, stride_rr, stride_rrs, OVERLAP, True)
        kv_o, s_o = _slots(kv_ptr, sc_ptr, ape_ptr, ring_kv, ring_sc, k, d_o, i_ok, w, start, row0, T, D, M, RING,
                           stride_kt, stride_st, stride_ar, stride_rr, stride_rrs, OVERLAP, True)
        acc_e += tl.sum(kv_e * (tl.exp(s_e - m_e[None, :]) / l_e[None, :]), axis=0)
        acc_o += tl.sum(kv_o * (tl.exp(s_o - m_o[None, :]) / l_o[None, :]), axis=0)

    # Epilogue at the twin's rounding points: pooled -> out dtype; RMSNorm in fp32 (times the
    # weight, cast); RoPE on the trailing pairs in fp32 (cast).
    ty = out_ptr.dtype.element_ty
    x_e = tl.where(i_ok, acc_e.to(ty).to(tl.float32), 0.0)
    x_o = tl.where(i_ok, acc_o.to(ty).to(tl.float32), 0.0)
    rstd = 1.0 / tl.sqrt((tl.sum(x_e * x_e, axis=0) + tl.sum(x_o * x_o, axis=0)) / D + eps)
    w_e = tl.load(w_ptr + d_e, mask=i_ok, other=0.0).to(tl.float32)
    w_o = tl.load(w_ptr + d_o, mask=i_ok, other=0.0).to(tl.float32)
    y_e = (w_e * (x_e * rstd)).to(ty).to(tl.float32)
    y_o = (w_o * (x_o * rstd)).to(ty).to(tl.float32)
    r = i - NOPE // 2
    is_rope = (r >= 0) & i_ok
    c = tl.load(cos_ptr + e * stride_ce + r * stride_cd, mask=is_rope, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + e * stride_se + r * stride_sd, mask=is_rope, other=0.0).to(tl.float32)
    out_e = tl.where(is_rope, y_e * c - y_o * s, y_e)
    out_o = tl.where(is_rope, y_o * c + y_e * s, y_o)
    row = out_ptr + e.to(tl.int64) * stride_oe
    tl.store(row + d_e, out_e.to(ty), mask=i_ok)
    tl.store(row + d_o, out_o.to(ty), mask=i_ok)


def compress_entries_triton(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, state_kv: torch.Tensor,
                            state_score: torch.Tensor, seq: torch.Tensor, window: torch.Tensor,
                            start_pos: torch.Tensor, cu_seqlens: torch.Tensor, state_slots: torch.Tensor,
                            norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ratio: int,
                            overlap: bool, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """One launch: the twin's entries. Channels of kv/score/ape/state rows are read contiguous."""
    E, d = seq.shape[0], norm_weight.shape[0]
    out = torch.empty(E, d, dtype=out_dtype, device=kv.device)
    if E == 0:
        return out
    kv, score, ape = kv.contiguous(), score.contiguous(), ape.contiguous()
    if kv.shape[0] == 0:  # entries but no step rows (a zero-token sequence): clamped rows read a zero row
        kv = score = kv.new_zeros(1, kv.shape[1])
    state_kv, state_score = state_kv.contiguous(), state_score.contiguous()
    block_d2 = triton.next_power_of_2(d // 2)
    block_s = max(1, min(triton.next_power_of_2((2 if overlap else 1) * ratio), TILE_ELEMENTS // block_d2))
    _compress_entries_kernel[(E,)](
        kv, score, ape, state_kv, state_score, seq.contiguous(), window.contiguous(), start_pos.contiguous(),
        cu_seqlens.contiguous(), state_slots.contiguous(), norm_weight.contiguous(), cos, sin, out,
        kv.shape[0], d, ratio, state_kv.shape[1], state_kv.shape[0], float(eps),
        kv.stride(0), score.stride(0), ape.stride(0), state_kv.stride(0), state_kv.stride(1),
        state_score.stride(0), state_score.stride(1), *cos.stride(), *sin.stride(), out.stride(0),
        OVERLAP=bool(overlap), NOPE=d - 2 * cos.shape[1], BLOCK_S=block_s, BLOCK_D2=block_d2,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Triton: store_compressor_state (one program per step row)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _store_state_kernel(
    kv_ptr, sc_ptr, ape_ptr, pos_ptr, seq_ptr, slot_ptr, end_ptr, skv_ptr, ssc_ptr,
    WIDTH, M, RING, SLACK,
    stride_kt, stride_st, stride_ar, stride_rb, stride_rr, stride_rsb, stride_rrs,
    OVERLAP: tl.constexpr, BLOCK_W: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    seq = tl.load(seq_ptr + t)
    slot = tl.load(slot_ptr + seq)
    end = tl.maximum(tl.load(end_ptr + seq) - SLACK, 0)  # >= 0: // rounds as the twin's floor division
    keep_from = (end // M - (1 if OVERLAP else 0)) * M
    kept = (pos >= keep_from) & (slot >= 0)  # dropped rows are not written at all
    n_cols = tl.where(kept, WIDTH, 0)
    ring = (pos % RING).to(tl.int64)
    dst_kv = skv_ptr + slot.to(tl.int64) * stride_rb + ring * stride_rr
    dst_sc = ssc_ptr + slot.to(tl.int64) * stride_rsb + ring * stride_rrs
    ape_row = ape_ptr + (pos % M) * stride_ar
    for c0 in range(0, WIDTH, BLOCK_W):
        c = c0 + tl.arange(0, BLOCK_W)
        ok = c < n_cols
        tl.store(dst_kv + c, tl.load(kv_ptr + t * stride_kt + c, mask=ok, other=0.0), mask=ok)
        score = tl.load(sc_ptr + t * stride_st + c, mask=ok, other=0.0) + tl.load(ape_row + c, mask=ok, other=0.0)
        tl.store(dst_sc + c, score, mask=ok)


def store_compressor_state_triton(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor,
                                  seq_ids: torch.Tensor, state_slots: torch.Tensor, end_pos: torch.Tensor,
                                  state_kv: torch.Tensor, state_score: torch.Tensor, ratio: int,
                                  overlap: bool) -> None:
    """One launch, in place: the twin's ring rows (rows it drops onto the padding row are not
    written; that row's content is never read for a live sequence). The state rings must have
    contiguous channels (the cache allocates them contiguous)."""
    T, width = kv.shape
    if T == 0:
        return
    if state_kv.stride(2) != 1 or state_score.stride(2) != 1:
        raise ValueError("state_kv and state_score need contiguous channels to be written in place")
    kv, score, ape = kv.contiguous(), score.contiguous(), ape.contiguous()
    span = state_kv.shape[1]
    _store_state_kernel[(T,)](
        kv, score, ape, positions.contiguous(), seq_ids.contiguous(), state_slots.contiguous(),
        end_pos.contiguous(), state_kv, state_score,
        width, ratio, span, span - (2 if overlap else 1) * ratio,
        kv.stride(0), score.stride(0), ape.stride(0), state_kv.stride(0), state_kv.stride(1),
        state_score.stride(0), state_score.stride(1),
        OVERLAP=bool(overlap), BLOCK_W=min(BLOCK_W, triton.next_power_of_2(width)),
    )
