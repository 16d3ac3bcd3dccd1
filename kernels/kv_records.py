"""Reading the paged KV pools' packed records, in Triton (inside kernels) and in plain torch (twins),
and the exact FP8 roundings (scale exponent, e4m3 code and value) the writers and the FP8-activation
GEMM share.

The layouts are the cache's (engine/worker/kv_cache.py, spec §4.2); ``kernels`` cannot import the
engine, so they are restated here and the tests check both sides against the engine's codecs:
- FP8 entry (``fp8_ds_mla``): ``[0, nope)`` e4m3 | ``[nope, nope + 2*rope)`` bf16 rope dims (little
  endian) | one e8m0 scale per 64 nope dims | zero padding.
- FP4 indexer key: ``dim/2`` bytes of packed e2m1 (low nibble = even dim) | one e8m0 per 32 dims.
Every decoded value is exact in float32 (e4m3 / e2m1 times a power of two).

Block-table addressing: entry ``e`` of a sequence lives at ``pool[table[e // E], e % E]``; a table
column past the table's width, or holding ``-1`` (NO_SLOT), reads the pool's padding row (its last).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_SCALE_BLOCK = 64
FP4_SCALE_BLOCK = 32

# Pool record formats, passed to kernels as a constexpr.
PLAIN, FP8_ENTRY, FP4_KEY = 0, 1, 2


# ---- Triton helpers ---------------------------------------------------------------------
@triton.jit
def _e8m0(byte):
    """uint8 exponent byte (as int32) -> float32 2^(byte - 127), exactly (0 -> 2^-127, 255 -> NaN)."""
    bits = tl.where(byte == 0, 0x00400000, byte << 23)
    bits = tl.where(byte == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _pow2(e):
    """int32 exponent in [-126, 127] -> float32 2^e."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def entry_block_row(table_ptr, stride_tb, stride_tc, n_cols, pool_pad_row, seq, entries, ok, E):
    """Row offsets (block, slot) of ``entries`` of sequence ``seq`` through its block table."""
    col = entries // E
    in_table = ok & (col < n_cols)
    block = tl.load(table_ptr + seq * stride_tb + col * stride_tc, mask=in_table, other=-1)
    block = tl.where(block < 0, pool_pad_row, block)
    return block, entries % E


@triton.jit
def load_fp8_entry(rec_ptr, d, ok, NOPE: tl.constexpr, ROPE: tl.constexpr):
    """Dims ``d`` (any shape broadcast with the record pointers ``rec_ptr``) of FP8 entry records,
    float32. ``ok`` masks the load."""
    is_nope = d < NOPE
    b = tl.load(rec_ptr + d, mask=ok & is_nope, other=0).to(tl.int32)
    e = (b >> 3) & 15
    m = b & 7
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, (8 + m).to(tl.float32) * _pow2(e - 10))
    val = tl.where((b & 128) != 0, -mag, mag)
    scale_off = NOPE + 2 * ROPE
    s = tl.load(rec_ptr + scale_off + d // 64, mask=ok & is_nope, other=127).to(tl.int32)
    nope = val * _e8m0(s)
    r = d - NOPE
    lo = tl.load(rec_ptr + NOPE + 2 * r, mask=ok & (~is_nope), other=0).to(tl.int32)
    hi = tl.load(rec_ptr + NOPE + 2 * r + 1, mask=ok & (~is_nope), other=0).to(tl.int32)
    rope = ((hi << 24) | (lo << 16)).to(tl.float32, bitcast=True)
    return tl.where(is_nope, nope, rope)


@triton.jit
def load_fp4_key(rec_ptr, d, ok, DIM: tl.constexpr):
    """Dims ``d`` of FP4 indexer-key records (Hadamard-rotated keys), float32."""
    b = tl.load(rec_ptr + d // 2, mask=ok, other=0).to(tl.int32)
    val = e2m1_nibble(b, d)
    s = tl.load(rec_ptr + DIM // 2 + d // 32, mask=ok, other=127).to(tl.int32)
    return val * _e8m0(s)


@triton.jit
def e2m1_nibble(b, d):
    """Packed e2m1 bytes ``b`` (int32; low nibble = even column) -> float32 value of column ``d``."""
    nib = (b >> ((d % 2) * 4)) & 15
    code = nib & 7
    e = code >> 1
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (2.0 + m) * (1 << e).to(tl.float32) * 0.25)
    return tl.where((nib & 8) != 0, -mag, mag)


@triton.jit
def pow2_scale_exponent(amax, MAX_EXP: tl.constexpr, MAX_MANT: tl.constexpr):
    """``kernels.quant._pow2_scale_exponent``: the smallest k with ``amax <= max_code * 2^k``,
    ``max_code = (1 + MAX_MANT / 2^23) * 2^MAX_EXP``; amax 0 -> -127; clamped to [-127, 127].
    From the amax's bits: torch's ``fl(amax / max_code)`` crosses a power of two exactly where
    amax crosses ``max_code`` times it (448 = 1.75 * 2^8, 6 = 1.5 * 2^2: the next float above
    the product already rounds past the power of two). One float differs: an FP4 amax one ulp
    above 6 * 2^-127, whose subnormal ratio torch rounds down (no real key gets near it)."""
    bits = amax.to(tl.int32, bitcast=True)
    k = (bits >> 23) - 127 - MAX_EXP + ((bits & 0x7FFFFF) > MAX_MANT).to(tl.int32)
    k = tl.where(amax == 0.0, -127, k)
    return tl.minimum(tl.maximum(k, -127), 127)


@triton.jit
def e4m3_code(s):
    """|s| <= 448 -> its float8_e4m3fn byte (as int32), round to nearest even: c10's
    ``fp8e4m3fn_from_fp32_value`` step for step (sign from the sign bit: -0 -> 0x80)."""
    bits = s.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(s)
    abits = a.to(tl.int32, bitcast=True)
    sub = (a + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)  # 2^14: its ulp is e4m3's 2^-9
    normal = (abits + ((7 - 127) << 23) + 0x7FFFF + ((abits >> 20) & 1)) >> 20
    return tl.where(abits < (121 << 23), sub, normal) | sign


@triton.jit
def e4m3_value(code):
    """float8_e4m3fn byte (int32) -> float32 (the decode of ``kv_records.load_fp8_entry``)."""
    e = (code >> 3) & 15
    m = code & 7
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, (8 + m).to(tl.float32) * ((e + 117) << 23).to(
        tl.float32, bitcast=True))  # 2^(e - 10)
    return tl.where((code & 128) != 0, -mag, mag)


# ---- torch twins ------------------------------------------------------------------------
def _e8m0_torch(byte: torch.Tensor) -> torch.Tensor:
    s = byte.to(torch.int32)
    bits = torch.where(s == 0, torch.full_like(s, 0x00400000), s << 23)
    return torch.where(s == 255, torch.full_like(s, 0x7FC00000), bits).view(torch.float32)


def decode_fp8_entries(rec: torch.Tensor, nope: int, rope: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``[..., nbytes]`` FP8 entry records -> ``[..., nope + rope]`` in ``dtype``."""
    vals = rec[..., :nope].contiguous().view(torch.float8_e4m3fn).float()
    scales = _e8m0_torch(rec[..., nope + 2 * rope:nope + 2 * rope + -(-nope // FP8_SCALE_BLOCK)])
    vals = vals * scales.repeat_interleave(FP8_SCALE_BLOCK, dim=-1)[..., :nope]
    rope_vals = rec[..., nope:nope + 2 * rope].contiguous().view(torch.bfloat16).float()
    return torch.cat([vals, rope_vals], dim=-1).to(dtype)


def decode_fp4_keys(rec: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``[..., dim/2 + dim/32]`` FP4 key records -> ``[..., dim]`` in ``dtype``."""
    e2m1 = torch.tensor((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0),
                        device=rec.device)
    packed = rec[..., :dim // 2]
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)
    scales = _e8m0_torch(rec[..., dim // 2:dim // 2 + -(-dim // FP4_SCALE_BLOCK)])
    vals = e2m1[codes.long()] * scales.repeat_interleave(FP4_SCALE_BLOCK, dim=-1)[..., :dim]
    return vals.to(dtype)


def gather_rows(pool: torch.Tensor, tables: torch.Tensor, seq: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """Raw records ``[Q, K, R]`` of entries ``entries [Q, K]`` of sequences ``seq [Q]`` (block tables
    ``tables [B, nb]``), reading the padding row past a table's width."""
    E = pool.shape[1]
    col = entries // E
    in_table = col < tables.shape[1]
    blocks = tables[seq[:, None], col.clamp(max=max(tables.shape[1] - 1, 0))] if tables.shape[1] else \
        torch.full_like(entries, -1)
    blocks = torch.where(in_table, blocks, -1)
    return pool[blocks, entries % E]


def decode_rows(rows: torch.Tensor, fmt: int, dim: int, rope: int, dtype: torch.dtype) -> torch.Tensor:
    if fmt == FP8_ENTRY:
        return decode_fp8_entries(rows, dim - rope, rope, dtype)
    if fmt == FP4_KEY:
        return decode_fp4_keys(rows, dim, dtype)
    return rows.to(dtype)
