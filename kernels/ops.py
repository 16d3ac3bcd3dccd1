"""Every kernel entry point as a torch custom op (namespace ``dsv4``).

A custom op is opaque to ``torch.compile`` (the graph holds one call, whose output shape its fake
implementation gives) and to CUDA-graph capture, and the choice of Triton kernel or torch twin
(``kernels.policy``) happens inside it, at run time. Arguments are checked by the callers in
``kernels/__init__.py`` before the op, so a bad call fails at trace time too.
"""
from __future__ import annotations

import torch

from kernels import indexer as _idx
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


# ---- weight GEMMs on stored forms and routed experts (kernels/gemm.py, kernels/moe.py) ----
from kernels import gemm as _gemm  # noqa: E402
from kernels import moe as _moe  # noqa: E402


@torch.library.custom_op("dsv4::linear", mutates_args=())
def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str,
           out_dtype: torch.dtype | None) -> torch.Tensor:
    impl = _gemm.linear_triton if use_triton(x) else _gemm.linear_torch
    return impl(x, w, scale, fmt, out_dtype)


@linear.register_fake
def _(x, w, scale, fmt, out_dtype):
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
