"""Every kernel entry point as a torch custom op (namespace ``dsv4``).

A custom op is opaque to ``torch.compile`` (the graph holds one call, whose output shape its fake
implementation gives) and to CUDA-graph capture, and the choice of Triton kernel or torch twin
(``kernels.policy``) happens inside it, at run time. Arguments are checked by the callers in
``kernels/__init__.py`` before the op, so a bad call fails at trace time too.
"""
from __future__ import annotations

import torch

from kernels import compressor as _comp
from kernels import gemm as _gemm
from kernels import indexer as _idx
from kernels import kv_write as _kvw
from kernels import mhc as _mhc
from kernels import moe as _moe
from kernels import routing as _route
from kernels import sink_attention as _sink
from kernels import sparse_attention as _sparse
from kernels.policy import use_triton


@torch.library.custom_op("dsv4::sink_attention", mutates_args=())
def sink_attention(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> torch.Tensor:
    impl = _sink.sink_attention_triton if use_triton(q) else _sink.sink_attention_torch
    return impl(q, keys, mask, sinks, scale)


@sink_attention.register_fake
def _(q, keys, mask, sinks, scale):
    return q.new_empty(q.shape, dtype=keys.dtype)


@torch.library.custom_op("dsv4::indexer_scores", mutates_args=())
def indexer_scores(q: torch.Tensor, w: torch.Tensor, seq: torch.Tensor, visible: torch.Tensor,
                   tables: torch.Tensor, pool: torch.Tensor, fmt: int, c0: int, c1: int) -> torch.Tensor:
    impl = _idx.indexer_scores_triton if use_triton(q) else _idx.indexer_scores_torch
    return impl(q, w, seq, visible, tables, pool, fmt, c0, c1)


@indexer_scores.register_fake
def _(q, w, seq, visible, tables, pool, fmt, c0, c1):
    return q.new_empty(q.shape[0], c1 - c0, dtype=torch.float32)


@torch.library.custom_op("dsv4::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, kv: torch.Tensor, seq: torch.Tensor, positions: torch.Tensor,
                     start_pos: torch.Tensor, window_slots: torch.Tensor, window_pool: torch.Tensor,
                     sinks: torch.Tensor, scale: float, cos: torch.Tensor, sin: torch.Tensor, fmt: int,
                     comp_pool: torch.Tensor | None, tables: torch.Tensor | None, comp_ids: torch.Tensor | None,
                     comp_valid: torch.Tensor | None, ratio: int, num_entries: int | None,
                     window: int) -> torch.Tensor:
    impl = _sparse.sparse_attention_triton if use_triton(q) else _sparse.sparse_attention_torch
    return impl(q, kv, seq, positions, start_pos, window_slots, window_pool, sinks, scale, cos, sin, fmt,
                comp_pool, tables, comp_ids, comp_valid, ratio, num_entries, window)


@sparse_attention.register_fake
def _(q, kv, seq, positions, start_pos, window_slots, window_pool, sinks, scale, cos, sin, fmt,
      comp_pool, tables, comp_ids, comp_valid, ratio, num_entries, window):
    return torch.empty_like(q)


@torch.library.custom_op("dsv4::hc_pre", mutates_args=())
def hc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
           norm_weight: torch.Tensor, iters: int, hc_eps: float,
           norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _mhc.hc_pre_triton if use_triton(streams) else _mhc.hc_pre_torch
    return impl(streams, fn, base, scale, norm_weight, iters, hc_eps, norm_eps)


@hc_pre.register_fake
def _(streams, fn, base, scale, norm_weight, iters, hc_eps, norm_eps):
    T, hc, D = streams.shape
    return (streams.new_empty(T, D), streams.new_empty(T, hc, dtype=torch.float32),
            streams.new_empty(T, hc, hc, dtype=torch.float32))


@torch.library.custom_op("dsv4::hc_head", mutates_args=())
def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            norm_weight: torch.Tensor, hc_eps: float, norm_eps: float) -> torch.Tensor:
    impl = _mhc.hc_head_triton if use_triton(streams) else _mhc.hc_head_torch
    return impl(streams, fn, base, scale, norm_weight, hc_eps, norm_eps)


@hc_head.register_fake
def _(streams, fn, base, scale, norm_weight, hc_eps, norm_eps):
    return streams.new_empty(streams.shape[0], streams.shape[2])


@torch.library.custom_op("dsv4::hc_post", mutates_args=())
def hc_post(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    impl = _mhc.hc_post_triton if use_triton(streams) else _mhc.hc_post_torch
    return impl(out, streams, post, comb)


@hc_post.register_fake
def _(out, streams, post, comb):
    return torch.empty_like(streams, memory_format=torch.contiguous_format)


@torch.library.custom_op("dsv4::moe_route", mutates_args=())
def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, token_ids: torch.Tensor, tid2eid: torch.Tensor | None,
              top_k: int, scoring: str, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _route.moe_route_triton if use_triton(logits) else _route.moe_route_torch
    return impl(logits, bias, token_ids, tid2eid, top_k, scoring, scaling)


@moe_route.register_fake
def _(logits, bias, token_ids, tid2eid, top_k, scoring, scaling):
    T = logits.shape[0]
    return logits.new_empty(T, top_k, dtype=torch.long), logits.new_empty(T, top_k, dtype=torch.float32)


@torch.library.custom_op("dsv4::indexer_merge", mutates_args=())
def indexer_merge(best_scores: torch.Tensor | None, best_ids: torch.Tensor | None, scores: torch.Tensor,
                  visible: torch.Tensor, c0: int, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _idx.indexer_merge_triton if use_triton(scores) else _idx.indexer_merge_torch
    return impl(best_scores, best_ids, scores, visible, c0, topk)


@indexer_merge.register_fake
def _(best_scores, best_ids, scores, visible, c0, topk):
    Q = scores.shape[0]
    return (scores.new_empty(Q, topk, dtype=torch.float32), scores.new_empty(Q, topk, dtype=torch.long),
            scores.new_empty(Q, topk, dtype=torch.bool))


@torch.library.custom_op("dsv4::linear", mutates_args=())
def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str,
           out_dtype: torch.dtype | None, act_quant: bool) -> torch.Tensor:
    impl = _gemm.linear_triton if use_triton(x) else _gemm.linear_torch
    return impl(x, w, scale, fmt, out_dtype, act_quant)


@linear.register_fake
def _(x, w, scale, fmt, out_dtype, act_quant):
    return x.new_empty(x.shape[0], w.shape[0], dtype=out_dtype or x.dtype)


@torch.library.custom_op("dsv4::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    impl = _gemm.grouped_linear_triton if use_triton(x) else _gemm.grouped_linear_torch
    return impl(x, w, scale, fmt).contiguous()  # einsum may return permuted strides; the fake is contiguous


@grouped_linear.register_fake
def _(x, w, scale, fmt):
    return x.new_empty(x.shape[0], x.shape[1], w.shape[0] // x.shape[1])


@torch.library.custom_op("dsv4::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, expert_start: int,
                w1: torch.Tensor, s1: torch.Tensor | None, w3: torch.Tensor, s3: torch.Tensor | None,
                w2: torch.Tensor, s2: torch.Tensor | None, fmt: str, limit: float) -> torch.Tensor:
    impl = _moe.moe_experts_triton if use_triton(x) else _moe.moe_experts_torch
    return impl(x, experts, weights, expert_start, w1, s1, w3, s3, w2, s2, fmt, limit)


@moe_experts.register_fake
def _(x, experts, weights, expert_start, w1, s1, w3, s3, w2, s2, fmt, limit):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("dsv4::compress_entries", mutates_args=())
def compress_entries(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, state_kv: torch.Tensor,
                     state_score: torch.Tensor, seq: torch.Tensor, window: torch.Tensor, start_pos: torch.Tensor,
                     cu_seqlens: torch.Tensor, state_slots: torch.Tensor, norm_weight: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, ratio: int, overlap: bool, eps: float,
                     out_dtype: torch.dtype) -> torch.Tensor:
    impl = _comp.compress_entries_triton if use_triton(kv) else _comp.compress_entries_torch
    return impl(kv, score, ape, state_kv, state_score, seq, window, start_pos, cu_seqlens, state_slots,
                norm_weight, cos, sin, ratio, overlap, eps, out_dtype)


@compress_entries.register_fake
def _(kv, score, ape, state_kv, state_score, seq, window, start_pos, cu_seqlens, state_slots, norm_weight,
      cos, sin, ratio, overlap, eps, out_dtype):
    return kv.new_empty(seq.shape[0], norm_weight.shape[0], dtype=out_dtype)


@torch.library.custom_op("dsv4::store_compressor_state", mutates_args=("state_kv", "state_score"))
def store_compressor_state(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor,
                           seq_ids: torch.Tensor, state_slots: torch.Tensor, end_pos: torch.Tensor,
                           state_kv: torch.Tensor, state_score: torch.Tensor, ratio: int, overlap: bool) -> None:
    impl = _comp.store_compressor_state_triton if use_triton(kv) else _comp.store_compressor_state_torch
    impl(kv, score, ape, positions, seq_ids, state_slots, end_pos, state_kv, state_score, ratio, overlap)


@store_compressor_state.register_fake
def _(kv, score, ape, positions, seq_ids, state_slots, end_pos, state_kv, state_score, ratio, overlap):
    return None


@torch.library.custom_op("dsv4::norm_rope", mutates_args=())
def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
              eps: float, fmt: int, norm: bool) -> torch.Tensor:
    impl = _kvw.norm_rope_triton if use_triton(x) else _kvw.norm_rope_torch
    return impl(x, weight, cos, sin, eps, fmt, norm).contiguous()  # the twin keeps a strided x's strides


@norm_rope.register_fake
def _(x, weight, cos, sin, eps, fmt, norm):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("dsv4::store_records", mutates_args=("pool",))
def store_records(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, fmt: int,
                  rope_dim: int) -> None:
    impl = _kvw.store_records_triton if use_triton(values) else _kvw.store_records_torch
    impl(pool, slots, rows, values, fmt, rope_dim)


@store_records.register_fake
def _(pool, slots, rows, values, fmt, rope_dim):
    return None


@torch.library.custom_op("dsv4::store_entries", mutates_args=("pool",))
def store_entries(pool: torch.Tensor, tables: torch.Tensor, entries: torch.Tensor, valid: torch.Tensor,
                  values: torch.Tensor, fmt: int, rope_dim: int) -> None:
    impl = _kvw.store_entries_triton if use_triton(values) else _kvw.store_entries_torch
    impl(pool, tables, entries, valid, values, fmt, rope_dim)


@store_entries.register_fake
def _(pool, tables, entries, valid, values, fmt, rope_dim):
    return None
