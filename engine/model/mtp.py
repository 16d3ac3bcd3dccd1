"""V4's multi-token-prediction layer (spec §3.11), the drafter of MTP speculative decoding.

Position ``t``'s final streams of the target (before its HC head) and the embedding of token
``t+1`` give streams for position ``t`` whose logits predict token ``t+2``:
``X' = e_proj(enorm(embed(t+1)))`` (broadcast to every stream) ``+ h_proj(hnorm(X_t))``, then one
sliding-only, non-hash decoder block, the layer's own HC head, ``norm`` and the target's shared
``head``. Chaining feeds the layer its own output streams as the next position's ``X``.

The block's KV window is one more layer of the cache's window pool (index ``cfg.num_layers``):
the same slot, ring and slack as the main layers, so it is budgeted, snapshotted for the prefix
cache and freed with them.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from engine.model.block import Block
from engine.model.config import ModelConfig
from engine.model.layers import Linear, RMSNorm
from engine.model.mhc import HyperHead
from engine.worker.input_batch import ForwardBatch
from engine.worker.kv_cache import KVCache
from engine.model.step_tables import StepTables

if TYPE_CHECKING:
    from engine.model.deepseek_v4 import Parallel


def mtp_layer_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the MTP layer appended to the layer schedule as a sliding-only layer, so the
    block at index ``cfg.num_layers`` builds like any other (not a hash layer: index >= the
    hash layers)."""
    return replace(cfg, compress_ratios=cfg.compress_ratios + (0,))


class MtpLayer(Block):
    """A ``Block`` (its tensors are named like a main layer's, under ``mtp.0.``) plus the input
    projections and its own output head; the embedding and ``head`` are the target's."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, par: Parallel):
        super().__init__(mtp_layer_config(cfg), cfg.num_layers, dtype, par)
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.e_proj = Linear(D, D, dtype)
        self.h_proj = Linear(D, D, dtype)
        self.enorm = RMSNorm(D, eps)
        self.hnorm = RMSNorm(D, eps)
        self.hc_head = HyperHead(cfg.hc_mult, D, cfg.hc_eps, eps)
        self.norm = RMSNorm(D, eps)

    def forward(self, streams, next_embeds, batch: ForwardBatch, cache: KVCache, tables: StepTables, reduce):
        """Streams ``[T, hc, D]`` at ``batch.positions`` from the streams there (the target's, or
        this layer's own at the previous position when chaining) and the embeddings ``[T, D]`` of
        the tokens after them."""
        x = self.h_proj(self.hnorm(streams)) + self.e_proj(self.enorm(next_embeds)).unsqueeze(1)
        return super().forward(x, batch, cache, tables, reduce)

    def final_hidden(self, streams: torch.Tensor) -> torch.Tensor:
        """Normed hidden states for the shared head, from output streams ``[R, hc, D]``."""
        return self.hc_head(streams, self.norm)
