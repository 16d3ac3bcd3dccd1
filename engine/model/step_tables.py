"""What every layer of one forward reads that depends only on the batch, computed once per forward
instead of once per layer: the RoPE tables of the tokens' positions (and of the compressed entries'
positions) for each rotary kind, where each token lands in its sliding-window ring, and per
compression ratio the entries each token sees and the block tables of the planned entries."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.layers import Rotary
from engine.worker.input_batch import NO_SLOT, ForwardBatch
from engine.worker.kv_cache import KVCache

RopePair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StepTables:
    token_rope: dict[str, RopePair]  # rotary kind -> cos/sin [T, rope_dim/2] at the tokens' positions
    entry_rope: dict[int, RopePair]  # ratio -> cos/sin at the first position of each planned entry
    window_slots: torch.Tensor  # [T] ring each token is stored into (NO_SLOT: not among the newest rows)
    window_rows: torch.Tensor  # [T] its row in the ring
    visible: dict[int, torch.Tensor]  # ratio -> [T] entries completed at each token's position
    entry_tables: dict[int, torch.Tensor]  # ratio -> [E, blocks] block table of each planned entry's sequence

    @classmethod
    def build(cls, batch: ForwardBatch, cache: KVCache, rotaries: dict[str, Rotary],
              dtype: torch.dtype) -> "StepTables":
        rotaries = {kind: r for kind, r in rotaries.items()}  # a ModuleDict: dynamo cannot dict() one
        token_rope = {kind: r.cos_sin(batch.positions, dtype) for kind, r in rotaries.items()}
        # Compressed entries only exist on compressor layers, which all rotate with "compress".
        entry_rope = {m: rotaries["compress"].cos_sin(plan.window * m, dtype) for m, plan in batch.plans.items()}
        # Each sequence's newest ring-full of tokens is stored (with speculative slack, the rows a
        # rollback needs); older rows of a long chunk would only be overwritten by newer ones.
        slots = torch.where(batch.newest_rows(cache.window_rows), batch.window_slots[batch.seq_ids], NO_SLOT)
        visible = {m: (batch.positions + 1) // m for m in batch.plans}
        entry_tables = {m: batch.tables(m)[plan.seq] for m, plan in batch.plans.items()}
        return cls(token_rope, entry_rope, slots, batch.positions % cache.window_rows, visible, entry_tables)
