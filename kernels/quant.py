"""Quantisation formats of DeepSeek-V4 checkpoints and the KV/indexer/activation simulations.

Formats (v4-model-spec §2.3):
- FP8 block weights: float8 e4m3fn values, one e8m0 scale per 128x128 block,
  ``W[o, i] = e4m3(w[o, i]) * 2^(s[o // 128, i // 128] - 127)``.
- MXFP4 experts: two e2m1 nibbles per int8 byte (low nibble = even column), one e8m0 scale per 32
  input columns, ``W[o, i] = E2M1[nibble(o, i)] * 2^(s[o, i // 32] - 127)``.

Simulations (§3.6, §3.7, §3.9, §3.13): the reference rounds the nope part of every KV vector to FP8
(blocks of 64), the indexer keys/queries to FP4 after a Hadamard rotation, and every FP8/FP4 linear
input to FP8 per 128 channels. All scales are powers of two (ue8m0), so every dequantised value is
exact in float32 and bfloat16.

Blocks run along the last dimension (and along rows for the 2-D weight format); a trailing partial
block is allowed everywhere and gets its own scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
E8M0_BIAS = 127
# Amax floor of DeepSeek's activation quantiser: scale = 2^ceil(log2(max(amax, 1e-4) / 448)).
ACT_AMAX_FLOOR = 1e-4

# e2m1 nibble -> value; bit 3 is the sign (8 is -0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


# ---------------------------------------------------------------------------------------------
# e8m0 scales
# ---------------------------------------------------------------------------------------------

def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu (or uint8 exponent bytes) -> float32 ``2^(s - 127)``; byte 255 -> NaN."""
    if scale.dtype == torch.float8_e8m0fnu:
        exponent_bytes = scale.view(torch.uint8)
    elif scale.dtype == torch.uint8:
        exponent_bytes = scale
    else:
        raise ValueError(f"scale must be float8_e8m0fnu or uint8, got {scale.dtype}")
    s = exponent_bytes.to(torch.int32)
    # Build the float32 bit pattern directly: exact for every byte, including 2^-127 (subnormal).
    bits = torch.where(s == 0, torch.full_like(s, 0x00400000), s << 23)
    bits = torch.where(s == 255, torch.full_like(s, 0x7FC00000), bits)
    return bits.view(torch.float32)


def float_to_e8m0(power_of_two: torch.Tensor) -> torch.Tensor:
    """Exact powers of two in [2^-127, 2^127] -> float8_e8m0fnu. Anything else is a ValueError."""
    if not power_of_two.is_floating_point():
        raise ValueError(f"power_of_two must be a floating tensor, got {power_of_two.dtype}")
    values = power_of_two.to(torch.float64)
    mantissa, exponent = torch.frexp(values)
    if not bool(torch.all(mantissa == 0.5)):
        raise ValueError("power_of_two must hold only positive, finite powers of two")
    exponent = exponent - 1  # frexp gives value = 0.5 * 2^e
    if bool(torch.any((exponent < -E8M0_BIAS) | (exponent > E8M0_BIAS))):
        raise ValueError("power_of_two values must lie in [2^-127, 2^127]")
    return _exponent_to_e8m0(exponent)


def _exponent_to_e8m0(exponent: torch.Tensor) -> torch.Tensor:
    return (exponent.to(torch.int32) + E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)


def _pow2_scale_exponent(amax: torch.Tensor, max_code: float, amax_floor: float = 0.0) -> torch.Tensor:
    """Smallest k with amax / 2^k <= max_code, i.e. ``ceil(log2(amax / max_code))`` (int32).

    Uses frexp instead of log2 so exact powers of two never land one step off. An all-zero block
    (with no floor) gets the smallest scale 2^-127; its values are 0 whatever the scale.
    """
    amax = amax.to(torch.float32)
    if amax_floor > 0.0:
        amax = amax.clamp(min=amax_floor)
    ratio = amax / max_code
    mantissa, exponent = torch.frexp(ratio)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # exact power of two
    exponent = torch.where(ratio == 0, torch.full_like(exponent, -E8M0_BIAS), exponent)
    return exponent.clamp(-E8M0_BIAS, E8M0_BIAS)


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    return e8m0_to_float(_exponent_to_e8m0(exponent))


# ---------------------------------------------------------------------------------------------
# argument checks and last-dim blocking
# ---------------------------------------------------------------------------------------------

def _check_block(block: int, name: str = "block") -> None:
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"{name} must be a positive int, got {block!r}")


def _check_float_input(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")


def _check_finite(w: torch.Tensor, name: str) -> None:
    # Only on the weight paths (load time): a full pass plus a host sync is too dear per token.
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains inf or NaN")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _blocks_last_dim(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., d] -> [..., ceil(d / block), block], zero-padded (zeros never change a block amax)."""
    d = x.shape[-1]
    padded = F.pad(x, (0, _ceil_div(d, block) * block - d))
    return padded.unflatten(-1, (-1, block))


def _unblock_last_dim(blocks: torch.Tensor, d: int) -> torch.Tensor:
    return blocks.flatten(-2)[..., :d]


def _block_amax(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.abs().amax(dim=-1)


# ---------------------------------------------------------------------------------------------
# FP8 block-128 weights
# ---------------------------------------------------------------------------------------------

def fp8_block_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D weight -> (float8_e4m3fn weight, float8_e8m0fnu scale [ceil(out/block), ceil(in/block)]).

    Each block's scale is the smallest power of two that brings its max |w| within 448.
    """
    _check_float_input(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out, in], got shape {tuple(w.shape)}")
    _check_finite(w, "w")
    _check_block(block)
    out_dim, in_dim = w.shape
    out_blocks, in_blocks = _ceil_div(out_dim, block), _ceil_div(in_dim, block)
    w32 = w.to(torch.float32)
    padded = F.pad(w32, (0, in_blocks * block - in_dim, 0, out_blocks * block - out_dim))
    tiles = padded.view(out_blocks, block, in_blocks, block)
    exponent = _pow2_scale_exponent(tiles.abs().amax(dim=(1, 3)), FP8_E4M3_MAX)
    scale_full = _expand_block_scale(_pow2(exponent), block, out_dim, in_dim)
    w_fp8 = (w32 / scale_full).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return w_fp8, _exponent_to_e8m0(exponent)


def fp8_block_dequantize(w_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                         block: int = 128) -> torch.Tensor:
    """``W[o, i] = float(w_fp8[o, i]) * scale[o // block, i // block]`` cast to ``dtype``.

    ``scale`` is float8_e8m0fnu (official files) or float32 (checkpoints that store plain scales).
    """
    if not isinstance(w_fp8, torch.Tensor) or w_fp8.dtype != torch.float8_e4m3fn:
        raise ValueError(f"w_fp8 must be a float8_e4m3fn tensor, got {getattr(w_fp8, 'dtype', type(w_fp8))}")
    if w_fp8.dim() != 2:
        raise ValueError(f"w_fp8 must be 2-D [out, in], got shape {tuple(w_fp8.shape)}")
    _check_block(block)
    out_dim, in_dim = w_fp8.shape
    expected = (_ceil_div(out_dim, block), _ceil_div(in_dim, block))
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match weight {tuple(w_fp8.shape)}; "
                         f"expected {expected} for block {block}")
    scale32 = _scale_as_float(scale)
    scale_full = _expand_block_scale(scale32, block, out_dim, in_dim)
    return (w_fp8.to(torch.float32) * scale_full).to(dtype)


def _scale_as_float(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return e8m0_to_float(scale)
    if scale.dtype == torch.float32:
        return scale
    raise ValueError(f"scale must be float8_e8m0fnu or float32, got {scale.dtype}")


def _expand_block_scale(scale: torch.Tensor, block: int, out_dim: int, in_dim: int) -> torch.Tensor:
    rows = scale.repeat_interleave(block, dim=0)[:out_dim]
    return rows.repeat_interleave(block, dim=1)[:, :in_dim]


# ---------------------------------------------------------------------------------------------
# FP4 e2m1 with per-block e8m0 scales (MXFP4 experts, indexer simulation)
# ---------------------------------------------------------------------------------------------

def _e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Values already divided by their scale (|v| <= 6) -> nibble codes, nearest grid value.

    Ties go to the even code (round-half-to-even on the e2m1 mantissa), like IEEE rounding.
    """
    magnitude = scaled.abs()
    grid = E2M1_VALUES[:8]
    code = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for k in range(7):
        midpoint = (grid[k] + grid[k + 1]) / 2
        step_up = magnitude > midpoint if k % 2 == 0 else magnitude >= midpoint
        code += step_up.to(torch.uint8)
    sign = (scaled < 0).to(torch.uint8) << 3
    return code | sign


def fp4_block_quantize(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., d] -> (packed int8 [..., d/2], float8_e8m0fnu scale [..., ceil(d/block)]).

    Scale per block = 2^ceil(log2(amax / 6)); values rounded to the nearest e2m1 value. Byte ``k``
    holds column ``2k`` in its low nibble and ``2k + 1`` in its high nibble.
    """
    _check_float_input(x, "x")
    _check_block(block)
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"x last dimension must be even to pack two nibbles per byte, got {d}")
    blocks = _blocks_last_dim(x.to(torch.float32), block)
    exponent = _pow2_scale_exponent(_block_amax(blocks), FP4_E2M1_MAX)
    scaled = _unblock_last_dim(blocks / _pow2(exponent).unsqueeze(-1), d)
    codes = _e2m1_codes(scaled)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.view(torch.int8), _exponent_to_e8m0(exponent)


def fp4_block_dequantize(packed: torch.Tensor, scale: torch.Tensor,
                         dtype: torch.dtype = torch.float32, block: int = 32) -> torch.Tensor:
    """Inverse of :func:`fp4_block_quantize`: ``x[..., c] = E2M1[nibble c] * scale[..., c // block]``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"packed must be an int8 or uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    _check_block(block)
    d = packed.shape[-1] * 2 if packed.dim() else 0
    expected = (*packed.shape[:-1], _ceil_div(d, block))
    if d == 0 or tuple(scale.shape) != expected:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match packed shape {tuple(packed.shape)}; "
                         f"expected {expected} for block {block}")
    raw = packed.view(torch.uint8)
    codes = torch.stack((raw & 0x0F, raw >> 4), dim=-1).flatten(-2)
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)[codes.long()]
    blocks = _blocks_last_dim(values, block) * _scale_as_float(scale).unsqueeze(-1)
    return _unblock_last_dim(blocks, d).to(dtype)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D expert weight [out, in] -> (packed int8 [out, in/2], float8_e8m0fnu scale [out, in/32])."""
    _check_float_input(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out, in], got shape {tuple(w.shape)}")
    _check_finite(w, "w")
    return fp4_block_quantize(w, block=32)


def mxfp4_dequantize(packed: torch.Tensor, scale: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W[o, i] = E2M1[nibble(o, i)] * 2^(scale[o, i // 32] - 127)`` cast to ``dtype``."""
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2:
        raise ValueError("packed must be a 2-D tensor [out, in/2]")
    in_dim = packed.shape[1] * 2
    if tuple(scale.shape) != (packed.shape[0], _ceil_div(in_dim, 32)):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match packed {tuple(packed.shape)}; "
                         f"expected {(packed.shape[0], _ceil_div(in_dim, 32))}")
    return fp4_block_dequantize(packed, scale, dtype, block=32)


# ---------------------------------------------------------------------------------------------
# KV / indexer / activation simulations
# ---------------------------------------------------------------------------------------------

def fp8_kv_quantize(x: torch.Tensor, nope_dim: int,
                    block: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KV vectors [..., d] -> (e4m3 nope [..., nope_dim], bf16 rope [..., d - nope_dim],
    e8m0 scales [..., ceil(nope_dim / block)]).

    The FlashMLA/vLLM ``fp8_ds_mla`` layout: only the nope dims are rounded; rope stays BF16.
    Scales follow the reference act-quant rule 2^ceil(log2(max(amax, 1e-4) / 448)).
    """
    _check_float_input(x, "x")
    _check_block(block)
    d = x.shape[-1]
    if not isinstance(nope_dim, int) or not 0 < nope_dim <= d:
        raise ValueError(f"nope_dim must be an int in (0, {d}], got {nope_dim!r}")
    blocks = _blocks_last_dim(x[..., :nope_dim].to(torch.float32), block)
    exponent = _pow2_scale_exponent(_block_amax(blocks), FP8_E4M3_MAX, ACT_AMAX_FLOOR)
    scaled = blocks / _pow2(exponent).unsqueeze(-1)
    nope = _unblock_last_dim(scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX), nope_dim).to(torch.float8_e4m3fn)
    rope = x[..., nope_dim:].to(torch.bfloat16)
    return nope, rope, _exponent_to_e8m0(exponent)


def fp8_kv_dequantize(nope: torch.Tensor, rope: torch.Tensor, scale: torch.Tensor,
                      dtype: torch.dtype = torch.bfloat16, block: int = 64) -> torch.Tensor:
    """Inverse of :func:`fp8_kv_quantize`: ``[nope * scale | rope]`` in ``dtype``."""
    if not isinstance(nope, torch.Tensor) or nope.dtype != torch.float8_e4m3fn:
        raise ValueError(f"nope must be a float8_e4m3fn tensor, got {getattr(nope, 'dtype', type(nope))}")
    _check_block(block)
    if nope.dim() == 0 or rope.shape[:-1] != nope.shape[:-1]:
        raise ValueError(f"nope {tuple(nope.shape)} and rope {tuple(rope.shape)} must share leading dimensions")
    nope_dim = nope.shape[-1]
    expected = (*nope.shape[:-1], _ceil_div(nope_dim, block))
    if nope_dim == 0 or tuple(scale.shape) != expected:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match nope shape {tuple(nope.shape)}; "
                         f"expected {expected} for block {block}")
    blocks = _blocks_last_dim(nope.to(torch.float32), block) * _scale_as_float(scale).unsqueeze(-1)
    return torch.cat((_unblock_last_dim(blocks, nope_dim), rope.to(torch.float32)), dim=-1).to(dtype)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_n / sqrt(n)`` over the last dim, ``H_n`` the Sylvester Walsh-Hadamard matrix
    (``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``). Computed in at least float32, returned in
    x.dtype.

    H_n is symmetric, so ``x @ H`` equals ``H @ x`` per vector; the butterfly below applies one
    H_2 factor per stage, which reproduces the Sylvester (natural) order.
    """
    _check_float_input(x, "x")
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"x last dimension must be a power of two, got {n}")
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    half = 1
    while half < n:
        pairs = y.unflatten(-1, (n // (2 * half), 2, half))
        low, high = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((low + high, low - high), dim=-2).flatten(-3)
        half *= 2
    return (y * n ** -0.5).to(x.dtype)


def act_quant_fp8(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Simulated per-token FP8 activation quantisation along the last dim; returns dequantised
    values in x.dtype (scale 2^ceil(log2(max(amax, 1e-4) / 448)) per ``block`` channels)."""
    _check_float_input(x, "x")
    _check_block(block)
    d = x.shape[-1]
    blocks = _blocks_last_dim(x.to(torch.float32), block)
    scale = _pow2(_pow2_scale_exponent(_block_amax(blocks), FP8_E4M3_MAX, ACT_AMAX_FLOOR)).unsqueeze(-1)
    rounded = (blocks / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return _unblock_last_dim(rounded.to(torch.float32) * scale, d).to(x.dtype)
