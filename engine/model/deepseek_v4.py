"""The DeepSeek-V4 model over a flat varlen batch (spec §3.1).

``forward(batch, cache)`` reads only the ``ForwardBatch`` (token ids, positions, per-sequence
cache handles) and the ``KVCache`` tensors; it returns final hidden states for the rows whose
logits are wanted. ``compute_logits`` applies the head in fp32. With ``mtp=True`` the model also
holds the checkpoint's multi-token-prediction layer (``self.mtp[0]``, engine/model/mtp.py), which
reads the final streams of every row (``streams``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import kernels
from engine.worker.input_batch import ForwardBatch
from engine.model.config import ModelConfig
from engine.worker.kv_cache import KVCache
from engine.model.layers import RMSNorm, model_rotaries
from engine.model.block import Block
from engine.model.mhc import HyperHead
from engine.model.mtp import MtpLayer
from engine.model.step_tables import StepTables
from engine.model.sharding import Split, tensor_split


class Parallel:
    """What the model needs to know about tensor/expert parallelism. World size 1 = no-op."""

    def __init__(self, tp_size: int = 1, tp_rank: int = 0, ep: bool = False,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 all_gather_vocab: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
        if tp_size > 1 and (all_reduce is None or all_gather_vocab is None):
            raise ValueError("tp_size > 1 needs the all_reduce and all_gather_vocab collectives")
        self.tp_size, self.tp_rank, self.ep = tp_size, tp_rank, ep
        self.all_reduce = all_reduce if tp_size > 1 else None
        self.all_gather_vocab = all_gather_vocab if tp_size > 1 else None

    def expert_range(self, n_experts: int) -> tuple[int, int]:
        if not self.ep or self.tp_size == 1:
            return 0, n_experts
        per = n_experts // self.tp_size
        return self.tp_rank * per, (self.tp_rank + 1) * per

    def vocab_range(self, vocab: int) -> tuple[int, int]:
        per = -(-vocab // self.tp_size)
        return min(vocab, self.tp_rank * per), min(vocab, (self.tp_rank + 1) * per)

    def split_for(self, name: str, cfg: ModelConfig) -> Split | None:
        """This rank's part of checkpoint tensor ``name`` (None: replicated or owned whole)."""
        return tensor_split(name, cfg, self.tp_size, self.tp_rank, self.ep, self.vocab_range(cfg.vocab_size))


class DeepseekV4(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, par: Parallel | None = None,
                 mtp: bool = False):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.par = par or Parallel()
        lo, hi = self.par.vocab_range(cfg.vocab_size)
        self.vocab_start, self.vocab_end = lo, hi
        self.embed = nn.Parameter(torch.zeros(hi - lo, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.layers = nn.ModuleList([Block(cfg, i, dtype, self.par) for i in range(cfg.num_layers)])
        self.hc_head = HyperHead(cfg.hc_mult, cfg.hidden_size, cfg.hc_eps, cfg.rms_norm_eps)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Parameter(torch.zeros(hi - lo, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.rotaries = nn.ModuleDict(model_rotaries(cfg))
        if mtp and cfg.num_mtp_layers < 1:
            raise ValueError("the checkpoint has no multi-token-prediction layer (num_nextn_predict_layers is 0)")
        # Named like the checkpoint (``mtp.0.*``); only built when speculative decoding uses it.
        self.mtp = nn.ModuleList([MtpLayer(cfg, dtype, self.par)] if mtp else [])

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.par.tp_size == 1:
            return self.embed[ids]
        # Vocab-parallel: each rank looks up its rows, zeros elsewhere, then all-reduce.
        local = (ids >= self.vocab_start) & (ids < self.vocab_end)
        out = self.embed[(ids - self.vocab_start).clamp(0, self.embed.shape[0] - 1)]
        out = out * local[:, None].to(out.dtype)
        return self.par.all_reduce(out)

    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Final-normed hidden states ``[len(batch.logits_rows), D]``."""
        return self.final_hidden(self.streams(batch, cache)[batch.logits_rows])

    def streams(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """The last layer's output streams of every row, ``[T, hc, D]`` (before the HC head)."""
        x = self.embed_tokens(batch.input_ids)
        streams = x.unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()
        tables = StepTables.build(batch, cache, self.rotaries, self.dtype)
        for block in self.layers:
            streams = block(streams, batch, cache, tables, self.par.all_reduce)
        return streams

    def final_hidden(self, streams: torch.Tensor) -> torch.Tensor:
        return self.hc_head(streams, self.norm)

    def mtp_hidden(self, streams: torch.Tensor, next_ids: torch.Tensor, batch: ForwardBatch,
                   cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the MTP layer over ``batch``: its output streams ``[T, hc, D]`` and the
        normed hidden states of ``batch.logits_rows`` (for ``compute_logits``: the token after
        ``next_ids``)."""
        layer = self.mtp[0]
        tables = StepTables.build(batch, cache, self.rotaries, self.dtype)
        out = layer(streams, self.embed_tokens(next_ids), batch, cache, tables, self.par.all_reduce)
        return out, layer.final_hidden(out[batch.logits_rows])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 head (spec §3.1 step 4); vocab-parallel ranks gather their slices."""
        logits = kernels.linear(hidden.float(), self.head, None, "dense")  # the weight upcasts in the GEMM
        if self.par.all_gather_vocab is not None:
            logits = self.par.all_gather_vocab(logits)[:, : self.cfg.vocab_size]
        return logits
