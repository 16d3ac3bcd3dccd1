"""The Q/KV path before attention: fused RMSNorm + partial RoPE (+ the cache's FP8/FP4 rounding),
and the paged record writes, each a Triton kernel beside a plain-torch twin.

``norm_rope``: ``y = rms_norm(x, weight)`` over the last dim (optional), then V4's interleaved
RoPE on the trailing ``2 * cos.shape[-1]`` channels (optional), then ``fmt``'s rounding:
- ``PLAIN``: none;
- ``FP8_ENTRY``: the stored KV vector, ``Fp8EntryCodec.round_trip`` (e4m3 nope dims per 64 with an
  e8m0 scale, bf16 rope dims);
- ``FP4_KEY``: the indexer query, ``Fp4IndexKeyCodec.round_trip`` (Hadamard rotation, e2m1 per 32
  with an e8m0 scale; the result stays rotated).
Rounding points are the engine's: the norm's output and the RoPE's output are cast to x's dtype
before the next step reads them.

``store_records`` / ``store_entries``: encode rows into the paged pools (record layouts in
``kernels/kv_records.py``): ``pool[slot, row] = encode(values[t])``, addressed directly (window
ring) or through block tables (compressed entries). Rows addressed ``NO_SLOT`` (-1) are skipped
by the kernel; the twins, like the engine, write them into the pool's last slot, its padding row.

Exactness: every scale is a power of two and every quantiser step is mirrored in integer/bit
arithmetic (e8m0 exponent from the amax's bits, round-to-nearest-even for e4m3 and bf16), so the
kernels' records are byte-identical to the engine codecs' for the same inputs. The kernels run
with fp fusion off (no FMA contraction: the RoPE's products round as torch's do); what can still
differ from the twin is the RMSNorm's sum of squares (a different summation order), a few fp32
ulps at most.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_records import (FP4_KEY, FP4_SCALE_BLOCK, FP8_ENTRY, FP8_SCALE_BLOCK, PLAIN, _e8m0, e2m1_nibble, e4m3_code,
                                e4m3_value, pow2_scale_exponent)
from kernels.quant import (fp4_block_dequantize, fp4_block_quantize, fp8_kv_dequantize, fp8_kv_quantize,
                          hadamard_rotate)
from kernels.torch_math import apply_rope, rms_norm

FORMATS = (PLAIN, FP8_ENTRY, FP4_KEY)
RECORD_ALIGN = 8  # FP8 entries are padded to a multiple of 8 bytes (FlashMLA)
# The kernels handle these activation dtypes (their casts are mirrored exactly); kind = constexpr.
_DTYPE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# ---- record layouts ------------------------------------------------------------------------
def fp8_entry_bytes(dim: int, rope_dim: int) -> int:
    """Bytes of one FP8 entry record (``Fp8EntryCodec.nbytes``)."""
    nope = dim - rope_dim
    raw = nope + 2 * rope_dim + -(-nope // FP8_SCALE_BLOCK)
    return -(-raw // RECORD_ALIGN) * RECORD_ALIGN


def fp4_key_bytes(dim: int) -> int:
    """Bytes of one FP4 indexer-key record (``Fp4IndexKeyCodec.nbytes``)."""
    return dim // 2 + -(-dim // FP4_SCALE_BLOCK)


def record_bytes(fmt: int, dim: int, rope_dim: int) -> int:
    return fp8_entry_bytes(dim, rope_dim) if fmt == FP8_ENTRY else fp4_key_bytes(dim)


# ---- argument checks -----------------------------------------------------------------------
def _check_fmt(fmt: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of PLAIN={PLAIN}, FP8_ENTRY={FP8_ENTRY}, FP4_KEY={FP4_KEY}, got {fmt!r}")


def _check_fmt_dims(fmt: int, dim: int, rope_dim: int, name: str) -> None:
    if fmt == FP8_ENTRY and not 0 <= rope_dim < dim:
        raise ValueError(f"{name}: FP8_ENTRY needs 0 <= rope_dim < dim (some e4m3 dims), got rope_dim {rope_dim}, "
                         f"dim {dim}")
    if fmt == FP4_KEY and (dim < 2 or dim & (dim - 1)):
        raise ValueError(f"{name}: FP4_KEY needs a power-of-two dim >= 2 (Hadamard rotation), got {dim}")


def _check_activation(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPE_KIND:
        raise ValueError(f"{name} must be a float32, bfloat16 or float16 tensor, got {getattr(t, 'dtype', type(t))}")


def check_norm_rope_args(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None,
                         sin: torch.Tensor | None, fmt: int, norm: bool) -> None:
    """Raise ValueError (naming the parameter) unless the arguments describe one norm_rope call."""
    _check_activation(x, "x")
    if x.dim() not in (2, 3) or x.shape[-1] == 0:
        raise ValueError(f"x must be [T, D] or [T, H, D] with D > 0, got {tuple(x.shape)}")
    T, D = x.shape[0], x.shape[-1]
    if weight is not None:
        if not norm:
            raise ValueError("weight must be None when norm=False (there is no RMSNorm to weight)")
        if tuple(weight.shape) != (D,) or not weight.is_floating_point():
            raise ValueError(f"weight must be a floating [{D}] tensor or None, "
                             f"got {weight.dtype} {tuple(weight.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must both be given or both be None")
    rope_dim = 0
    if cos is not None:
        if cos.dim() != 2 or cos.shape[0] != T or not 1 <= 2 * cos.shape[1] <= D or not cos.is_floating_point():
            raise ValueError(f"cos must be a floating [T={T}, R/2] tensor with 2 <= R <= D={D}, "
                             f"got {cos.dtype} {tuple(cos.shape)}")
        if sin.shape != cos.shape or not sin.is_floating_point():
            raise ValueError(f"sin must be a floating {list(cos.shape)} tensor like cos, got {sin.dtype} "
                             f"{tuple(sin.shape)}")
        rope_dim = 2 * cos.shape[1]
    _check_fmt(fmt)
    _check_fmt_dims(fmt, D, rope_dim, "x")
    devices = {t.device for t in (x, weight, cos, sin) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, weight, cos and sin must share one device, got {sorted(map(str, devices))}")


def _check_pool(pool: torch.Tensor, values: torch.Tensor, fmt: int, rope_dim: int) -> None:
    _check_fmt(fmt)
    _check_activation(values, "values")
    if values.dim() != 2 or values.shape[1] == 0:
        raise ValueError(f"values must be [T, D] with D > 0, got {tuple(values.shape)}")
    D = values.shape[1]
    if not isinstance(pool, torch.Tensor) or pool.dim() != 3:
        raise ValueError(f"pool must be a [slots, rows, record] tensor, got {getattr(pool, 'shape', pool)}")
    if fmt == PLAIN:
        if pool.dtype not in _DTYPE_KIND or pool.shape[2] != D:
            raise ValueError(f"pool must be float32/bfloat16/float16 [..., {D}] for PLAIN, "
                             f"got {pool.dtype} {tuple(pool.shape)}")
        return
    _check_fmt_dims(fmt, D, rope_dim, "values")
    nbytes = record_bytes(fmt, D, rope_dim)
    if pool.dtype != torch.uint8 or pool.shape[2] != nbytes:
        raise ValueError(f"pool must be uint8 [..., {nbytes}] records for dim {D} (rope_dim {rope_dim}), "
                         f"got {pool.dtype} {tuple(pool.shape)}")


def _check_index(t: torch.Tensor, shape: tuple, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be an int32/int64 {list(shape)} tensor, got "
                         f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")


def check_store_records_args(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                             fmt: int, rope_dim: int) -> None:
    _check_pool(pool, values, fmt, rope_dim)
    T = values.shape[0]
    _check_index(slots, (T,), "slots")
    _check_index(rows, (T,), "rows")
    devices = {t.device for t in (pool, slots, rows, values)}
    if len(devices) != 1:
        raise ValueError(f"pool, slots, rows and values must share one device, got {sorted(map(str, devices))}")


def check_store_entries_args(pool: torch.Tensor, tables: torch.Tensor, entries: torch.Tensor, valid: torch.Tensor,
                             values: torch.Tensor, fmt: int, rope_dim: int) -> None:
    _check_pool(pool, values, fmt, rope_dim)
    T = values.shape[0]
    if not isinstance(tables, torch.Tensor) or tables.dim() != 2 or tables.shape[0] != T or \
            tables.dtype not in (torch.int32, torch.int64) or (T and tables.shape[1] == 0):
        raise ValueError(f"tables must be an int32/int64 [T={T}, blocks >= 1] tensor, got "
                         f"{getattr(tables, 'dtype', type(tables))} {tuple(getattr(tables, 'shape', ()))}")
    _check_index(entries, (T,), "entries")
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (T,):
        raise ValueError(f"valid must be a bool [{T}] tensor, got {getattr(valid, 'dtype', type(valid))} "
                         f"{tuple(getattr(valid, 'shape', ()))}")
    devices = {t.device for t in (pool, tables, entries, valid, values)}
    if len(devices) != 1:
        raise ValueError(f"pool, tables, entries, valid and values must share one device, "
                         f"got {sorted(map(str, devices))}")


# ---- torch twins ---------------------------------------------------------------------------
def round_records(y: torch.Tensor, fmt: int, rope_dim: int) -> torch.Tensor:
    """What ``y`` becomes once stored as ``fmt`` and read back (the codecs' ``round_trip``)."""
    if fmt == FP8_ENTRY:
        nope = y.shape[-1] - rope_dim
        return fp8_kv_dequantize(*fp8_kv_quantize(y, nope, FP8_SCALE_BLOCK), y.dtype, FP8_SCALE_BLOCK)
    if fmt == FP4_KEY:
        packed, scale = fp4_block_quantize(hadamard_rotate(y), FP4_SCALE_BLOCK)
        return fp4_block_dequantize(packed, scale, y.dtype, FP4_SCALE_BLOCK)
    return y


def norm_rope_torch(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None,
                    sin: torch.Tensor | None, eps: float, fmt: int, norm: bool) -> torch.Tensor:
    """The engine's ops in order: ``rms_norm``, ``apply_rope``, the cache's round trip."""
    y = rms_norm(x, weight, eps) if norm else x
    rope_dim = 0
    if cos is not None:
        y = apply_rope(y, cos, sin)
        rope_dim = 2 * cos.shape[-1]
    return round_records(y, fmt, rope_dim)


def encode_records(values: torch.Tensor, fmt: int, rope_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``values [..., D]`` -> the pool's rows: uint8 records (``Fp8EntryCodec`` / ``Fp4IndexKeyCodec``
    ``.encode``), or ``values`` in the pool's ``dtype`` for PLAIN."""
    if fmt == FP8_ENTRY:
        nope_dim = values.shape[-1] - rope_dim
        # Contiguous first: the byte views need unit strides (an empty rope slice keeps x's).
        nope, rope, scale = fp8_kv_quantize(values.contiguous(), nope_dim, FP8_SCALE_BLOCK)
        pad = fp8_entry_bytes(values.shape[-1], rope_dim) - nope_dim - 2 * rope_dim - scale.shape[-1]
        return torch.cat([nope.view(torch.uint8), rope.contiguous().view(torch.uint8), scale.view(torch.uint8),
                          nope.new_zeros(*nope.shape[:-1], pad, dtype=torch.uint8)], dim=-1)
    if fmt == FP4_KEY:
        packed, scale = fp4_block_quantize(hadamard_rotate(values), FP4_SCALE_BLOCK)
        return torch.cat([packed.view(torch.uint8), scale.view(torch.uint8)], dim=-1)
    return values.to(dtype)


def store_records_torch(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                        fmt: int, rope_dim: int) -> None:
    """``pool[slots, rows] = encode(values)`` in place: ``KVCache.store_window`` (slot -1 lands in
    the last slot, the padding row)."""
    pool[slots, rows] = encode_records(values, fmt, rope_dim, pool.dtype)


def entry_slots(pool: torch.Tensor, tables: torch.Tensor, entries: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, row) of entry ``entries[i]`` through block table ``tables[i]`` (-1 where not
    ``valid``), as ``KVCache.store_entries`` addresses them (the table column clamped to its width)."""
    E = pool.shape[1]
    col = (entries // E).clamp(max=tables.shape[1] - 1)[:, None]
    return torch.where(valid, tables.gather(1, col).squeeze(1), -1), entries % E


def store_entries_torch(pool: torch.Tensor, tables: torch.Tensor, entries: torch.Tensor, valid: torch.Tensor,
                        values: torch.Tensor, fmt: int, rope_dim: int) -> None:
    """``KVCache.store_entries``: invalid rows land in the padding row."""
    if values.shape[0] == 0:  # gather on an empty table has no column to clamp to
        return
    blocks, rows = entry_slots(pool, tables, entries, valid)
    store_records_torch(pool, blocks, rows, values, fmt, rope_dim)


# ---- Triton helpers: exact roundings ---------------------------------------------------------
@triton.jit
def _rne_bf16(v):
    """fp32 -> the nearest bfloat16, ties to even, still as fp32. In bit arithmetic: exact on GPU
    and in the interpreter (whose own cast truncates)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to(v, KIND: tl.constexpr):
    """fp32 -> the nearest value of the activation dtype (``_DTYPE_KIND``), as fp32."""
    if KIND == 1:
        r = _rne_bf16(v)
    elif KIND == 2:
        r = v.to(tl.float16).to(tl.float32)
    else:
        r = v
    return r


@triton.jit
def _cast_out(v, ty, KIND: tl.constexpr):
    """A value already rounded to ``ty`` (``_round_to``), stored as ``ty``: exact, whatever the
    cast's own rounding."""
    return _round_to(v, KIND).to(ty)


@triton.jit
def _block_exponents(a, BLOCK_D: tl.constexpr, SB: tl.constexpr, MAX_EXP: tl.constexpr, MAX_MANT: tl.constexpr,
                     FLOOR: tl.constexpr):
    """Per block of ``SB`` lanes of ``a = |v|`` (0 off the quantised dims): the scale exponents
    ``[BLOCK_D // SB]`` and the same broadcast back to ``[BLOCK_D]``."""
    amax = tl.max(tl.reshape(a, [BLOCK_D // SB, SB]), axis=1)
    if FLOOR > 0.0:
        amax = tl.maximum(amax, FLOOR)
    k = pow2_scale_exponent(amax, MAX_EXP, MAX_MANT)
    k_lanes = tl.reshape(tl.broadcast_to(k[:, None], [BLOCK_D // SB, SB]), [BLOCK_D])
    return k, k_lanes


@triton.jit
def _e2m1_code(s):
    """|s| <= 6 -> e2m1 nibble (int32): ``kernels.quant._e2m1_codes`` (nearest, ties to even code)."""
    a = tl.abs(s)
    code = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) \
        + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    return code | ((s < 0).to(tl.int32) << 3)


@triton.jit
def _hadamard(v, N: tl.constexpr, LOG_N: tl.constexpr):
    """``kernels.quant.hadamard_rotate``'s butterfly (unscaled), stage for stage: stage ``s`` pairs
    lane i with lane i + 2^s of each 2^(s+1) block into (low + high, low - high)."""
    for s in tl.static_range(LOG_N):
        pairs = tl.permute(tl.reshape(v, [N // (2 << s), 2, 1 << s]), [0, 2, 1])
        low, high = tl.split(pairs)
        v = tl.reshape(tl.permute(tl.join(low + high, low - high), [0, 2, 1]), [N])
    return v


@triton.jit
def _fp8_quantize(v, d, NOPE, BLOCK_D: tl.constexpr, SB: tl.constexpr):
    """FP8 entry quantisation of one vector ``v`` (lanes ``d``): e4m3 codes (lanes < NOPE), the
    per-64 scale exponents, and their lane broadcast. ``kernels.quant.fp8_kv_quantize``."""
    # 448 = 1.75 * 2^8; amax floor 1e-4 (kernels.quant.ACT_AMAX_FLOOR).
    k, k_lanes = _block_exponents(tl.where(d < NOPE, tl.abs(v), 0.0), BLOCK_D, SB, 8, 0x600000, 1e-4)
    s = v * _e8m0(127 - k_lanes)  # / 2^k, exact
    s = tl.minimum(tl.maximum(s, -448.0), 448.0)
    return e4m3_code(s), k, k_lanes


@triton.jit
def _fp4_quantize(v, N: tl.constexpr, LOG_N: tl.constexpr, rot_scale, KIND: tl.constexpr, SB: tl.constexpr):
    """FP4 key quantisation of one unrotated vector ``v [N]``: e2m1 codes, per-32 scale exponents
    and their lane broadcast. The rotation rounds to the activation dtype as ``hadamard_rotate``."""
    r = _round_to(_hadamard(v, N, LOG_N) * rot_scale, KIND)
    k, k_lanes = _block_exponents(tl.abs(r), N, SB, 2, 0x400000, 0.0)  # 6 = 1.5 * 2^2, no floor
    return _e2m1_code(r * _e8m0(127 - k_lanes)), k, k_lanes


# ---- Triton: norm_rope (one program per row) -------------------------------------------------
@triton.jit
def _normed(x, rstd, w_ptr, d, ok, NORM: tl.constexpr, WEIGHT: tl.constexpr, KIND: tl.constexpr):
    """``rms_norm``'s value at lanes ``d`` (rounded to the activation dtype), or ``x`` unnormed."""
    y = x
    if NORM:
        y = x * rstd
        if WEIGHT:
            y = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32) * y
        y = _round_to(y, KIND)
    return y


@triton.jit
def _norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr,
    H, D, d_float, eps, rot_scale,
    stride_xt, stride_xh, stride_xd, stride_ct, stride_cd, stride_st, stride_sd, stride_yt, stride_yh,
    NORM: tl.constexpr, WEIGHT: tl.constexpr, HALF_ROPE: tl.constexpr, FMT: tl.constexpr, KIND: tl.constexpr,
    BLOCK_D: tl.constexpr, LOG_D: tl.constexpr, SB: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t, h = pid // H, pid % H
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    row = x_ptr + t * stride_xt + h * stride_xh
    x = tl.load(row + d * stride_xd, mask=ok, other=0.0).to(tl.float32)
    rstd = 0.0
    if NORM:
        mean_sq = tl.div_rn(tl.sum(x * x, axis=0), d_float)  # torch's mean is sum / D
        rstd = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    y = _normed(x, rstd, w_ptr, d, ok, NORM, WEIGHT, KIND)
    nope = D - 2 * HALF_ROPE
    if HALF_ROPE > 0:
        # Out[2i] = r[2i] c_i - r[2i+1] s_i, out[2i+1] = r[2i+1] c_i + r[2i] s_i: the partner
        # lane's value is recomputed from its own load (the same ops, so the same bits).
        rel = d - nope
        is_rope = ok & (rel >= 0)
        partner = nope + (rel ^ 1)
        xp = tl.load(row + partner * stride_xd, mask=is_rope, other=0.0).to(tl.float32)
        yp = _normed(xp, rstd, w_ptr, partner, is_rope, NORM, WEIGHT, KIND)
        i = rel // 2
        c = tl.load(cos_ptr + t * stride_ct + i * stride_cd, mask=is_rope, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * stride_st + i * stride_sd, mask=is_rope, other=0.0).to(tl.float32)
        rotated_half = tl.where((rel & 1) == 0, -yp, yp)
        y = tl.where(is_rope, _round_to(y * c + rotated_half * s, KIND), y)
    if FMT == 1:  # FP8_ENTRY: e4m3 * 2^k on the nope dims, bf16 on the rope dims
        code, k, k_lanes = _fp8_quantize(y, d, nope, BLOCK_D, SB)
        y = tl.where(d < nope, e4m3_value(code) * _e8m0(k_lanes + 127), _round_to(_rne_bf16(y), KIND))
    elif FMT == 2:  # FP4_KEY: the rotated key's e2m1 * 2^k
        code, k, k_lanes = _fp4_quantize(y, BLOCK_D, LOG_D, rot_scale, KIND, SB)
        y = e2m1_nibble(code, 0) * _e8m0(k_lanes + 127)
    out = y_ptr.dtype.element_ty
    tl.store(y_ptr + t * stride_yt + h * stride_yh + d, _cast_out(y, out, KIND), mask=ok)


def _num_warps(block: int) -> int:
    return max(1, min(4, block // 128))


def norm_rope_triton(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None,
                     sin: torch.Tensor | None, eps: float, fmt: int, norm: bool) -> torch.Tensor:
    """One launch, one program per (token, head) row: the twin's result."""
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    T, H, D = x3.shape
    y = torch.empty(T, H, D, dtype=x.dtype, device=x.device)
    if T * H == 0:
        return y.view(x.shape)
    half = 0 if cos is None else cos.shape[1]
    block = triton.next_power_of_2(D)
    sb = min(FP4_SCALE_BLOCK if fmt == FP4_KEY else FP8_SCALE_BLOCK, block)
    cs = (cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1)) if cos is not None else (0, 0, 0, 0)
    dummy = x3  # for absent operands (their constexpr flags keep them unread)
    _norm_rope_kernel[(T * H,)](
        x3, weight.contiguous() if weight is not None else dummy, cos if cos is not None else dummy,
        sin if sin is not None else dummy, y,
        H, D, float(D), float(eps), float(D) ** -0.5,
        *x3.stride(), *cs, y.stride(0), y.stride(1),
        NORM=bool(norm), WEIGHT=weight is not None, HALF_ROPE=half, FMT=int(fmt), KIND=_DTYPE_KIND[x.dtype],
        BLOCK_D=block, LOG_D=block.bit_length() - 1, SB=sb,
        num_warps=_num_warps(block), enable_fp_fusion=False,
    )
    return y.view(x.shape)


# ---- Triton: record stores (one program per row) ---------------------------------------------
@triton.jit
def _live(slot, lanes):
    """``slot >= 0`` over a block of ``lanes`` (the interpreter makes a scalar mask & a block mask
    an int64 block, which it then refuses as a mask)."""
    return (slot + lanes * 0) >= 0


@triton.jit
def _store_records_kernel(
    pool_ptr, slot_ptr, row_ptr, table_ptr, valid_ptr, v_ptr,
    D, E, n_cols, nope, rope, n_scales, nbytes, rot_scale,
    stride_ps, stride_pr, stride_pb, stride_tb, stride_tc, stride_vt, stride_vd,
    TABLES: tl.constexpr, FMT: tl.constexpr, VKIND: tl.constexpr, PKIND: tl.constexpr,
    BLOCK_D: tl.constexpr, LOG_D: tl.constexpr, SB: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    if TABLES:  # KVCache.store_entries' addressing (the table column clamped to the table's width)
        entry = tl.load(row_ptr + t).to(tl.int64)
        valid = tl.load(valid_ptr + t).to(tl.int32) != 0
        col = tl.minimum(entry // E, n_cols - 1)
        slot = tl.load(table_ptr + t * stride_tb + col * stride_tc, mask=valid, other=-1).to(tl.int64)
        row = entry % E
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        row = tl.load(row_ptr + t).to(tl.int64)
    rec = pool_ptr + slot * stride_ps + row * stride_pr
    d = tl.arange(0, BLOCK_D)
    d_ok = _live(slot, d) & (d < D)  # NO_SLOT rows (and NO_SLOT table columns) are skipped
    v = tl.load(v_ptr + t * stride_vt + d * stride_vd, mask=d_ok, other=0.0).to(tl.float32)
    if FMT == 0:  # PLAIN: values.to(pool.dtype)
        tl.store(rec + d * stride_pb, _cast_out(v, pool_ptr.dtype.element_ty, PKIND), mask=d_ok)
    elif FMT == 1:  # FP8_ENTRY: e4m3 nope | bf16 rope (little endian) | e8m0 per 64 | zero padding
        code, k, k_lanes = _fp8_quantize(v, d, nope, BLOCK_D, SB)
        tl.store(rec + d * stride_pb, code.to(tl.uint8), mask=d_ok & (d < nope))
        bits = _rne_bf16(v).to(tl.int32, bitcast=True)
        r = nope + 2 * (d - nope)
        rope_ok = d_ok & (d >= nope)
        tl.store(rec + r * stride_pb, ((bits >> 16) & 255).to(tl.uint8), mask=rope_ok)
        tl.store(rec + (r + 1) * stride_pb, ((bits >> 24) & 255).to(tl.uint8), mask=rope_ok)
        j = tl.arange(0, BLOCK_D // SB)
        tl.store(rec + (nope + 2 * rope + j) * stride_pb, (k + 127).to(tl.uint8),
                 mask=_live(slot, j) & (j < n_scales))
        pad = nope + 2 * rope + n_scales + tl.arange(0, 8)
        tl.store(rec + pad * stride_pb, tl.zeros([8], dtype=tl.uint8), mask=_live(slot, pad) & (pad < nbytes))
    else:  # FP4_KEY: packed e2m1 of the rotated key (low nibble = even dim) | e8m0 per 32
        code, k, k_lanes = _fp4_quantize(v, BLOCK_D, LOG_D, rot_scale, VKIND, SB)
        even, odd = tl.split(tl.reshape(code, [BLOCK_D // 2, 2]))
        b = tl.arange(0, BLOCK_D // 2)
        tl.store(rec + b * stride_pb, (even | (odd << 4)).to(tl.uint8), mask=_live(slot, b))
        j = tl.arange(0, BLOCK_D // SB)
        tl.store(rec + (D // 2 + j) * stride_pb, (k + 127).to(tl.uint8), mask=_live(slot, j))


def _launch_store(pool, slots, rows, tables, valid, values, fmt, rope_dim):
    T, D = values.shape
    if T == 0:
        return
    block = triton.next_power_of_2(D)
    sb = min(FP4_SCALE_BLOCK if fmt == FP4_KEY else FP8_SCALE_BLOCK, block)
    nope = D - rope_dim
    table_args = (tables, valid, pool.shape[1], tables.shape[1]) if tables is not None else (slots, slots, 1, 1)
    _store_records_kernel[(T,)](
        pool, slots, rows, table_args[0], table_args[1], values,
        D, table_args[2], table_args[3], nope, rope_dim, -(-nope // FP8_SCALE_BLOCK), pool.shape[2],
        float(D) ** -0.5,
        *pool.stride(), *(tables.stride() if tables is not None else (0, 0)), *values.stride(),
        TABLES=tables is not None, FMT=int(fmt), VKIND=_DTYPE_KIND[values.dtype],
        PKIND=_DTYPE_KIND.get(pool.dtype, 0), BLOCK_D=block, LOG_D=block.bit_length() - 1, SB=sb,
        num_warps=_num_warps(block), enable_fp_fusion=False,
    )


def store_records_triton(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                         fmt: int, rope_dim: int) -> None:
    """One launch, one program per row; slots < 0 are skipped (the padding row is left alone)."""
    _launch_store(pool, slots, rows, None, None, values, fmt, rope_dim)


def store_entries_triton(pool: torch.Tensor, tables: torch.Tensor, entries: torch.Tensor, valid: torch.Tensor,
                         values: torch.Tensor, fmt: int, rope_dim: int) -> None:
    """One launch; invalid rows and NO_SLOT table columns are skipped."""
    _launch_store(pool, entries, entries, tables, valid, values, fmt, rope_dim)
