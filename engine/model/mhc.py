"""Manifold-constrained hyper-connections (mHC, spec §3.2).

The residual is ``hc_mult`` parallel streams ``X: [T, hc, D]``. Before each sublayer the
streams collapse to one input (``pre``); after it the output is expanded back (``post``) and
added to the streams mixed by a doubly-stochastic ``comb`` matrix (Sinkhorn-Knopp).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.model.layers import RMSNorm
import kernels


class HyperConnection(nn.Module):
    def __init__(self, hc: int, dim: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc, self.iters, self.hc_eps, self.norm_eps = hc, sinkhorn_iters, hc_eps, norm_eps
        n = (2 + hc) * hc
        self.fn = nn.Parameter(torch.zeros(n, hc * dim, dtype=torch.float32), requires_grad=False)
        self.base = nn.Parameter(torch.zeros(n, dtype=torch.float32), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32), requires_grad=False)

    def pre(self, streams: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (the sublayer's normed input [T, D], post [T, hc], comb [T, hc, hc]): the
        collapse weights, Sinkhorn and ``norm`` in one fused op (``kernels.hc_pre``), math in fp32."""
        return kernels.hc_pre(streams, self.fn, self.base, self.scale, norm.weight, iters=self.iters,
                              hc_eps=self.hc_eps, norm_eps=norm.eps)

    @staticmethod
    def post(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """``X'_k = post_k * f + sum_j comb[j, k] X_j`` — the sum runs over comb's FIRST index."""
        return kernels.hc_post(out, streams, post, comb)


class HyperHead(nn.Module):
    """Final collapse of the streams before the last RMSNorm (no Sinkhorn, no post)."""

    def __init__(self, hc: int, dim: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = nn.Parameter(torch.zeros(hc, hc * dim, dtype=torch.float32), requires_grad=False)
        self.base = nn.Parameter(torch.zeros(hc, dtype=torch.float32), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=False)

    def forward(self, streams: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """The collapsed streams through the final ``norm`` (one fused op, ``kernels.hc_head``)."""
        return kernels.hc_head(streams, self.fn, self.base, self.scale, norm.weight, hc_eps=self.hc_eps,
                               norm_eps=norm.eps)
