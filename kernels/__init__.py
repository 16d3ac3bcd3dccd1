"""Fused ops, each a Triton kernel beside a plain-torch twin, behind one dispatch policy.

Policy: Triton for CUDA tensors, the torch twin otherwise. ``DSV4_KERNELS=torch|triton`` forces
one side (for tests and debugging); forcing Triton on CPU tensors needs ``TRITON_INTERPRET=1``
set before ``kernels`` is first imported (the interpreter is chosen when kernels are decorated).
"""
from __future__ import annotations

import os

import torch

from kernels import sink_attention as _sink

BACKEND_ENV = "DSV4_KERNELS"
BACKENDS = ("torch", "triton")


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: which implementation an op on ``t`` runs."""
    forced = os.environ.get(BACKEND_ENV, "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {forced!r}")
        return forced
    return "triton" if t.is_cuda else "torch"


def _check_triton_runs_on(t: torch.Tensor) -> None:
    if not t.is_cuda and not _sink.INTERPRETED:
        raise RuntimeError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "importing kernels, to run on CPU")


def sink_attention(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Decode attention with per-head sinks, V = K: ``q [B, H, D]``, ``keys [B, K, D]``,
    ``mask [B, K]`` bool, ``sinks [H]`` → ``[B, H, D]`` in keys' dtype."""
    _sink.check_sink_attention_args(q, keys, mask, sinks)
    if backend_for(q) == "triton":
        _check_triton_runs_on(q)
        return _sink.sink_attention_triton(q, keys, mask, sinks, scale)
    return _sink.sink_attention_torch(q, keys, mask, sinks, scale)


__all__ = ["BACKEND_ENV", "backend_for", "sink_attention"]
