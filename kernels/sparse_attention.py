"""Sparse sink attention over the paged pools (spec §3.5), every chunk of a flat varlen batch.

Query row ``t`` (sequence ``s = seq[t]``, position ``p = positions[t]``) attends to
- the window: positions ``p, p-1, …, p-W+1`` (those ``>= 0``); a position of this step
  (``>= start_pos[s]``) is this step's row ``kv[t - j]``, an older one the ring row
  ``window_pool[window_slots[s], pos % R]``, R = the ring's rows (``W`` = ``window``, default R;
  a ring with speculative slack has R > W rows, so rejected draft writes never clobber a live row);
- the compressed part, read through the block tables ``tables[s]`` from ``comp_pool``: on CSA
  layers the entries ``comp_ids[t]`` where ``comp_valid[t]`` (the indexer's top-k), on HCA layers
  every entry ``e < (p + 1) // ratio``;
with one softmax whose denominator also holds ``exp(sinks[h])`` (V = K), then the inverse RoPE
of the output's trailing ``2 * cos.shape[-1]`` dims at the query's position (V carried rotated
rope dims). FP8 records (``kv_records.FP8_ENTRY``) are dequantised as they are read.

``sparse_attention_torch`` is the twin: it gathers the keys, runs ``sink_attention_torch`` and
rotates back, as the model's torch path does. ``sparse_attention_triton`` is one kernel with an
online softmax: no gathered-key workspace, nothing but the output written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_records import FP8_ENTRY, PLAIN, decode_rows, entry_block_row, gather_rows, load_fp8_entry
from kernels.sink_attention import sink_attention_torch

BLOCK_H = 16  # tl.dot needs >= 16 rows; spare rows are masked off
BLOCK_K = 32
NO_COMP, SELECTED, ALL_VISIBLE = 0, 1, 2


def check_sparse_attention_args(q, kv, seq, positions, start_pos, window_slots, window_pool, sinks, cos, sin,
                                fmt, comp_pool, tables, comp_ids, comp_valid, ratio) -> None:
    """Raise ValueError (naming the parameter) unless the arguments describe one attention call."""
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D], got shape {tuple(q.shape)}")
    T, H, D = q.shape
    if D % 2:
        raise ValueError(f"q head dim must be even (RoPE pairs), got {D}")
    if tuple(kv.shape) != (T, D) or kv.dtype != q.dtype:
        raise ValueError(f"kv must be [T={T}, D={D}] in q's dtype, got {kv.dtype} {tuple(kv.shape)}")
    for name, t in (("seq", seq), ("positions", positions)):
        if tuple(t.shape) != (T,) or t.dtype != torch.long:
            raise ValueError(f"{name} must be int64 [T={T}], got {t.dtype} {tuple(t.shape)}")
    if start_pos.dim() != 1 or window_slots.shape != start_pos.shape:
        raise ValueError(f"start_pos and window_slots must be [B], got {tuple(start_pos.shape)}, "
                         f"{tuple(window_slots.shape)}")
    if tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must be [H={H}], got shape {tuple(sinks.shape)}")
    if cos.dim() != 2 or cos.shape[0] != T or sin.shape != cos.shape or 2 * cos.shape[1] > D:
        raise ValueError(f"cos and sin must be [T={T}, rope_dim/2 <= {D // 2}], got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    rope = 2 * cos.shape[1]
    pools = [("window_pool", window_pool)] + ([("comp_pool", comp_pool)] if comp_pool is not None else [])
    for name, pool in pools:
        if fmt == FP8_ENTRY:
            nope = D - rope
            width = -(-(nope + 2 * rope + -(-nope // 64)) // 8) * 8
            ok = pool.dim() == 3 and pool.dtype == torch.uint8 and pool.shape[-1] == width
        else:
            ok = fmt == PLAIN and pool.dim() == 3 and pool.shape[-1] == D
        if not ok or pool.stride(-1) != 1:
            raise ValueError(f"{name} must hold contiguous {'FP8 entry records' if fmt == FP8_ENTRY else 'plain'} "
                             f"rows for head dim {D}, got {pool.dtype} {tuple(pool.shape)}")
    if comp_pool is not None:
        if tables is None or tables.dim() != 2 or tables.dtype != torch.long:
            raise ValueError("tables must be int64 [B, blocks] with a comp_pool")
        if comp_ids is not None:
            if comp_ids.dim() != 2 or comp_ids.shape[0] != T or comp_valid is None \
                    or comp_valid.shape != comp_ids.shape or comp_valid.dtype != torch.bool:
                raise ValueError("comp_ids must be [T, K] with comp_valid bool [T, K]")
        elif not isinstance(ratio, int) or ratio < 1:
            raise ValueError(f"ratio must be a positive int when every visible entry is read, got {ratio!r}")
    devices = {t.device for t in (q, kv, seq, positions, start_pos, window_slots, window_pool, sinks, cos, sin)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must share one device, got {sorted(map(str, devices))}")


def _inverse_rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Conjugate interleaved RoPE on the last ``2 * cos.shape[-1]`` dims (the model's ``apply_rope``)."""
    rd = cos.shape[-1] * 2
    if rd == 0:
        return x
    c = cos.repeat_interleave(2, dim=-1)[:, None, :]
    s = -sin.repeat_interleave(2, dim=-1)[:, None, :]
    nope, rope = x[..., :-rd], x[..., -rd:]
    rotated_half = torch.stack((-rope[..., 1::2], rope[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat([nope, (rope.float() * c + rotated_half.float() * s).to(x.dtype)], dim=-1)


def sparse_attention_torch(q, kv, seq, positions, start_pos, window_slots, window_pool, sinks, scale, cos, sin,
                           fmt=PLAIN, comp_pool=None, tables=None, comp_ids=None, comp_valid=None, ratio=0,
                           num_entries=None, window=None):
    """Twin: gathered window (+ compressed) keys, ``sink_attention_torch``, inverse RoPE."""
    T, H, D = q.shape
    rope = 2 * cos.shape[1]
    R = window_pool.shape[1]
    back = torch.arange(R if window is None else window, device=q.device)
    kpos = positions[:, None] - back
    in_step = (kpos >= start_pos[seq][:, None])[..., None]
    step = kv[(torch.arange(T, device=q.device)[:, None] - back).clamp(min=0)]
    ring = decode_rows(window_pool[window_slots[seq][:, None], kpos % R], fmt, D, rope, q.dtype)
    keys, mask = torch.where(in_step, step, ring), kpos >= 0
    if comp_pool is not None:
        if comp_ids is None:
            n = tables.shape[1] * comp_pool.shape[1] if num_entries is None else num_entries
            comp_ids = torch.arange(n, device=q.device).expand(T, -1)
            comp_valid = comp_ids < ((positions + 1) // ratio)[:, None]
        ckeys = decode_rows(gather_rows(comp_pool, tables, seq, comp_ids), fmt, D, rope, q.dtype)
        keys, mask = torch.cat([keys, ckeys], dim=1), torch.cat([mask, comp_valid], dim=1)
    return _inverse_rope_torch(sink_attention_torch(q, keys, mask, sinks, scale), cos, sin)


@triton.jit
def _load_keys(src, d, ok, FMT: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr):
    """Key dims ``d`` of rows ``src`` (pointers, [BLOCK_K, 1]), float32."""
    if FMT == 1:  # FP8_ENTRY
        return load_fp8_entry(src, d, ok, NOPE=NOPE, ROPE=ROPE)
    return tl.load(src + d, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _online_update(q_e, q_o, k_e, k_o, visible, m_i, l_i, acc_e, acc_o, scale):
    """One block of keys into the running (max, denominator, accumulators) of the softmax."""
    dt = q_e.dtype
    k_e, k_o = k_e.to(dt), k_o.to(dt)
    s = tl.dot(q_e, tl.trans(k_e), input_precision="ieee", out_dtype=tl.float32)
    s = tl.dot(q_o, tl.trans(k_o), acc=s, input_precision="ieee", out_dtype=tl.float32) * scale
    s = tl.where(visible[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(dt)
    acc_e = acc_e * alpha[:, None] + tl.dot(p, k_e, input_precision="ieee", out_dtype=tl.float32)
    acc_o = acc_o * alpha[:, None] + tl.dot(p, k_o, input_precision="ieee", out_dtype=tl.float32)
    return m_new, l_i, acc_e, acc_o


@triton.jit
def _sparse_attention_kernel(
    q_ptr, kv_ptr, seq_ptr, pos_ptr, start_ptr, wslot_ptr, win_ptr, sink_ptr, cos_ptr, sin_ptr,
    comp_ptr, table_ptr, ids_ptr, valid_ptr, out_ptr,
    H, D, W, RING, K, ratio, E, n_cols, pad_row, scale,
    stride_qt, stride_qh, stride_qd, stride_kvt, stride_kvd, stride_wb, stride_ww,
    stride_ct, stride_cd, stride_sct, stride_scd, stride_pb, stride_pe, stride_tb, stride_tc,
    stride_it, stride_ik, stride_vt, stride_vk, stride_ot, stride_oh, stride_od,
    FMT: tl.constexpr, COMP: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    # One program per (query row, block of heads). Dims run as even / odd halves so that the
    # inverse RoPE of the epilogue rotates pairs (2i, 2i+1) in registers.
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_D2)
    d_e, d_o = 2 * i, 2 * i + 1
    h_ok, i_ok = h < H, 2 * i < D
    hq = q_ptr + t * stride_qt + h[:, None] * stride_qh
    q_mask = h_ok[:, None] & i_ok[None, :]
    q_e = tl.load(hq + d_e[None, :] * stride_qd, mask=q_mask, other=0.0)
    q_o = tl.load(hq + d_o[None, :] * stride_qd, mask=q_mask, other=0.0)
    seq = tl.load(seq_ptr + t)
    pos = tl.load(pos_ptr + t)
    start = tl.load(start_ptr + seq)
    # The sink seeds the running max and the denominator (exp(sink - sink) = 1) and adds no value.
    m_i = tl.load(sink_ptr + h, mask=h_ok, other=0.0).to(tl.float32)
    l_i = tl.full([BLOCK_H], 1.0, dtype=tl.float32)
    acc_e = tl.zeros([BLOCK_H, BLOCK_D2], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_H, BLOCK_D2], dtype=tl.float32)

    # Window: this step's rows for positions of this step, the ring for older ones.
    ring = win_ptr + tl.load(wslot_ptr + seq).to(tl.int64) * stride_wb
    for j0 in range(0, W, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        kpos = pos - j
        visible = (j < W) & (kpos >= 0)
        in_step = visible & (kpos >= start)
        from_ring = visible & (kpos < start)
        step_rows = kv_ptr + (t - j)[:, None] * stride_kvt
        m_step = in_step[:, None] & i_ok[None, :]
        s_e = tl.load(step_rows + d_e[None, :] * stride_kvd, mask=m_step, other=0.0).to(tl.float32)
        s_o = tl.load(step_rows + d_o[None, :] * stride_kvd, mask=m_step, other=0.0).to(tl.float32)
        ring_rows = ring + ((kpos % RING + RING) % RING)[:, None] * stride_ww
        m_ring = from_ring[:, None] & i_ok[None, :]
        r_e = _load_keys(ring_rows, d_e[None, :], m_ring, FMT=FMT, NOPE=NOPE, ROPE=ROPE)
        r_o = _load_keys(ring_rows, d_o[None, :], m_ring, FMT=FMT, NOPE=NOPE, ROPE=ROPE)
        k_e = tl.where(in_step[:, None], s_e, r_e)
        k_o = tl.where(in_step[:, None], s_o, r_o)
        m_i, l_i, acc_e, acc_o = _online_update(q_e, q_o, k_e, k_o, visible, m_i, l_i, acc_e, acc_o, scale)

    # Compressed entries, read in place through the sequence's block table.
    if COMP != 0:
        n_vis = (pos + 1) // ratio
        for c0 in range(0, K, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            if COMP == 1:  # SELECTED: the indexer's ids and validity
                c_ok = c < K
                entry = tl.load(ids_ptr + t * stride_it + c * stride_ik, mask=c_ok, other=0)
                visible = c_ok & (tl.load(valid_ptr + t * stride_vt + c * stride_vk, mask=c_ok, other=0) != 0)
            else:  # ALL_VISIBLE
                entry = c.to(tl.int64)
                visible = c < n_vis
            block, row = entry_block_row(table_ptr, stride_tb, stride_tc, n_cols, pad_row, seq, entry, visible, E)
            rows = (comp_ptr + block.to(tl.int64) * stride_pb + row * stride_pe)[:, None]
            m_c = visible[:, None] & i_ok[None, :]
            k_e = _load_keys(rows, d_e[None, :], m_c, FMT=FMT, NOPE=NOPE, ROPE=ROPE)
            k_o = _load_keys(rows, d_o[None, :], m_c, FMT=FMT, NOPE=NOPE, ROPE=ROPE)
            m_i, l_i, acc_e, acc_o = _online_update(q_e, q_o, k_e, k_o, visible, m_i, l_i, acc_e, acc_o, scale)

    # Epilogue: normalise, round as the twin's attention output, inverse RoPE on the rope pairs.
    out_e = (acc_e / l_i[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
    out_o = (acc_o / l_i[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
    r = i - NOPE // 2
    is_rope = (r >= 0) & i_ok
    c = tl.load(cos_ptr + t * stride_ct + r * stride_cd, mask=is_rope, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_sct + r * stride_scd, mask=is_rope, other=0.0).to(tl.float32)
    rot_e = out_e * c[None, :] + out_o * s[None, :]
    rot_o = out_o * c[None, :] - out_e * s[None, :]
    ho = out_ptr + t * stride_ot + h[:, None] * stride_oh
    tl.store(ho + d_e[None, :] * stride_od, rot_e.to(out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(ho + d_o[None, :] * stride_od, rot_o.to(out_ptr.dtype.element_ty), mask=q_mask)


def sparse_attention_triton(q, kv, seq, positions, start_pos, window_slots, window_pool, sinks, scale, cos, sin,
                            fmt=PLAIN, comp_pool=None, tables=None, comp_ids=None, comp_valid=None, ratio=0,
                           num_entries=None, window=None):
    """Launch the kernel; output ``[T, H, D]`` in q's dtype, like the twin."""
    T, H, D = q.shape
    rope = 2 * cos.shape[1]
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    comp = NO_COMP if comp_pool is None else (SELECTED if comp_ids is not None else ALL_VISIBLE)
    dummy = window_pool  # never read when the constexpr branch is off
    if comp == NO_COMP:
        comp_pool, tables, K = dummy, start_pos[:, None], 0
    if comp == SELECTED:
        K = comp_ids.shape[1]
        valid = comp_valid.view(torch.uint8)
    else:
        comp_ids, valid = start_pos[:, None], start_pos[:, None]
        if comp == ALL_VISIBLE:
            K = tables.shape[1] * comp_pool.shape[1] if num_entries is None else num_entries
    sinks = sinks.float()
    grid = (T, triton.cdiv(H, BLOCK_H))
    _sparse_attention_kernel[grid](
        q, kv, seq, positions, start_pos, window_slots, window_pool, sinks, cos, sin,
        comp_pool, tables, comp_ids, valid, out,
        H, D, window_pool.shape[1] if window is None else int(window), window_pool.shape[1], K, max(int(ratio), 1), comp_pool.shape[1], tables.shape[1],
        comp_pool.shape[0] - 1, float(scale),
        *q.stride(), *kv.stride(), window_pool.stride(0), window_pool.stride(1),
        *cos.stride(), *sin.stride(), comp_pool.stride(0), comp_pool.stride(1), *tables.stride(),
        *comp_ids.stride(), *valid.stride(), *out.stride(),
        FMT=fmt, COMP=comp, NOPE=D - rope, ROPE=rope,
        BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, BLOCK_D2=max(16, triton.next_power_of_2(D // 2)),
    )
    return out
