"""Weight GEMMs on the checkpoint's stored forms (W8A16 / W4A16): ``y = x @ dequant(w).T``.

Weight formats (``fmt``, see ``kernels/quant.py``):
- ``"dense"``: ``w [N, K]`` floating, ``scale`` None.
- ``"fp8"``: ``w [N, K]`` float8_e4m3fn, ``scale [ceil(N/128), ceil(K/128)]`` e8m0 (or float32).
- ``"fp4"``: ``w [N, K/2]`` int8, two e2m1 nibbles per byte (low = even column),
  ``scale [N, ceil(K/32)]`` e8m0 (or float32).

``act_quant`` (FP8 weights, as DeepSeek's reference runs them, spec §3.9): the activations are
first rounded per token per 128 channels to e4m3 with a power-of-two scale
(``kernels.quant.act_quant_fp8``), then the GEMM runs as above on those exact values (the same
products as an FP8 x FP8 MMA rescaled per block). Off by default: transformers, the parity
reference, computes with unquantised activations.

``linear_torch`` / ``grouped_linear_torch`` are the twins (dequantise with ``kernels.quant`` in x's
dtype, then ``F.linear`` / the grouped einsum: what ``Linear.forward`` and the attention output
projection do today; every dequantised value is exact in bf16 and fp32, so dequantising straight to
x's dtype equals dequantising to the model dtype and casting). ``grouped_linear_triton`` is one
kernel: the weights are decoded tile by tile in registers, the product accumulates in fp32, and a
group grid axis covers the grouped projection (``linear`` is the one-group case).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.kv_records import _e8m0, e2m1_nibble, e4m3_code, e4m3_value, pow2_scale_exponent
from kernels.quant import ACT_AMAX_FLOOR, act_quant_fp8, fp8_block_dequantize, mxfp4_dequantize

FORMATS = ("dense", "fp8", "fp4")  # the kernels' FMT constexpr is the index here
FP8_BLOCK = 128
FP4_BLOCK = 32
ACT_BLOCK = 128  # activation channels per FP8 scale under act_quant

BLOCK_N = 64
BLOCK_K = 64  # divides the FP8 scale block (one scale column per K tile) and is a multiple of 32


# ---- argument checks ----------------------------------------------------------------------
def weight_shape(w: torch.Tensor, fmt: str) -> tuple[int, int]:
    """Logical ``(N, K)`` of a stored weight ``[..., N, K or K/2]``."""
    return (w.shape[-2], w.shape[-1] * 2) if fmt == "fp4" else (w.shape[-2], w.shape[-1])


def check_weight(w: torch.Tensor, scale: torch.Tensor | None, fmt: str, name: str = "w",
                 scale_name: str = "scale") -> None:
    """Raise ValueError (naming the parameter) unless ``w``/``scale`` are one stored weight of ``fmt``;
    ``w`` may carry leading (expert) dimensions that ``scale`` shares."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        raise ValueError(f"{name} must be a tensor with at least 2 dims [..., N, K], got {getattr(w, 'shape', w)}")
    lead = tuple(w.shape[:-2])
    if fmt == "dense":
        if not w.is_floating_point() or w.dtype == torch.float8_e4m3fn:
            raise ValueError(f"{name} must be floating for fmt 'dense', got {w.dtype}")
        if scale is not None:
            raise ValueError(f"{scale_name} must be None for fmt 'dense'")
        return
    if fmt == "fp8" and w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name} must be float8_e4m3fn for fmt 'fp8', got {w.dtype}")
    if fmt == "fp4" and w.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"{name} must be int8 (packed e2m1) for fmt 'fp4', got {w.dtype}")
    if not isinstance(scale, torch.Tensor) or scale.dtype not in (torch.float8_e8m0fnu, torch.uint8, torch.float32):
        raise ValueError(f"{scale_name} must be a float8_e8m0fnu or float32 tensor for fmt {fmt!r}")
    N, K = weight_shape(w, fmt)
    if fmt == "fp8":
        expected = (*lead, -(-N // FP8_BLOCK), -(-K // FP8_BLOCK))
    else:
        expected = (*lead, N, -(-K // FP4_BLOCK))
    if tuple(scale.shape) != expected:
        raise ValueError(f"{scale_name} must be {expected} for {name} {tuple(w.shape)} ({fmt}), "
                         f"got {tuple(scale.shape)}")


def check_linear_args(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str,
                      groups: int | None = None) -> None:
    """``x [..., K]`` (``groups``: ``x [T, G, K]`` and ``w`` holding ``G * O`` rows)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError("x must be a floating tensor [..., K]")
    check_weight(w, scale, fmt)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D, got shape {tuple(w.shape)}")
    N, K = weight_shape(w, fmt)
    if x.shape[-1] != K:
        raise ValueError(f"x last dim {x.shape[-1]} must equal the weight's K={K}")
    if groups is not None:
        if x.dim() != 3:
            raise ValueError(f"x must be [T, G, K], got shape {tuple(x.shape)}")
        if N % groups:
            raise ValueError(f"w rows {N} must be a multiple of the {groups} groups of x")
    devices = {t.device for t in (x, w, scale) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, w and scale must share one device, got {sorted(map(str, devices))}")


# ---- torch twins --------------------------------------------------------------------------
def dequantize_weight(w: torch.Tensor, scale: torch.Tensor | None, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype`` (the stored form decoded by ``kernels.quant``)."""
    if fmt == "fp8":
        return fp8_block_dequantize(w, scale, dtype)
    if fmt == "fp4":
        return mxfp4_dequantize(w, scale, dtype)
    return w.to(dtype)


def linear_torch(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str,
                 out_dtype: torch.dtype | None = None, act_quant: bool = False) -> torch.Tensor:
    """``F.linear(x, dequant(w))`` in x's dtype (``act_quant``: of x rounded to FP8 per 128
    channels), cast to ``out_dtype`` if given."""
    if act_quant:
        x = act_quant_fp8(x, ACT_BLOCK)
    y = F.linear(x, dequantize_weight(w, scale, fmt, x.dtype))
    return y if out_dtype is None else y.to(out_dtype)


def grouped_linear_torch(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """``einsum("tgi,goi->tgo", x, dequant(w).view(G, O, K))`` in x's dtype."""
    G = x.shape[1]
    wd = dequantize_weight(w, scale, fmt, x.dtype)
    return torch.einsum("tgi,goi->tgo", x, wd.view(G, wd.shape[0] // G, -1))


# ---- Triton -------------------------------------------------------------------------------
@triton.jit
def load_weight_tile(w_ptr, s_ptr, rows, cols, ok, stride_wn, stride_wk, stride_sn, stride_sk,
                     FMT: tl.constexpr, SCALE_F32: tl.constexpr):
    """Dense float32 values ``W[rows, cols]`` (``rows [BN, 1]``, ``cols [1, BK]``, int64) of a stored
    weight whose base pointers are ``w_ptr``/``s_ptr``; ``ok`` masks the tile (0 outside)."""
    if FMT == 1:  # FP8: e4m3 bytes through the hardware conversion, one scale per 128x128 block
        b = tl.load(w_ptr + rows * stride_wn + cols * stride_wk, mask=ok, other=0)
        val = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        s_off = (rows // 128) * stride_sn + (cols // 128) * stride_sk
    elif FMT == 2:  # FP4: two nibbles per byte, one scale per 32 columns of a row
        b = tl.load(w_ptr + rows * stride_wn + (cols // 2) * stride_wk, mask=ok, other=0).to(tl.int32) & 255
        val = e2m1_nibble(b, cols)
        s_off = rows * stride_sn + (cols // 32) * stride_sk
    else:
        return tl.load(w_ptr + rows * stride_wn + cols * stride_wk, mask=ok, other=0.0).to(tl.float32)
    if SCALE_F32:
        s = tl.load(s_ptr + s_off, mask=ok, other=1.0)
    else:
        s = _e8m0(tl.load(s_ptr + s_off, mask=ok, other=127).to(tl.int32))
    return val * s


@triton.jit
def _grouped_linear_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr,
    M, O, K,
    stride_xm, stride_xg, stride_xk,
    stride_wn, stride_wk, stride_sn, stride_sk,
    stride_om, stride_og, stride_on,
    FMT: tl.constexpr, SCALE_F32: tl.constexpr, IEEE: tl.constexpr, ACT_QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per (M tile, N tile, group): out[m, g, n] = sum_k x[m, g, k] * W[g*O + n, k].
    g = tl.program_id(2)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < O
    rows = (g * O + n).to(tl.int64)[:, None]
    x_row = x_ptr + m.to(tl.int64)[:, None] * stride_xm + g.to(tl.int64) * stride_xg
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(x_row + k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if ACT_QUANT:
            xt = _act_quant_tile(xt, x_row, stride_xk, m_ok, k0, K, BLOCK_K)
        wt = load_weight_tile(w_ptr, s_ptr, rows, k.to(tl.int64)[None, :], n_ok[:, None] & k_ok[None, :],
                              stride_wn, stride_wk, stride_sn, stride_sk, FMT, SCALE_F32)
        # Activations stay in x's dtype (bf16 on the tensor cores; the decoded weights are exact in it).
        if IEEE:
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt.to(xt.dtype)), acc)
    out = out_ptr + m.to(tl.int64)[:, None] * stride_om + g.to(tl.int64) * stride_og + n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _act_quant_tile(xt, x_row, stride_xk, m_ok, k0, K, BLOCK_K: tl.constexpr):
    """The x tile at columns [k0, k0 + BLOCK_K) rounded as ``act_quant_fp8``: e4m3 values times
    2^ceil(log2(max(amax, 1e-4) / 448)), amax over each row's 128-channel block (BLOCK_K divides
    128: the block is re-read for its amax). Exact in x's dtype (bf16 holds every e4m3 * 2^k)."""
    cb = (k0 // 128) * 128 + tl.arange(0, 128)
    block = tl.load(x_row + cb[None, :] * stride_xk, mask=m_ok[:, None] & (cb < K)[None, :], other=0.0)
    amax = tl.maximum(tl.max(tl.abs(block.to(tl.float32)), axis=1), ACT_AMAX)
    e = pow2_scale_exponent(amax, 8, 0x600000)  # 448 = 1.75 * 2^8
    scale = ((e + 127) << 23).to(tl.float32, bitcast=True)[:, None]
    q = e4m3_value(e4m3_code(xt.to(tl.float32) / scale)) * scale
    return q.to(xt.dtype)


ACT_AMAX = tl.constexpr(ACT_AMAX_FLOOR)


def kernel_weight_args(w: torch.Tensor, scale: torch.Tensor | None, fmt: str):
    """(weight, scale, FMT code, SCALE_F32) as the kernels take them: byte views of the FP8/e8m0
    storage (same memory), a dummy scale for dense weights."""
    code = FORMATS.index(fmt)
    if fmt == "fp8":
        w = w.view(torch.uint8)
    if scale is None:
        return w, w, code, False
    if scale.dtype == torch.float8_e8m0fnu:
        scale = scale.view(torch.uint8)
    return w, scale, code, scale.dtype == torch.float32


def _scale_strides(scale: torch.Tensor | None) -> tuple[int, int]:
    return tuple(scale.stride()[-2:]) if scale is not None else (0, 0)


def grouped_linear_triton(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str,
                          out_dtype: torch.dtype | None = None, act_quant: bool = False) -> torch.Tensor:
    """``x [M, G, K]`` against ``w`` (``G * O`` rows) -> ``[M, G, O]`` in ``out_dtype`` (default x's)."""
    M, G, K = x.shape
    O = weight_shape(w, fmt)[0] // G
    out = torch.empty(M, G, O, dtype=out_dtype or x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    ss = _scale_strides(scale)
    wk, sk, code, scale_f32 = kernel_weight_args(w, scale, fmt)
    block_m = min(64, max(16, triton.next_power_of_2(M)))  # tl.dot needs >= 16 rows; decode pads M
    grid = (triton.cdiv(M, block_m), triton.cdiv(O, BLOCK_N), G)
    _grouped_linear_kernel[grid](
        x, wk, sk, out, M, O, K, *x.stride(), *wk.stride(), *ss, *out.stride(),
        FMT=code, SCALE_F32=scale_f32, IEEE=x.dtype == torch.float32, ACT_QUANT=act_quant,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out


def linear_triton(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str,
                  out_dtype: torch.dtype | None = None, act_quant: bool = False) -> torch.Tensor:
    """``x [M, K]`` -> ``[M, N]``: the grouped kernel with one group."""
    return grouped_linear_triton(x[:, None], w, scale, fmt, out_dtype, act_quant)[:, 0]
