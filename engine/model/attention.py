"""V4 attention for the three layer types (spec §3.4–§3.7).

Every layer: low-rank query (wq_a → q_norm → wq_b, per-head unweighted RMS, partial RoPE),
one shared K=V vector per token (wkv → kv_norm → RoPE), a sliding window of ``W`` tokens,
per-head attention sinks, inverse RoPE on the output, grouped low-rank output projection.
- HCA (ratio 128): + every completed compressed entry of the sequence.
- CSA (ratio 4, overlapping windows): + the lightning indexer's top-k compressed entries.

Projections run on the flat batch; the compressor, cache reads/writes and the attention core
run per sequence in plain torch for prefill chunks; decode tokens of all sequences are served
together (padded gathers) and their attention core goes through `kernels.sink_attention`
(Triton on CUDA, the torch twin elsewhere).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from engine.worker.input_batch import ForwardBatch, SeqView
from engine.model.config import ModelConfig
from engine.worker.kv_cache import CSA_RATIO, CompressorState, KVCache
from engine.model.layers import Linear, RMSNorm, Rotary, apply_rope, rms_norm
from kernels import sink_attention

Reduce = Callable[[torch.Tensor], torch.Tensor]


class Compressor(nn.Module):
    """Pools every ``ratio`` tokens into one entry with a per-channel softmax over slots.

    With ``overlap`` (CSA) the projections are 2*dim wide: series A (first half) feeds the
    *next* window's entry, series B (second half) the current one, so entry ``w`` pools 2*ratio
    slots: A of window w-1 and B of window w (spec §3.6)."""

    def __init__(self, in_dim: int, dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        coff = 2 if overlap else 1
        self.dim, self.ratio, self.overlap, self.eps = dim, ratio, overlap, eps
        self.wkv = Linear(in_dim, coff * dim, torch.float32, compute_dtype=torch.float32)
        self.wgate = Linear(in_dim, coff * dim, torch.float32, compute_dtype=torch.float32)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * dim, dtype=torch.float32), requires_grad=False)
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, seq: SeqView, state: CompressorState, rotary: Rotary,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """Feed this step's tokens of one sequence; returns (new entries [n, dim], first entry index).

        ``state`` rows of ``seq.state_slot`` carry the incomplete window (and for CSA the previous
        window's A-half) across steps; they are only read when positions say they are valid."""
        m, d, slot = self.ratio, self.dim, seq.state_slot
        start, n = seq.start_pos, seq.num_tokens
        pos = torch.arange(start, start + n, device=x.device)
        kv = self.wkv(x)
        score = self.wgate(x) + self.ape[pos % m]
        cur = m if self.overlap else 0  # first row of the current-window part of the state
        r0 = start % m
        if r0:
            kv = torch.cat([state.kv[slot, cur:cur + r0], kv])
            score = torch.cat([state.score[slot, cur:cur + r0], score])
        n_win = (r0 + n) // m
        first = (start - r0) // m  # index of the first window completed now
        rem = (r0 + n) - n_win * m
        entries = kv.new_zeros(0, d)
        if n_win:
            win_kv = kv[: n_win * m].view(n_win, m, -1)
            win_sc = score[: n_win * m].view(n_win, m, -1)
            if self.overlap:
                if first > 0:
                    prev_kv, prev_sc = state.kv[slot, :m, :d], state.score[slot, :m, :d]
                else:  # the first window has no predecessor: its A slots get zero weight
                    prev_kv = kv.new_zeros(m, d)
                    prev_sc = kv.new_full((m, d), float("-inf"))
                a_kv = torch.cat([prev_kv[None], win_kv[:-1, :, :d]])
                a_sc = torch.cat([prev_sc[None], win_sc[:-1, :, :d]])
                slots_kv = torch.cat([a_kv, win_kv[:, :, d:]], dim=1)
                slots_sc = torch.cat([a_sc, win_sc[:, :, d:]], dim=1)
                # Keep the last complete window's A-half for the next step.
                state.kv[slot, :m, :d] = win_kv[-1, :, :d]
                state.score[slot, :m, :d] = win_sc[-1, :, :d]
            else:
                slots_kv, slots_sc = win_kv, win_sc
            pooled = (slots_kv * torch.softmax(slots_sc, dim=1)).sum(dim=1)
            entries = self.norm(pooled.to(out_dtype))
            wpos = (torch.arange(first, first + n_win, device=x.device) * m)
            cos, sin = rotary.cos_sin(wpos, entries.dtype)
            entries = apply_rope(entries, cos, sin)
        if rem:
            state.kv[slot, cur:cur + rem] = kv[n_win * m:]
            state.score[slot, cur:cur + rem] = score[n_win * m:]
        return entries, first


    def decode_batch(self, x: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, state: CompressorState,
                     rotary: Rotary, out_dtype: torch.dtype):
        """One new token for each of B sequences (same math as ``forward``, batched).

        Returns (entries [C, dim], which of the B sequences completed a window [C], entry index [C])."""
        m, d = self.ratio, self.dim
        kv = self.wkv(x)
        score = self.wgate(x) + self.ape[pos % m]
        cur = m if self.overlap else 0
        state.kv[slots, cur + pos % m] = kv
        state.score[slots, cur + pos % m] = score
        done = ((pos + 1) % m == 0).nonzero().squeeze(1)
        w = pos[done] // m
        if done.numel() == 0:
            return kv.new_zeros(0, d).to(out_dtype), done, w
        s = slots[done]
        win_kv, win_sc = state.kv[s, cur:cur + m], state.score[s, cur:cur + m]
        if self.overlap:
            has_prev = (w > 0)[:, None, None]  # the first window has no predecessor (zero weight)
            prev_kv = torch.where(has_prev, state.kv[s, :m, :d], 0.0)
            prev_sc = torch.where(has_prev, state.score[s, :m, :d], float("-inf"))
            slots_kv = torch.cat([prev_kv, win_kv[:, :, d:]], dim=1)
            slots_sc = torch.cat([prev_sc, win_sc[:, :, d:]], dim=1)
            state.kv[s, :m, :d] = win_kv[:, :, :d]
            state.score[s, :m, :d] = win_sc[:, :, :d]
        else:
            slots_kv, slots_sc = win_kv, win_sc
        pooled = (slots_kv * torch.softmax(slots_sc, dim=1)).sum(dim=1)
        entries = self.norm(pooled.to(out_dtype))
        cos, sin = rotary.cos_sin(w * m, entries.dtype)
        return apply_rope(entries, cos, sin), done, w


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

    def queries(self, q_lat: torch.Tensor, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.wq_b(q_lat).view(q_lat.shape[0], self.n_heads, self.head_dim)
        q = apply_rope(q, cos, sin)
        w = self.weights_proj(x).float() * (self.total_heads ** -0.5)
        return q, w

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
               reduce: Reduce | None) -> torch.Tensor:
        """Boolean ``[n, n_entries]``: which compressed entries each query attends to."""
        n_entries = keys.shape[0]
        visible = torch.arange(n_entries, device=q.device)[None, :] < ((positions + 1) // CSA_RATIO)[:, None]
        if n_entries <= self.topk:
            return visible  # top-k keeps every visible entry: no scoring needed
        scores = torch.einsum("nhd,ed->nhe", q.float(), keys.float()).relu_() * (self.head_dim ** -0.5)
        scores = (scores * w[:, :, None]).sum(dim=1)
        if reduce is not None:  # indexer heads are split across tensor-parallel ranks
            scores = reduce(scores)
        scores = scores.masked_fill(~visible, float("-inf"))
        top = scores.topk(self.topk, dim=-1).indices
        chosen = torch.zeros_like(visible)
        chosen.scatter_(1, top, True)
        return chosen & visible


    def select_batch(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                     reduce: Reduce | None) -> torch.Tensor:
        """Decode queries ``q [B, heads, d]`` against each sequence's padded keys ``[B, E, d]``."""
        if int(valid.sum(dim=1).max()) <= self.topk:
            return valid
        scores = torch.einsum("bhd,bed->bhe", q.float(), keys.float()).relu_() * (self.head_dim ** -0.5)
        scores = (scores * w[:, :, None]).sum(dim=1)
        if reduce is not None:
            scores = reduce(scores)
        scores = scores.masked_fill(~valid, float("-inf"))
        top = scores.topk(min(self.topk, scores.shape[1]), dim=-1).indices
        chosen = torch.zeros_like(valid)
        chosen.scatter_(1, top, True)
        return chosen & valid


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

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache, rotary: Rotary,
                reduce: Reduce | None = None) -> torch.Tensor:
        cfg, d = self.cfg, self.cfg.head_dim
        T = x.shape[0]
        cos, sin = rotary.cos_sin(batch.positions, x.dtype)
        q_lat = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_lat).view(T, self.n_heads, d)
        q = rms_norm(q, None, cfg.rms_norm_eps)
        q = apply_rope(q, cos, sin)
        # With an FP8 KV cache the reference rounds kv before using it, cached or not.
        kv = cache.round_kv(apply_rope(self.kv_norm(self.wkv(x)), cos, sin))
        if self.indexer is not None:
            iq, iw = self.indexer.queries(q_lat, x, cos, sin)
            iq = cache.round_index_query(iq)

        out = torch.empty(T, self.n_heads, d, dtype=x.dtype, device=x.device)
        if batch.decode is not None:
            dec = batch.decode
            index_q = (iq[dec.rows], iw[dec.rows]) if self.indexer is not None else None
            out[dec.rows] = self._decode(q[dec.rows], kv[dec.rows], x[dec.rows], dec, cache, rotary, index_q, reduce)
        for seq in batch.loop_seqs:
            rows = seq.rows
            keys, mask = self._window(kv[rows], seq, cache, batch.positions[rows])
            if self.compressor is not None:
                ckeys, cmask = self._compressed(x[rows], seq, cache, rotary, batch.positions[rows],
                                                (iq[rows], iw[rows]) if self.indexer is not None else None, reduce)
                keys = torch.cat([keys, ckeys])
                mask = torch.cat([mask, cmask], dim=1)
            out[rows] = self._attend(q[rows], keys, mask)
        out = apply_rope(out, cos, sin, inverse=True)
        # Grouped output projection: group g = heads [g*hpg, (g+1)*hpg) → o_lora_rank each.
        grouped = out.view(T, self.n_groups, -1)
        w = self.wo_a.weight.view(self.n_groups, cfg.o_lora_rank, -1).to(x.dtype)
        z = torch.einsum("tgi,goi->tgo", grouped, w).reshape(T, -1)
        y = self.wo_b(z)
        return reduce(y) if reduce is not None else y

    def _decode(self, q, kv, x, dec, cache: KVCache, rotary: Rotary, index_q, reduce) -> torch.Tensor:
        """Attention for B sequences feeding one token each, with padded batched gathers."""
        W, pos = self.cfg.sliding_window, dec.positions
        cache.write_window_batch(self.layer, dec.window_slots, pos, kv)
        keys = cache.read_rings(self.layer, dec.window_slots)
        # Ring slot j holds position p - ((p - j) mod W): written iff that is >= 0.
        mask = (torch.arange(W, device=x.device)[None, :] <= pos[:, None]) | (pos[:, None] >= W - 1)
        if self.compressor is not None:
            m = self.ratio
            entries, done, w = self.compressor.decode_batch(x, pos, dec.state_slots,
                                                            cache.state[(self.layer, "main")], rotary, x.dtype)
            if m == CSA_RATIO:
                pool, idx_pool, tables = cache.c4_kv[self.layer], cache.c4_idx[self.layer], dec.c4_tables
            else:
                pool, idx_pool, tables = cache.c128_kv[self.layer], None, dec.c128_tables
            cache.write_entries_batch(pool, tables[done], w, entries)
            ckeys = cache.gather_entries(pool, tables)
            cvalid = torch.arange(ckeys.shape[1], device=x.device)[None, :] < ((pos + 1) // m)[:, None]
            if self.indexer is not None:
                ikeys, idone, iw_ = self.indexer.compressor.decode_batch(
                    x, pos, dec.state_slots, cache.state[(self.layer, "index")], rotary, x.dtype)
                cache.write_entries_batch(idx_pool, tables[idone], iw_, ikeys)
                cvalid = self.indexer.select_batch(index_q[0], index_q[1], cache.gather_entries(idx_pool, tables),
                                                   cvalid, reduce)
            keys = torch.cat([keys, ckeys.to(keys.dtype)], dim=1)
            mask = torch.cat([mask, cvalid], dim=1)
        return sink_attention(q, keys, mask, self.attn_sink, self.softmax_scale)

    def _window(self, kv: torch.Tensor, seq: SeqView, cache: KVCache, qpos: torch.Tensor):
        """Keys for the sliding window (cached ring + this step's tokens) and their mask."""
        W = self.cfg.sliding_window
        lo = max(0, seq.start_pos - (W - 1))
        old_pos = torch.arange(lo, seq.start_pos, device=kv.device)
        keys = torch.cat([cache.read_window(self.layer, seq.window_slot, old_pos).to(kv.dtype), kv])
        kpos = torch.cat([old_pos, qpos])
        mask = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - W)
        # Store the newest W tokens of this step (after reading: the ring may wrap).
        keep = min(seq.num_tokens, W)
        cache.write_window(self.layer, seq.window_slot, qpos[-keep:], kv[-keep:])
        return keys, mask

    def _compressed(self, x, seq: SeqView, cache: KVCache, rotary: Rotary, qpos, index_q, reduce):
        comp = self.compressor
        entries, first = comp(x, seq, cache.state[(self.layer, "main")], rotary, x.dtype)
        n_total = seq.end_pos // self.ratio
        if self.ratio == CSA_RATIO:
            pool, idx_pool = cache.c4_kv[self.layer], cache.c4_idx[self.layer]
            cache.write_entries(pool, seq.c4_blocks, first, entries)
            ikeys, ifirst = self.indexer.compressor(x, seq, cache.state[(self.layer, "index")], rotary, x.dtype)
            cache.write_entries(idx_pool, seq.c4_blocks, ifirst, ikeys)
            keys = cache.read_entries(pool, seq.c4_blocks, n_total)
            all_ikeys = cache.read_entries(idx_pool, seq.c4_blocks, n_total)
            mask = self.indexer.select(index_q[0], index_q[1], all_ikeys, qpos, reduce)
        else:
            pool = cache.c128_kv[self.layer]
            cache.write_entries(pool, seq.c128_blocks, first, entries)
            keys = cache.read_entries(pool, seq.c128_blocks, n_total)
            mask = torch.arange(n_total, device=x.device)[None, :] < ((qpos + 1) // self.ratio)[:, None]
        return keys.to(x.dtype), mask

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmax over the visible keys plus a per-head sink logit (denominator only); V = K."""
        scores = torch.einsum("nhd,kd->hnk", q, keys).float() * self.softmax_scale
        scores = scores.masked_fill(~mask[None], float("-inf"))
        sink = self.attn_sink.float()[:, None, None].expand(-1, q.shape[0], 1)
        logits = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
        return torch.einsum("hnk,kd->nhd", probs.to(keys.dtype), keys)
