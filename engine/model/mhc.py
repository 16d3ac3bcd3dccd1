"""Manifold-constrained hyper-connections (mHC, spec §3.2).

The residual is ``hc_mult`` parallel streams ``X: [T, hc, D]``. Before each sublayer the
streams collapse to one input (``pre``); after it the output is expanded back (``post``) and
added to the streams mixed by a doubly-stochastic ``comb`` matrix (Sinkhorn-Knopp).
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.torch_math import rms_norm, sinkhorn


class HyperConnection(nn.Module):
    def __init__(self, hc: int, dim: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc, self.iters, self.hc_eps, self.norm_eps = hc, sinkhorn_iters, hc_eps, norm_eps
        n = (2 + hc) * hc
        self.fn = nn.Parameter(torch.zeros(n, hc * dim, dtype=torch.float32), requires_grad=False)
        self.base = nn.Parameter(torch.zeros(n, dtype=torch.float32), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32), requires_grad=False)

    def pre(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (sublayer input [T, D], post [T, hc], comb [T, hc, hc]); math in fp32."""
        hc = self.hc
        flat = rms_norm(streams.flatten(1).float(), None, self.norm_eps)
        mix = flat @ self.fn.float().t()
        pre_w, post_w, comb_w = mix.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([hc, hc, hc * hc])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb = sinkhorn((comb_w * s_comb + comb_b).view(-1, hc, hc), self.iters, self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
        return collapsed, post, comb

    @staticmethod
    def post(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """``X'_k = post_k * f + sum_j comb[j, k] X_j`` — the sum runs over comb's FIRST index."""
        dtype = streams.dtype
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(
            comb.to(dtype).transpose(-1, -2), streams
        )


class HyperHead(nn.Module):
    """Final collapse of the streams before the last RMSNorm (no Sinkhorn, no post)."""

    def __init__(self, hc: int, dim: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = nn.Parameter(torch.zeros(hc, hc * dim, dtype=torch.float32), requires_grad=False)
        self.base = nn.Parameter(torch.zeros(hc, dtype=torch.float32), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=False)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        flat = rms_norm(streams.flatten(1).float(), None, self.norm_eps)
        pre = torch.sigmoid((flat @ self.fn.float().t()) * self.scale.float() + self.base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
