"""Fused ops, each a Triton kernel beside a plain-torch twin, behind one dispatch policy
(``kernels.policy``), each kernel a torch custom op (``kernels.ops``, ``torch.ops.dsv4.*``).
"""
from __future__ import annotations

import torch

from kernels import indexer as _idx
from kernels import ops as _ops
from kernels import sink_attention as _sink
from kernels import sparse_attention as _sparse
from kernels.kv_records import FP4_KEY, FP8_ENTRY, PLAIN
from kernels.policy import BACKEND_ENV, backend_for, backend_for_device


def sink_attention(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Decode attention with per-head sinks, V = K: ``q [B, H, D]``, ``keys [B, K, D]``,
    ``mask [B, K]`` bool, ``sinks [H]`` → ``[B, H, D]`` in keys' dtype."""
    _sink.check_sink_attention_args(q, keys, mask, sinks)
    if backend_for(q) == "torch":  # plain torch: differentiable (train-demo) and fusable by Inductor
        return _sink.sink_attention_torch(q, keys, mask, sinks, float(scale))
    return _ops.sink_attention(q, keys, mask, sinks, float(scale))


def indexer_topk(q: torch.Tensor, w: torch.Tensor, seq: torch.Tensor, visible: torch.Tensor, tables: torch.Tensor,
                 pool: torch.Tensor, *, fp4: bool, num_entries: int, topk: int, workspace_elements: int,
                 reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning-indexer top-k of queries ``q [Q, H, dim]`` (head weights ``w [Q, H]``, sequence
    ``seq [Q]``, ``visible [Q]`` completed entries) over entries ``[0, num_entries)`` of the paged
    key ``pool`` (block tables ``tables [B, blocks]``; ``fp4``: packed FP4 records of rotated keys):
    entry ids ``[Q, min(topk, num_entries)]`` and which are real. The scores of one chunk of the
    context stay within ``workspace_elements`` (see ``kernels/indexer.py``)."""
    fmt = FP4_KEY if fp4 else PLAIN
    _idx.check_indexer_args(q, w, seq, visible, tables, pool, fmt, topk)
    Q, H, D = q.shape
    merge = None
    if backend_for(q) == "triton":  # per chunk: the scores and one fused merge (final order kept)
        chunk = workspace_elements // max(1, Q)
        merge = _ops.indexer_merge
    else:  # the twin gathers [Q, chunk, dim] keys and forms [Q, H, chunk] scores
        chunk = workspace_elements // max(1, Q * (H + D))
    return _idx.indexer_topk(lambda c0, c1: _ops.indexer_scores(q, w, seq, visible, tables, pool, fmt, c0, c1), Q,
                             visible, num_entries, topk, chunk, reduce, merge)


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, seq: torch.Tensor, positions: torch.Tensor,
                     start_pos: torch.Tensor, window_slots: torch.Tensor, window_pool: torch.Tensor,
                     sinks: torch.Tensor, scale: float, cos: torch.Tensor, sin: torch.Tensor, *, fp8: bool = False,
                     comp_pool: torch.Tensor | None = None, tables: torch.Tensor | None = None,
                     comp_ids: torch.Tensor | None = None, comp_valid: torch.Tensor | None = None, ratio: int = 0,
                     num_entries: int | None = None, window: int | None = None) -> torch.Tensor:
    """Sink attention of a flat varlen batch over the window ring and the compressed pools, read in
    place (``fp8``: packed FP8 entry records), inverse RoPE applied: ``[T, H, D]`` in q's dtype.
    ``window``: keys per query from the window (default: the ring's rows; smaller when the ring
    has speculative slack). See ``kernels/sparse_attention.py`` for the argument contract."""
    fmt = FP8_ENTRY if fp8 else PLAIN
    _sparse.check_sparse_attention_args(q, kv, seq, positions, start_pos, window_slots, window_pool, sinks, cos,
                                        sin, fmt, comp_pool, tables, comp_ids, comp_valid, ratio)
    return _ops.sparse_attention(q, kv, seq, positions, start_pos, window_slots, window_pool, sinks, float(scale),
                                 cos, sin, fmt, comp_pool, tables, comp_ids, comp_valid, int(ratio), num_entries,
                                 window_pool.shape[1] if window is None else int(window))


__all__ = ["BACKEND_ENV", "backend_for", "backend_for_device", "indexer_topk", "sink_attention", "sparse_attention"]


# --- mHC (kernels/mhc.py) --------------------------------------------------------------------
from kernels import mhc as _mhc  # noqa: E402  (section appended; imports kept with it)


def hc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
           norm_weight: torch.Tensor, *, iters: int, hc_eps: float,
           norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC before a sublayer, its RMSNorm fused in: streams ``[T, hc, D]``, fn ``[(2+hc)*hc, hc*D]``,
    base ``[(2+hc)*hc]``, scale ``[3]``, norm_weight ``[D]`` → (x ``[T, D]`` in streams' dtype =
    rms_norm(collapsed, norm_weight), post ``[T, hc]`` f32, comb ``[T, hc, hc]`` f32, doubly
    stochastic after ``iters`` Sinkhorn rounds). ``HyperConnection.pre`` then the sublayer norm."""
    _mhc.check_hc_mix_args(streams, fn, base, scale, norm_weight, head=False, iters=iters)
    args = (streams, fn, base, scale, norm_weight, int(iters), float(hc_eps), float(norm_eps))
    if backend_for(streams) == "torch":
        return _mhc.hc_pre_torch(*args)
    return _ops.hc_pre(*args)


def hc_post(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC after a sublayer: ``X'_k = post_k * out + sum_j comb[j, k] X_j`` (the sum over comb's
    FIRST index); out ``[T, D]``, streams ``[T, hc, D]``, post ``[T, hc]``, comb ``[T, hc, hc]`` →
    ``[T, hc, D]`` in streams' dtype. ``HyperConnection.post``."""
    _mhc.check_hc_post_args(out, streams, post, comb)
    if backend_for(streams) == "torch":
        return _mhc.hc_post_torch(out, streams, post, comb)
    return _ops.hc_post(out, streams, post, comb)


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            norm_weight: torch.Tensor, *, hc_eps: float, norm_eps: float) -> torch.Tensor:
    """The final collapse and RMSNorm: fn ``[hc, hc*D]``, base ``[hc]``, scale ``[1]``, norm_weight
    ``[D]`` → ``[T, D]`` in streams' dtype. ``HyperHead`` then the model's final norm."""
    _mhc.check_hc_mix_args(streams, fn, base, scale, norm_weight, head=True)
    args = (streams, fn, base, scale, norm_weight, float(hc_eps), float(norm_eps))
    if backend_for(streams) == "torch":
        return _mhc.hc_head_torch(*args)
    return _ops.hc_head(*args)


__all__ += ["hc_head", "hc_post", "hc_pre"]


__all__ = ["BACKEND_ENV", "backend_for", "indexer_topk", "sink_attention", "sparse_attention"]


# --- MoE routing (kernels/routing.py) ---
from kernels import routing as _route  # noqa: E402


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, token_ids: torch.Tensor,
              tid2eid: torch.Tensor | None, *, top_k: int, scoring: str,
              scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE routing after the gate GEMM: ``logits [T, E]`` fp32 → expert indices ``[T, top_k]``
    int64 and weights ``[T, top_k]`` fp32. ``scoring``: ``"sqrtsoftplus" | "sigmoid" | "softmax"``;
    hash layers (``tid2eid [V, top_k]``) take ``tid2eid[token_ids]``, others the top-k of
    ``scores + bias`` (descending); weights are the picked scores over their sum (+1e-20), times
    ``scaling``."""
    _route.check_moe_route_args(logits, bias, token_ids, tid2eid, top_k, scoring)
    if backend_for(logits) == "torch":
        return _route.moe_route_torch(logits, bias, token_ids, tid2eid, top_k, scoring, float(scaling))
    return _ops.moe_route(logits, bias, token_ids, tid2eid, top_k, scoring, float(scaling))


__all__ += ["moe_route"]
