"""Small building blocks: RMSNorm, V4's interleaved partial RoPE (with YaRN), linear layers.

All functions take flat ``[tokens, ...]`` tensors; nothing here knows about sequences.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from engine.model.config import ModelConfig, YarnParams
import kernels
from kernels.torch_math import apply_rope, rms_norm  # noqa: F401  (the model's names for them)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------
def rope_inv_freq(rope_dim: int, theta: float, yarn: YarnParams | None) -> torch.Tensor:
    """One frequency per rotated pair. YaRN blends interpolated and extrapolated frequencies
    with a linear ramp between the correction dims (no attention-scale factor in V4)."""
    pos = theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    inv = 1.0 / pos
    if yarn is None:
        return inv

    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta)
        )

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 keeps the original frequency, 0 divides it by the factor
    return (1.0 / (yarn.factor * pos)) * (1 - extrapolate) + inv * extrapolate


class Rotary(nn.Module):
    """cos/sin for V4's interleaved RoPE on the trailing ``rope_dim`` channels."""

    def __init__(self, rope_dim: int, theta: float, yarn: YarnParams | None):
        super().__init__()
        self.rope_dim = rope_dim
        self.register_buffer("inv_freq", rope_inv_freq(rope_dim, theta, yarn), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        # Cast to the activation dtype as transformers does (a no-op in fp32).
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


# ---------------------------------------------------------------------------------------------
# Linear layers
# ---------------------------------------------------------------------------------------------
class Linear(nn.Module):
    """``y = x @ W.T`` with ``W`` stored dense or quantised.

    Quantised storage keeps the checkpoint's form (FP8 e4m3 + block scales, or packed MXFP4 +
    per-32 scales) so kernels can consume it; ``weight`` dequantises on the fly when no dense
    copy is kept. ``compute_dtype`` lets a layer run in fp32 regardless of the model dtype
    (router, compressor, head — spec §3.9)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, compute_dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dense = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.compute_dtype = compute_dtype
        # Buffers, so .to(device) moves the quantised form with the module.
        self.register_buffer("qweight", None, persistent=False)
        self.register_buffer("qscale", None, persistent=False)
        self.qformat: str | None = None  # "fp8" | "fp4"
        self.act_quant = False  # round activations to FP8 per 128 channels (set by the loader)

    @property
    def weight(self) -> torch.Tensor:
        if self.dense.numel() or self.qweight is None:
            return self.dense
        return self.dequantized()

    def dequantized(self) -> torch.Tensor:
        from kernels.quant import fp8_block_dequantize, mxfp4_dequantize

        if self.qformat == "fp8":
            return fp8_block_dequantize(self.qweight, self.qscale, self.dense.dtype)
        return mxfp4_dequantize(self.qweight, self.qscale, self.dense.dtype)

    def set_quantized(self, qweight: torch.Tensor, qscale: torch.Tensor, fmt: str, keep_dense: bool) -> None:
        self.qweight, self.qscale, self.qformat = qweight, qscale, fmt
        if keep_dense:
            # Dense compute only: drop the checkpoint-format copy instead of holding both.
            self.dense.data = self.dequantized().to(self.dense.dtype)
            self.qweight = self.qscale = None
            self.qformat = None
        else:
            self.dense.data = torch.empty(0, dtype=self.dense.dtype, device=self.dense.device)

    def stored(self) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """``(weight, scale, fmt)`` as ``kernels.linear`` takes them: the stored form when kept."""
        if self.qweight is None:
            return self.dense, None, "dense"
        return self.qweight, self.qscale, self.qformat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Activations in the compute dtype (the model dtype unless fp32 is asked for); on the
        # Triton path a stored weight is decoded in the GEMM's registers, never in memory.
        w, scale, fmt = self.stored()
        dtype = self.compute_dtype or self.dense.dtype
        if fmt == "dense" and w.dtype != dtype:
            w = w.to(dtype)
        return kernels.linear(x.to(dtype), w, scale, fmt, act_quant=self.act_quant)


def model_rotaries(cfg: ModelConfig) -> dict[str, Rotary]:
    """Sliding-only layers rotate with theta=10000 and no YaRN; compressor layers with the
    compress theta and YaRN (spec §3.3)."""
    return {
        "main": Rotary(cfg.rope_dim, cfg.rope_theta, None),
        "compress": Rotary(cfg.rope_dim, cfg.compress_rope_theta, cfg.yarn),
    }
