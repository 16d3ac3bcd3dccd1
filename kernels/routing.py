"""MoE routing after the gate GEMM (spec §3.8), fused: scores, top-k (or the hash layer's fixed
experts), gathered and renormalised weights, in one launch.

For token ``t`` with gate logits ``logits[t] [E]``::

    scores = score_fn(logits[t])                 # sqrtsoftplus | sigmoid | softmax
    idx    = tid2eid[token_ids[t]]               # hash layers
           | top-k of scores + bias              # else: descending, as torch.topk
    w      = scores[idx] / (sum(scores[idx]) + 1e-20) * scaling

``moe_route_torch`` is the model's own math (``MoE.route`` after ``x @ gate.T``), op for op.
``moe_route_triton`` runs one program per token with the whole expert row in registers (E is
256/384 in V4) and picks the top-k by k arg-max passes, ties to the lower expert index (torch.topk
leaves the order of exact ties unspecified; with float scores and a bias they do not occur).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SCORINGS = ("sqrtsoftplus", "sigmoid", "softmax")
_SCORING_CODE = {name: i for i, name in enumerate(SCORINGS)}


def score_fn(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Router scores of fp32 logits (the model's ``score_fn``)."""
    if kind == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def check_moe_route_args(logits: torch.Tensor, bias: torch.Tensor | None, token_ids: torch.Tensor,
                         tid2eid: torch.Tensor | None, top_k: int, scoring: str) -> None:
    """Raise ValueError (naming the parameter) unless the arguments describe one routing call."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be float32 [T, E], got {logits.dtype} {tuple(logits.shape)}")
    T, E = logits.shape
    if bias is not None and (tuple(bias.shape) != (E,) or bias.dtype != torch.float32):
        raise ValueError(f"bias must be float32 [E={E}] or None, got {bias.dtype} {tuple(bias.shape)}")
    if tuple(token_ids.shape) != (T,) or token_ids.dtype != torch.long:
        raise ValueError(f"token_ids must be int64 [T={T}], got {token_ids.dtype} {tuple(token_ids.shape)}")
    if not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    if tid2eid is not None and (tid2eid.dim() != 2 or tid2eid.shape[1] != top_k
                                or tid2eid.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"tid2eid must be int32/int64 [V, top_k={top_k}] or None, got {tid2eid.dtype} "
                         f"{tuple(tid2eid.shape)}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    devices = {t.device for t in (logits, bias, token_ids, tid2eid) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must share one device, got {sorted(map(str, devices))}")


def moe_route_torch(logits: torch.Tensor, bias: torch.Tensor | None, token_ids: torch.Tensor,
                    tid2eid: torch.Tensor | None, top_k: int, scoring: str,
                    scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert indices ``[T, top_k]`` int64 and weights ``[T, top_k]`` fp32: MoE.route's math."""
    scores = score_fn(logits, scoring)
    if tid2eid is not None:
        idx = tid2eid[token_ids].long()
    else:
        idx = torch.topk(scores if bias is None else scores + bias.float(), top_k, dim=-1).indices
    w = scores.gather(1, idx)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, w * scaling


@triton.jit
def _scores(x, ok, SCORING: tl.constexpr):
    """Router scores of one row of logits ``x`` (lanes ``ok``; 0 elsewhere)."""
    if SCORING == 0:  # sqrt(softplus), softplus as F.softplus: x above its threshold 20, else log(1 + e^x)
        y = tl.exp(-tl.abs(x))
        u = 1.0 + y  # log1p(y) to full precision (Goldberg's trick): small scores keep their digits
        sp = tl.maximum(x, 0.0) + tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))
        s = tl.sqrt(tl.where(x > 20.0, x, sp))
    elif SCORING == 1:
        s = tl.sigmoid(x)
    else:
        e = tl.exp(x - tl.max(tl.where(ok, x, float("-inf")), axis=0))
        e = tl.where(ok, e, 0.0)
        s = e / tl.sum(e, axis=0)
    return tl.where(ok, s, 0.0)


@triton.jit
def _moe_route_kernel(
    logits_ptr, bias_ptr, tok_ptr, t2e_ptr, idx_ptr, w_ptr,
    E, scaling, stride_lt, stride_le, stride_b, stride_tv, stride_tk, stride_it, stride_wt,
    TOP_K: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, HASH: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per token: the expert row lives in registers, k arg-max passes pick the top-k.
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    kk = tl.arange(0, BLOCK_K)
    e_ok, k_ok = e < E, kk < TOP_K
    x = tl.load(logits_ptr + t * stride_lt + e * stride_le, mask=e_ok, other=0.0)
    s = _scores(x, e_ok, SCORING)
    if HASH:
        tok = tl.load(tok_ptr + t)
        idx = tl.load(t2e_ptr + tok * stride_tv + kk * stride_tk, mask=k_ok, other=0).to(tl.int64)
    else:
        sel = s
        if HAS_BIAS:
            sel = s + tl.load(bias_ptr + e * stride_b, mask=e_ok, other=0.0)
        free = e_ok
        idx = tl.zeros([BLOCK_K], dtype=tl.int64)
        for j in tl.static_range(TOP_K):
            best = tl.max(tl.where(free, sel, float("-inf")), axis=0)
            # The lowest free lane holding the max (a `free` test, so -inf scores are picked too).
            pick = tl.min(tl.where(free & (sel == best), e, BLOCK_E), axis=0)
            idx = tl.where(kk == j, pick.to(tl.int64), idx)
            free = free & (e != pick)
    # Gather the picked scores from the row in registers: [BLOCK_K, BLOCK_E] one-hot select.
    w = tl.sum(tl.where(idx[:, None] == e[None, :], s[None, :], 0.0), axis=1)
    w = tl.where(k_ok, w, 0.0)
    w = w / (tl.sum(w, axis=0) + 1e-20) * scaling
    tl.store(idx_ptr + t * stride_it + kk, idx, mask=k_ok)
    tl.store(w_ptr + t * stride_wt + kk, w, mask=k_ok)


def moe_route_triton(logits: torch.Tensor, bias: torch.Tensor | None, token_ids: torch.Tensor,
                     tid2eid: torch.Tensor | None, top_k: int, scoring: str,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as the twin in one launch (weights to fp32 rounding of the scores)."""
    T, E = logits.shape
    idx = torch.empty(T, top_k, dtype=torch.long, device=logits.device)
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    if T == 0:
        return idx, w
    t2e = tid2eid if tid2eid is not None else idx  # any tensor: the pointer is unused unless HASH
    block_e = max(16, triton.next_power_of_2(E))
    b = bias if bias is not None else logits[0]  # any tensor: the pointer is unused unless HAS_BIAS
    _moe_route_kernel[(T,)](
        logits, b, token_ids, t2e, idx, w,
        E, float(scaling), *logits.stride(), b.stride(0), *t2e.stride(), idx.stride(0), w.stride(0),
        TOP_K=top_k, SCORING=_SCORING_CODE[scoring], HAS_BIAS=bias is not None, HASH=tid2eid is not None,
        BLOCK_E=block_e, BLOCK_K=max(2, triton.next_power_of_2(top_k)), num_warps=4 if block_e <= 512 else 8,
    )
    return idx, w
