"""The one dispatch policy: Triton for CUDA tensors, the torch twin otherwise.

``DSV4_KERNELS=torch|triton`` forces one side (for tests and debugging); forcing Triton on CPU
tensors needs ``TRITON_INTERPRET=1`` set before ``kernels`` is first imported (the interpreter is
chosen when kernels are decorated).
"""
from __future__ import annotations

import os

import torch

from kernels.sink_attention import INTERPRETED

BACKEND_ENV = "DSV4_KERNELS"
BACKENDS = ("torch", "triton")


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: which implementation an op on ``t`` runs."""
    return backend_for_device(t.device)


def backend_for_device(device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"``: which implementation ops on tensors of ``device`` run."""
    forced = os.environ.get(BACKEND_ENV, "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {forced!r}")
        return forced
    return "triton" if torch.device(device).type == "cuda" else "torch"


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` runs its Triton kernel (raising if Triton cannot run on ``t``)."""
    if backend_for(t) != "triton":
        return False
    if not t.is_cuda and not INTERPRETED:
        raise RuntimeError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "importing kernels, to run on CPU")
    return True
