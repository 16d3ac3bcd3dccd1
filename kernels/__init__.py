"""Fused ops, each a Triton kernel beside a plain-torch twin, behind one dispatch policy
(``kernels.policy``), each kernel a torch custom op (``kernels.ops``, ``torch.ops.dsv4.*``).
"""
from __future__ import annotations

import torch

from kernels import compressor as _comp
from kernels import gemm as _gemm
from kernels import indexer as _idx
from kernels import kv_write as _kvw
from kernels import mhc as _mhc
from kernels import moe as _moe
from kernels import ops as _ops
from kernels import routing as _route
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


# ---- weight GEMMs on stored forms and routed experts ----------------------------------------


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str,
           out_dtype: torch.dtype | None = None, *, act_quant: bool = False) -> torch.Tensor:
    """``x [..., K] @ dequant(w).T -> [..., N]`` in ``out_dtype`` (default x's dtype). ``fmt``:
    ``"dense"`` (``w [N, K]``, ``scale`` None), ``"fp8"`` (e4m3 ``[N, K]`` + e8m0 per 128x128),
    ``"fp4"`` (int8 packed ``[N, K/2]`` + e8m0 per 32 columns). Activations compute in x's dtype;
    the Triton kernel decodes the stored weight in registers and accumulates in fp32.
    ``act_quant``: x is first rounded to FP8 per token per 128 channels (DeepSeek's reference
    numerics for FP8 weights; see ``kernels/gemm.py``)."""
    _gemm.check_linear_args(x, w, scale, fmt)
    if backend_for(x) == "torch":
        return _gemm.linear_torch(x, w, scale, fmt, out_dtype, bool(act_quant))
    y = _ops.linear(x.reshape(-1, x.shape[-1]), w, scale, fmt, out_dtype, bool(act_quant))
    return y.view(*x.shape[:-1], y.shape[-1])


def grouped_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """``x [T, G, K]`` -> ``[T, G, O]``: group ``g`` uses rows ``[g*O, (g+1)*O)`` of ``w`` (``G*O``
    logical rows, stored as for :func:`linear`); in x's dtype."""
    _gemm.check_linear_args(x, w, scale, fmt, groups=x.shape[1] if x.dim() == 3 else 1)
    if backend_for(x) == "torch":
        return _gemm.grouped_linear_torch(x, w, scale, fmt)
    return _ops.grouped_linear(x, w, scale, fmt)


def moe_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, expert_start: int,
                w1: torch.Tensor, s1: torch.Tensor | None, w3: torch.Tensor, s3: torch.Tensor | None,
                w2: torch.Tensor, s2: torch.Tensor | None, fmt: str, limit: float) -> torch.Tensor:
    """Routed SwiGLU experts ``[expert_start, expert_start + E)`` of this rank: ``x [T, D]``,
    ``experts [T, k]`` global ids, ``weights [T, k]`` fp32 -> ``[T, D]`` fp32, the sum over each
    token's assignments of ``weight * expert(x)`` (foreign experts count zero). ``w1``/``w3``
    ``[E, I, D]`` (gate/up) and ``w2 [E, D, I]`` stored as for :func:`linear` with per-expert
    scales ``[E, ...]``; ``limit`` > 0 clamps SwiGLU (see ``kernels/moe.py``)."""
    _moe.check_moe_args(x, experts, weights, expert_start, w1, s1, w3, s3, w2, s2, fmt)
    if backend_for(x) == "torch":
        return _moe.moe_experts_torch(x, experts, weights, expert_start, w1, s1, w3, s3, w2, s2, fmt, float(limit))
    return _ops.moe_experts(x, experts, weights, int(expert_start), w1, s1, w3, s3, w2, s2, fmt, float(limit))


# ---- the compressor's pooling after its GEMMs --------------------------------------------------


def compress_entries(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, state_kv: torch.Tensor,
                     state_score: torch.Tensor, seq: torch.Tensor, window: torch.Tensor, start_pos: torch.Tensor,
                     cu_seqlens: torch.Tensor, state_slots: torch.Tensor, norm_weight: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, *, ratio: int, overlap: bool, eps: float,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """The compressed entries ``[E, d]`` in ``out_dtype`` a step's plan asks for: entry ``i`` pools
    window ``window[i]`` of sequence ``seq[i]`` (``ratio`` slots; with ``overlap`` also series A of
    the window before) from the step's raw GEMM outputs ``kv``/``score [T, coff*d]`` fp32 (score
    without ``ape [ratio, coff*d]``, added here) or, for positions before ``start_pos[s]``, the
    state ring ``state_kv``/``state_score [slots + 1, S, coff*d]`` of slot ``state_slots[s]``
    (step rows from ``cu_seqlens[s]``); then RMSNorm (``norm_weight [d]``, ``eps``) and RoPE with
    ``cos``/``sin [E, rope/2]``. Reads the ring: call before ``store_compressor_state``. Entries
    of incomplete windows are finite filler. See ``kernels/compressor.py``."""
    _comp.check_compress_entries_args(kv, score, ape, state_kv, state_score, seq, window, start_pos, cu_seqlens,
                                      state_slots, norm_weight, cos, sin, ratio, overlap)
    args = (kv, score, ape, state_kv, state_score, seq, window, start_pos, cu_seqlens, state_slots, norm_weight,
            cos, sin, int(ratio), bool(overlap), float(eps), out_dtype)
    if backend_for(kv) == "torch":
        return _comp.compress_entries_torch(*args)
    return _ops.compress_entries(*args)


def store_compressor_state(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor,
                           seq_ids: torch.Tensor, state_slots: torch.Tensor, end_pos: torch.Tensor,
                           state_kv: torch.Tensor, state_score: torch.Tensor, *, ratio: int, overlap: bool) -> None:
    """In place: the step rows (``positions``/``seq_ids [T]``) later steps pool into ring slot
    ``state_slots[s]`` at row ``position % S`` (``kv``; ``score + ape[position % ratio]``): those
    from the window in progress (with ``overlap``, the one before too), counted from the ring's
    slack (``S - coff*ratio`` rows) before ``end_pos[s]``. Others, and NO_SLOT sequences, are
    dropped. Call after ``compress_entries`` has read the ring."""
    _comp.check_store_compressor_state_args(kv, score, ape, positions, seq_ids, state_slots, end_pos, state_kv,
                                            state_score, ratio, overlap)
    args = (kv, score, ape, positions, seq_ids, state_slots, end_pos, state_kv, state_score, int(ratio),
            bool(overlap))
    if backend_for(kv) == "torch":
        _comp.store_compressor_state_torch(*args)
    else:
        _ops.store_compressor_state(*args)


# ---- the Q/KV path: norm + RoPE (+ the cache's rounding), paged record writes ----------------


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None, *,
              eps: float, fmt: int, norm: bool = True) -> torch.Tensor:
    """``x [T, D]`` or ``[T, H, D]`` (float32/bfloat16/float16) -> same shape and dtype: RMSNorm over
    the last dim (``weight [D]`` or None; skipped if not ``norm``), interleaved RoPE on the trailing
    ``2 * cos.shape[-1]`` channels (``cos, sin [T, R/2]``, or None: none), then ``fmt``'s rounding:
    ``PLAIN`` none, ``FP8_ENTRY`` the stored KV vector's round trip, ``FP4_KEY`` the indexer
    query's (Hadamard-rotated, FP4). One launch on the Triton side."""
    _kvw.check_norm_rope_args(x, weight, cos, sin, fmt, norm)
    args = (x, weight, cos, sin, float(eps), int(fmt), bool(norm))
    if backend_for(x) == "torch":
        return _kvw.norm_rope_torch(*args)
    return _ops.norm_rope(*args)


def store_records(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, fmt: int, *,
                  rope_dim: int = 0) -> None:
    """In place, ``pool[slots[t], rows[t]] = encode(values[t])`` (``values [T, D]``): pool
    ``[S, R, nbytes]`` uint8 records (``FP8_ENTRY`` with ``rope_dim`` bf16 dims, ``FP4_KEY``) or
    ``[S, R, D]`` (``PLAIN``). ``slots`` < 0 (NO_SLOT) are dropped: the kernel skips them, the torch
    side writes them into the pool's last slot, its padding row. Rows must lie in ``[0, R)`` and
    the live destinations be distinct. The window ring: slot = ring, row = position % ring rows."""
    _kvw.check_store_records_args(pool, slots, rows, values, fmt, rope_dim)
    args = (pool, slots, rows, values, int(fmt), int(rope_dim))
    if backend_for(values) == "torch":
        return _kvw.store_records_torch(*args)
    return _ops.store_records(*args)


def store_entries(pool: torch.Tensor, tables: torch.Tensor, entries: torch.Tensor, valid: torch.Tensor,
                  values: torch.Tensor, fmt: int, *, rope_dim: int = 0) -> None:
    """In place, entry ``entries[i]`` of the sequence with block table ``tables[i]`` (``[T, nb]``) :=
    ``encode(values[i])``, i.e. ``pool[tables[i, entries[i] // E], entries[i] % E]`` with ``E`` =
    ``pool.shape[1]``, where ``valid[i]``; formats as for :func:`store_records`. Invalid rows (and
    NO_SLOT table columns) are skipped by the kernel, written to the padding row by the torch side."""
    _kvw.check_store_entries_args(pool, tables, entries, valid, values, fmt, rope_dim)
    args = (pool, tables, entries, valid, values, int(fmt), int(rope_dim))
    if backend_for(values) == "torch":
        return _kvw.store_entries_torch(*args)
    return _ops.store_entries(*args)


__all__ = ["BACKEND_ENV", "FP4_KEY", "FP8_ENTRY", "PLAIN", "backend_for", "backend_for_device", "compress_entries",
           "grouped_linear", "hc_head", "hc_post", "hc_pre", "indexer_topk", "linear", "moe_experts", "moe_route",
           "norm_rope", "sink_attention", "sparse_attention", "store_compressor_state", "store_entries",
           "store_records"]
