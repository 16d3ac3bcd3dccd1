"""V4 attention for the three layer types (spec §3.4–§3.7), one path for every chunk.

Every layer: low-rank query (wq_a → q_norm → wq_b, per-head unweighted RMS, partial RoPE),
one shared K=V vector per token (wkv → kv_norm → RoPE), a sliding window of ``W`` tokens,
per-head attention sinks, inverse RoPE on the output, grouped low-rank output projection.
- HCA (ratio 128): + every completed compressed entry of the sequence.
- CSA (ratio 4, overlapping windows): + the lightning indexer's top-k compressed entries.

The flat varlen batch (prefill chunks, decode tokens, verify chunks alike) runs as one path:
the compressors pool every entry the step completes for all sequences at once and write them
(and their indexer keys) into the paged pools; then each query gathers its own keys — the
window (cached ring rows older than its chunk, this step's rows otherwise), plus on CSA layers
the top-k entries the indexer picks by scoring the pooled indexer keys in place, chunk by chunk
over the context, plus on HCA layers every visible entry — and the attention core
(``kernels.sink_attention``: Triton on CUDA, the torch twin elsewhere) runs on query blocks
sized so the gathered keys stay within ``WORKSPACE_ELEMENTS``. Shapes depend only on the
batch's token count, sequence count and longest context (host-side integers): no host sync.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from engine.model.config import ModelConfig
from engine.model.layers import Linear, RMSNorm, apply_rope
from engine.worker.input_batch import CompressPlan, ForwardBatch, QueryTile
from engine.worker.kv_cache import CSA_RATIO, CompressorState, KVCache
from engine.model.step_tables import RopePair, StepTables
import kernels
from kernels import sink_attention
from kernels.indexer import indexer_topk as running_topk

Reduce = Callable[[torch.Tensor], torch.Tensor]
WORKSPACE_ELEMENTS = 1 << 24  # gathered key elements per query block (and indexer chunk)


class Compressor(nn.Module):
    """Pools every ``ratio`` tokens into one entry with a per-channel softmax over slots.

    With ``overlap`` (CSA) the projections are 2*dim wide: series A (first half) feeds the
    *next* window's entry, series B (second half) the current one, so entry ``w`` pools 2*ratio
    slots: A of window w-1 and B of window w (spec §3.6). Tokens of earlier steps come from the
    state ring (position p at row ``p % S``)."""

    def __init__(self, in_dim: int, dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        coff = 2 if overlap else 1
        self.dim, self.ratio, self.overlap, self.eps = dim, ratio, overlap, eps
        self.wkv = Linear(in_dim, coff * dim, torch.float32, compute_dtype=torch.float32)
        self.wgate = Linear(in_dim, coff * dim, torch.float32, compute_dtype=torch.float32)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * dim, dtype=torch.float32), requires_grad=False)
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, state: CompressorState, entry_rope: RopePair,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, CompressPlan]:
        """Entries ``[E, dim]`` for the step's plan at this ratio (rows the plan marks invalid
        are finite filler), after storing the tokens later steps need into ``state``.
        ``entry_rope``: cos/sin at each planned entry's first position (``StepTables.entry_rope``)."""
        m = self.ratio
        plan = batch.plans[m]
        kv = self.wkv(x)
        score = self.wgate(x)  # the kernels add ape at each slot's position
        cos, sin = entry_rope
        entries = kernels.compress_entries(
            kv, score, self.ape, state.kv, state.score, plan.seq, plan.window, batch.start_pos, batch.cu_seqlens,
            batch.state_slots, self.norm.weight, cos, sin, ratio=m, overlap=self.overlap, eps=self.eps,
            out_dtype=out_dtype)
        # Then keep what later steps pool (after the read above: the ring may wrap): the window in
        # progress (and, with overlap, the one before), counted from the ring's slack before the
        # step's end, so a verify chunk rolled back by its rejected tokens still finds its window.
        kernels.store_compressor_state(kv, score, self.ape, batch.positions, batch.seq_ids, batch.state_slots,
                                       batch.end_pos, state.kv, state.score, ratio=m, overlap=self.overlap)
        return entries, plan


class Indexer(nn.Module):
    """Lightning indexer (spec §3.7): scores ``sum_h w_h * ReLU(q_h . k)`` over the compressed
    indexer keys and keeps the top-k entries per query. Its keys come from a small CSA-style
    compressor of its own."""

    def __init__(self, cfg: ModelConfig, n_heads: int, dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = n_heads, cfg.index_head_dim, cfg.index_topk
        self.total_heads = cfg.index_n_heads
        self.wq_b = Linear(cfg.q_lora_rank, n_heads * cfg.index_head_dim, dtype)
        self.weights_proj = Linear(cfg.hidden_size, n_heads, dtype)
        self.compressor = Compressor(cfg.hidden_size, cfg.index_head_dim, CSA_RATIO, True, cfg.rms_norm_eps)

    def queries(self, q_lat: torch.Tensor, x: torch.Tensor, cos, sin, fmt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries (RoPE, then ``fmt``'s rounding: under an FP8 cache the Hadamard
        rotation and FP4 of the stored keys) and their head weights."""
        q = self.wq_b(q_lat).view(q_lat.shape[0], self.n_heads, self.head_dim)
        q = kernels.norm_rope(q, None, cos, sin, eps=0.0, fmt=fmt, norm=False)
        w = self.weights_proj(x).float() * (self.total_heads ** -0.5)
        return q, w

    def select(self, q: torch.Tensor, w: torch.Tensor, visible: torch.Tensor, num_entries: int,
               keys_of: Callable[[int, int], torch.Tensor], n_seqs: int, reduce: Reduce | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Entry ids ``[Q, k]`` each query attends to and which of them are real (``< visible``).

        The ``Q`` queries are ``n_seqs`` equal groups, group ``i`` from sequence ``i``, whose keys
        of entries ``[c0, c1)`` ``keys_of(c0, c1)`` reads as ``[n_seqs, c1 - c0, d]``: each
        sequence's keys are read once per chunk for all its queries. Scores
        ``sum_h w_h * ReLU(q_h . key)`` over entries ``[0, num_entries)``, a chunk at a time into
        ``kernels.indexer``'s running top-k, so memory stays bounded whatever the context. Ties go
        to the lower entry index."""
        Q, H, d = q.shape
        L = Q // n_seqs
        chunk = WORKSPACE_ELEMENTS // (Q * H + n_seqs * d)
        qf = q.float().view(n_seqs, L, H, d)
        # relu(x) * s * w == relu(x) * (s * w) for the positive scale s: one weighted sum over heads.
        wf = (w.float() * d ** -0.5)[:, None, :]

        def scores_of(c0: int, c1: int) -> torch.Tensor:
            scores = torch.einsum("nlhd,ncd->nlhc", qf, keys_of(c0, c1).float()).reshape(Q, H, c1 - c0).relu_()
            scores = torch.bmm(wf, scores).squeeze(1)
            return scores.masked_fill(torch.arange(c0, c1, device=q.device) >= visible[:, None], float("-inf"))

        return running_topk(scores_of, Q, visible, num_entries, self.topk, chunk, reduce)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, tp_size: int = 1):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.ratio = cfg.compress_ratios[layer]
        self.n_heads = cfg.num_heads // tp_size
        self.n_groups = cfg.o_groups // tp_size
        d = cfg.head_dim
        self.wq_a = Linear(cfg.hidden_size, cfg.q_lora_rank, dtype)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * d, dtype)
        self.wkv = Linear(cfg.hidden_size, d, dtype)
        self.kv_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.wo_a = Linear(self.n_heads * d // self.n_groups, self.n_groups * cfg.o_lora_rank, dtype)
        self.wo_b = Linear(self.n_groups * cfg.o_lora_rank, cfg.hidden_size, dtype)
        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads, dtype=torch.float32), requires_grad=False)
        self.compressor = None
        self.indexer = None
        if self.ratio:
            self.compressor = Compressor(cfg.hidden_size, d, self.ratio, self.ratio == CSA_RATIO, cfg.rms_norm_eps)
        if self.ratio == CSA_RATIO:
            self.indexer = Indexer(cfg, cfg.index_n_heads // tp_size, dtype)
        self.softmax_scale = d ** -0.5

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache, tables: StepTables, rope_kind: str,
                reduce: Reduce | None = None) -> torch.Tensor:
        cfg, d = self.cfg, self.cfg.head_dim
        T = x.shape[0]
        eps = cfg.rms_norm_eps
        cos, sin = tables.token_rope[rope_kind]
        q_lat = kernels.norm_rope(self.wq_a(x), self.q_norm.weight, None, None, eps=eps, fmt=kernels.PLAIN)
        # Queries: per-head unweighted RMS, then RoPE. kv: norm, RoPE and, with an FP8 cache, the
        # stored record's rounding (the reference rounds kv before using it, cached or not).
        q = kernels.norm_rope(self.wq_b(q_lat).view(T, self.n_heads, d), None, cos, sin, eps=eps, fmt=kernels.PLAIN)
        kv = kernels.norm_rope(self.wkv(x), self.kv_norm.weight, cos, sin, eps=eps, fmt=cache.kv_format)
        index_q = None
        if self.indexer is not None:
            index_q = self.indexer.queries(q_lat, x, cos, sin, cache.index_format)
        if self.compressor is not None:
            self._store_entries(x, batch, cache, tables)

        if kernels.backend_for(q) == "triton":  # keys read in place, inverse RoPE in the kernel
            out = self._attend_in_place(q, kv, batch, cache, tables, index_q, reduce, cos, sin)
        else:
            out = apply_rope(self._attend_gathered(q, kv, batch, cache, tables, index_q, reduce), cos, sin,
                             inverse=True)
        # Stored after every read: the ring may wrap.
        cache.store_window(self.layer, tables.window_slots, tables.window_rows, kv)
        # Grouped output projection: group g = heads [g*hpg, (g+1)*hpg) → o_lora_rank each.
        z = kernels.grouped_linear(out.view(T, self.n_groups, -1), *self.wo_a.stored()).reshape(T, -1)
        y = self.wo_b(z)
        return reduce(y) if reduce is not None else y

    def _attend_gathered(self, q, kv, batch: ForwardBatch, cache: KVCache, tables: StepTables, index_q,
                         reduce) -> torch.Tensor:
        """The torch path: keys gathered per query block, then ``kernels.sink_attention``."""
        outs = []
        for tile in batch.query_tiles(self._query_block(batch)):
            rows = tile.rows
            keys, mask = self._window_keys(rows, kv, batch, cache)
            if self.compressor is not None:
                ckeys, cmask = self._compressed_keys(tile, batch, cache, tables, index_q, reduce)
                keys = torch.cat([keys, ckeys.to(keys.dtype)], dim=1)
                mask = torch.cat([mask, cmask], dim=1)
            outs.append(sink_attention(q[rows], keys, mask, self.attn_sink, self.softmax_scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _attend_in_place(self, q, kv, batch: ForwardBatch, cache: KVCache, tables: StepTables, index_q, reduce,
                         cos, sin) -> torch.Tensor:
        """The kernel path: the indexer and the attention read the pools in place (same result
        as ``_attend_gathered`` + inverse RoPE)."""
        m, fp8 = self.ratio, cache.entry_codec is not None
        comp = {}
        if m == CSA_RATIO:
            ids, valid = kernels.indexer_topk(
                index_q[0], index_q[1], batch.seq_ids, tables.visible[m], batch.c4_tables,
                cache.c4_idx[self.layer], fp4=fp8, num_entries=batch.max_entries(m), topk=self.indexer.topk,
                workspace_elements=WORKSPACE_ELEMENTS, reduce=reduce)
            comp = dict(comp_pool=cache.c4_kv[self.layer], tables=batch.c4_tables, comp_ids=ids, comp_valid=valid)
        elif m:
            comp = dict(comp_pool=cache.c128_kv[self.layer], tables=batch.c128_tables, ratio=m,
                        num_entries=batch.max_entries(m))
        return kernels.sparse_attention(q, kv, batch.seq_ids, batch.positions, batch.start_pos, batch.window_slots,
                                        cache.window[self.layer], self.attn_sink, self.softmax_scale, cos, sin,
                                        fp8=fp8, window=self.cfg.sliding_window, **comp)

    def _store_entries(self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache, step: StepTables) -> None:
        """Pool the entries this step completes and write them (and their indexer keys) into
        the pools first: later queries of the same step see them."""
        rope = step.entry_rope[self.ratio]
        entries, plan = self.compressor(x, batch, cache.state[(self.layer, "main")], rope, x.dtype)
        tables = step.entry_tables[self.ratio]
        pool = cache.c4_kv[self.layer] if self.ratio == CSA_RATIO else cache.c128_kv[self.layer]
        cache.store_entries(pool, tables, plan.window, plan.valid, entries)
        if self.indexer is not None:
            keys, _ = self.indexer.compressor(x, batch, cache.state[(self.layer, "index")], rope, x.dtype)
            cache.store_entries(cache.c4_idx[self.layer], tables, plan.window, plan.valid, keys)

    def _query_block(self, batch: ForwardBatch) -> int:
        keys = self.cfg.sliding_window
        if self.ratio == CSA_RATIO:
            keys += min(self.cfg.index_topk, batch.max_entries(self.ratio))
        elif self.ratio:
            keys += batch.max_entries(self.ratio)
        return max(1, WORKSPACE_ELEMENTS // (keys * self.cfg.head_dim))

    def _window_keys(self, rows: slice, kv: torch.Tensor, batch: ForwardBatch, cache: KVCache):
        """Keys ``[Q, W, D]`` at positions ``p, p-1, …, p-W+1`` of each query and their mask:
        this step's rows from ``kv``, older ones from the ring."""
        W = self.cfg.sliding_window
        seq, pos = batch.seq_ids[rows], batch.positions[rows]
        back = torch.arange(W, device=kv.device)
        kpos = pos[:, None] - back
        in_step = (kpos >= batch.start_pos[seq][:, None])[..., None]
        step = kv[(torch.arange(rows.start, rows.stop, device=kv.device)[:, None] - back).clamp(min=0)]
        ring = cache.gather_window(self.layer, batch.window_slots[seq], kpos)
        return torch.where(in_step, step, ring.to(kv.dtype)), kpos >= 0

    def _compressed_keys(self, tile: QueryTile, batch: ForwardBatch, cache: KVCache, step: StepTables, index_q,
                         reduce):
        """Compressed keys ``[Q, K, D]`` and mask: the indexer's top-k entries on CSA layers,
        every entry on HCA layers (masked to those completed at the query's position)."""
        m, rows = self.ratio, tile.rows
        seq = batch.seq_ids[rows]
        tables = batch.tables(m)[seq]
        visible = step.visible[m][rows]
        n = batch.max_entries(m)
        if self.indexer is None:
            ids = torch.arange(n, device=seq.device).expand(seq.shape[0], -1)
            valid = ids < visible[:, None]
            pool = cache.c128_kv[self.layer]
        else:
            idx_pool, seq_tables = cache.c4_idx[self.layer], batch.c4_tables[tile.seqs]

            def keys_of(c0: int, c1: int) -> torch.Tensor:  # [n_seqs, c1 - c0, d]: once per sequence
                entries = torch.arange(c0, c1, device=seq.device).expand(tile.n_seqs, -1)
                return cache.gather_entries(idx_pool, seq_tables, entries)

            ids, valid = self.indexer.select(index_q[0][rows], index_q[1][rows], visible, n, keys_of,
                                             tile.n_seqs, reduce)
            pool = cache.c4_kv[self.layer]
        return cache.gather_entries(pool, tables, ids), valid
