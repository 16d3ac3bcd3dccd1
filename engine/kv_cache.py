"""The KV cache tensors (owned by the model runner). Allocation decisions live in the
pure-Python ``KVCacheManager``; this module only holds storage and performs copies.

Pools (docs/ARCHITECTURE.md):
- window: per layer ``[slots, W, head_dim]`` ring, position p at ``p % W``
- state:  per compressor ``kv``/``score`` ``[slots, S, coff*d]`` fp32, S = 2m with overlap
          (rows [0, m) = previous window's A-half, rows [m, 2m) = current window) else m
- c4:     per CSA layer entries ``[blocks, E4, head_dim]`` and indexer keys ``[blocks, E4, idx_dim]``
- c128:   per HCA layer entries ``[blocks, E128, head_dim]``

Nothing is reset between sequences: a sequence starting at position 0 never reads state or
window rows it did not write itself (validity derives from positions).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig

CSA_RATIO, HCA_RATIO = 4, 128


@dataclass(frozen=True)
class CacheShape:
    num_window_slots: int
    num_state_slots: int
    num_c4_blocks: int
    num_c128_blocks: int
    c4_block_tokens: int = 256
    c128_block_tokens: int = 8192

    @property
    def c4_entries(self) -> int:
        return self.c4_block_tokens // CSA_RATIO

    @property
    def c128_entries(self) -> int:
        return self.c128_block_tokens // HCA_RATIO


class CompressorState:
    """kv/score rows of one compressor for all state slots."""

    def __init__(self, slots: int, ratio: int, overlap: bool, width: int, device):
        rows = 2 * ratio if overlap else ratio
        self.kv = torch.zeros(slots, rows, width, dtype=torch.float32, device=device)
        self.score = torch.full((slots, rows, width), float("-inf"), dtype=torch.float32, device=device)

    def copy_(self, src: int, dst: int) -> None:
        self.kv[dst].copy_(self.kv[src])
        self.score[dst].copy_(self.score[src])


class KVCache:
    def __init__(self, cfg: ModelConfig, shape: CacheShape, dtype: torch.dtype, device, num_local_index_heads=None):
        self.cfg, self.shape, self.dtype, self.device = cfg, shape, dtype, device
        W, d, di = cfg.sliding_window, cfg.head_dim, cfg.index_head_dim
        self.window = [torch.zeros(shape.num_window_slots, W, d, dtype=dtype, device=device)
                       for _ in range(cfg.num_layers)]
        self.state: dict[tuple[int, str], CompressorState] = {}
        self.c4_kv: dict[int, torch.Tensor] = {}
        self.c4_idx: dict[int, torch.Tensor] = {}
        self.c128_kv: dict[int, torch.Tensor] = {}
        for layer, ratio in enumerate(cfg.compress_ratios):
            if ratio == CSA_RATIO:
                self.state[(layer, "main")] = CompressorState(shape.num_state_slots, ratio, True, 2 * d, device)
                self.state[(layer, "index")] = CompressorState(shape.num_state_slots, ratio, True, 2 * di, device)
                self.c4_kv[layer] = torch.zeros(shape.num_c4_blocks, shape.c4_entries, d, dtype=dtype, device=device)
                self.c4_idx[layer] = torch.zeros(shape.num_c4_blocks, shape.c4_entries, di, dtype=dtype, device=device)
            elif ratio == HCA_RATIO:
                self.state[(layer, "main")] = CompressorState(shape.num_state_slots, ratio, False, d, device)
                self.c128_kv[layer] = torch.zeros(shape.num_c128_blocks, shape.c128_entries, d, dtype=dtype,
                                                  device=device)

    # ---- storage-format hooks (identity for kv_cache_dtype="auto") ----------------------
    def round_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """What a KV vector becomes once stored; applied to this step's own tokens too."""
        return kv

    def round_index_query(self, q: torch.Tensor) -> torch.Tensor:
        """Indexer queries, transformed like the stored indexer keys."""
        return q

    # ---- sliding window ring -----------------------------------------------------------
    def read_window(self, layer: int, slot: int, positions: torch.Tensor) -> torch.Tensor:
        return self.window[layer][slot][positions % self.cfg.sliding_window]

    def write_window(self, layer: int, slot: int, positions: torch.Tensor, values: torch.Tensor) -> None:
        ring = self.window[layer][slot]
        ring[positions % self.cfg.sliding_window] = values.to(ring.dtype)

    # ---- compressed entries: block-table addressing ----------------------------------
    def entries_per_block(self, ratio: int) -> int:
        return self.shape.c4_entries if ratio == CSA_RATIO else self.shape.c128_entries

    def write_entries(self, pool: torch.Tensor, blocks: list[int], first: int, values: torch.Tensor) -> None:
        """Store entries ``first .. first+len(values)-1`` of a sequence into its blocks."""
        if values.shape[0] == 0:
            return
        E = pool.shape[1]
        idx = torch.arange(first, first + values.shape[0], device=pool.device)
        block_ids = torch.tensor(blocks, dtype=torch.long, device=pool.device)[idx // E]
        pool[block_ids, idx % E] = values.to(pool.dtype)

    def read_entries(self, pool: torch.Tensor, blocks: list[int], count: int) -> torch.Tensor:
        """Entries ``0 .. count-1`` of a sequence, ``[count, dim]``."""
        E = pool.shape[1]
        n_blocks = -(-count // E)
        if count == 0:
            return pool.new_zeros(0, pool.shape[-1])
        ids = torch.tensor(blocks[:n_blocks], dtype=torch.long, device=pool.device)
        return pool[ids].reshape(-1, pool.shape[-1])[:count]

    # ---- copies requested by the scheduler (prefix-cache restore / snapshot) ----------
    def copy(self, pool: str, src: int, dst: int) -> None:
        if pool == "window":
            for w in self.window:
                w[dst].copy_(w[src])
        elif pool == "state":
            for st in self.state.values():
                st.copy_(src, dst)
        elif pool == "c4":
            for t in list(self.c4_kv.values()) + list(self.c4_idx.values()):
                t[dst].copy_(t[src])
        elif pool == "c128":
            for t in self.c128_kv.values():
                t[dst].copy_(t[src])
        else:
            raise ValueError(f"unknown cache pool {pool!r}")

    def nbytes(self) -> dict[str, int]:
        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts)

        return {
            "window": size(self.window),
            "state": size([s.kv for s in self.state.values()] + [s.score for s in self.state.values()]),
            "c4": size(list(self.c4_kv.values()) + list(self.c4_idx.values())),
            "c128": size(list(self.c128_kv.values())),
        }
