"""Byte sizes of the V4 decode state per cache pool, derived from the model's layer kinds.

Pure Python (no torch). Four pools back the cache (docs/ARCHITECTURE.md):

    window  one slot per live sequence or snapshot: a ring of the last W token vectors, all layers
    state   one slot per live sequence or snapshot: fp32 compressor partial state (CSA + HCA layers)
    c4      blocks of `c4_block_tokens` tokens: CSA entries + indexer keys (one entry per 4 tokens)
    c128    blocks of `c128_block_tokens` tokens: HCA entries (one entry per 128 tokens)

This module only does arithmetic; the model runner allocates the tensors with these sizes.
`compress_ratios` lists the main layers only (strip MTP / DSpark entries before calling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

SLIDING, CSA_RATIO, HCA_RATIO = 0, 4, 128
FP32_BYTES = 4
# CSA pools 2m slots per entry (overlapping windows) and splits each vector in two halves.
CSA_COFF = 2


class CachePool(str, Enum):
    """The four cache pools. A str enum so logs and dict keys read as plain names."""

    WINDOW = "window"
    STATE = "state"
    C4 = "c4"
    C128 = "c128"


@dataclass(frozen=True)
class BlockSplit:
    """The blocks of one pool a sequence prefix fills: `num_full` full ones, then maybe one
    partially filled tail block."""

    num_full: int
    has_tail: bool

    @property
    def num_blocks(self) -> int:
        return self.num_full + int(self.has_tail)


def _fp8_entry_bytes(head_dim: int, rope_dim: int) -> int:
    """FlashMLA fp8_ds_mla record: e4m3 nope dims, bf16 rope dims, one e8m0 scale per 64 nope
    dims, padded to a multiple of 8 bytes (584 for head_dim 512, rope_dim 64)."""
    nope = head_dim - rope_dim
    raw = nope + rope_dim * 2 + -(-nope // 64)  # a partial last block still has a scale
    return -(-raw // 8) * 8


def _fp4_index_key_bytes(index_head_dim: int) -> int:
    """Indexer key as packed e2m1 (two values a byte) plus one e8m0 scale per 32 dims."""
    return index_head_dim // 2 + -(-index_head_dim // 32)


@dataclass(frozen=True)
class CacheLayout:
    """Per-pool byte sizes for one model and one KV storage format."""

    compress_ratios: tuple[int, ...]
    head_dim: int
    index_head_dim: int
    sliding_window: int
    kv_cache_dtype: str
    entry_bytes: int  # one window or compressed entry of one layer
    index_key_bytes: int  # one indexer key of one CSA layer
    c4_block_tokens: int = 256
    c128_block_tokens: int = 8192
    ring_slack: int = 0  # extra rows per position ring for speculative decoding (worker.kv_cache)

    def __post_init__(self) -> None:
        if not self.compress_ratios:
            raise ValueError("compress_ratios must list at least one layer")
        bad = sorted({r for r in self.compress_ratios if r not in (SLIDING, CSA_RATIO, HCA_RATIO)})
        if bad:
            raise ValueError(f"compress_ratios entries must be 0, 4 or 128, found {bad}")
        for name in ("head_dim", "index_head_dim", "sliding_window", "entry_bytes", "index_key_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.ring_slack, int) or self.ring_slack < 0:
            raise ValueError(f"ring_slack must be a non-negative int, got {self.ring_slack!r}")
        if self.c4_block_tokens <= 0 or self.c4_block_tokens % CSA_RATIO:
            raise ValueError(
                f"c4_block_tokens must be a positive multiple of 4, got {self.c4_block_tokens}"
            )
        if self.c128_block_tokens <= 0 or self.c128_block_tokens % HCA_RATIO:
            raise ValueError(
                f"c128_block_tokens must be a positive multiple of 128, got {self.c128_block_tokens}"
            )

    @classmethod
    def from_model(
        cls,
        compress_ratios: list[int],
        head_dim: int,
        index_head_dim: int,
        sliding_window: int,
        rope_dim: int,
        kv_dtype_bytes: int,
        kv_cache_dtype: str = "auto",
        c4_block_tokens: int = 256,
        c128_block_tokens: int = 8192,
        ring_slack: int = 0,
    ) -> CacheLayout:
        """Build the layout. `auto` stores entries in the model dtype (`kv_dtype_bytes` each
        value); `fp8` uses the 584-byte FlashMLA record and FP4 indexer keys (spec §4.2)."""
        for name, value in (("head_dim", head_dim), ("index_head_dim", index_head_dim),
                            ("kv_dtype_bytes", kv_dtype_bytes)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(rope_dim, int) or not 0 <= rope_dim < head_dim:
            raise ValueError(f"rope_dim must be in [0, head_dim={head_dim}), got {rope_dim!r}")
        if kv_cache_dtype == "auto":
            entry_bytes = head_dim * kv_dtype_bytes
            index_key_bytes = index_head_dim * kv_dtype_bytes
        elif kv_cache_dtype == "fp8":
            if index_head_dim % 2:
                raise ValueError(f"kv_cache_dtype 'fp8' needs an even index_head_dim, got {index_head_dim}")
            entry_bytes = _fp8_entry_bytes(head_dim, rope_dim)
            index_key_bytes = _fp4_index_key_bytes(index_head_dim)
        else:
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {kv_cache_dtype!r}")
        return cls(
            compress_ratios=tuple(compress_ratios),
            head_dim=head_dim,
            index_head_dim=index_head_dim,
            sliding_window=sliding_window,
            kv_cache_dtype=kv_cache_dtype,
            entry_bytes=entry_bytes,
            index_key_bytes=index_key_bytes,
            c4_block_tokens=c4_block_tokens,
            c128_block_tokens=c128_block_tokens,
            ring_slack=ring_slack,
        )

    # ---- layer kinds -------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.compress_ratios)

    @property
    def csa_layers(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.compress_ratios) if r == CSA_RATIO)

    @property
    def hca_layers(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.compress_ratios) if r == HCA_RATIO)

    @property
    def has_compressed_layers(self) -> bool:
        return bool(self.csa_layers or self.hca_layers)

    @property
    def c4_entries_per_block(self) -> int:
        return self.c4_block_tokens // CSA_RATIO

    @property
    def c128_entries_per_block(self) -> int:
        return self.c128_block_tokens // HCA_RATIO

    # ---- bytes per allocation unit ------------------------------------------------------

    @property
    def window_slot_bytes(self) -> int:
        return self.num_layers * (self.sliding_window + self.ring_slack) * self.entry_bytes

    @property
    def state_slot_bytes(self) -> int:
        """fp32 kv + score buffers of every compressor ([coff*m + slack, coff*d] each, spec §4.1)."""
        csa_rows, hca_rows = CSA_COFF * CSA_RATIO + self.ring_slack, HCA_RATIO + self.ring_slack
        csa_main = 2 * csa_rows * (CSA_COFF * self.head_dim)
        csa_indexer = 2 * csa_rows * (CSA_COFF * self.index_head_dim)
        hca = 2 * hca_rows * self.head_dim
        per_csa = (csa_main + csa_indexer) * FP32_BYTES
        return len(self.csa_layers) * per_csa + len(self.hca_layers) * hca * FP32_BYTES

    @property
    def c4_block_bytes(self) -> int:
        entry = self.entry_bytes + self.index_key_bytes
        return len(self.csa_layers) * self.c4_entries_per_block * entry

    @property
    def c128_block_bytes(self) -> int:
        return len(self.hca_layers) * self.c128_entries_per_block * self.entry_bytes

    def unit_bytes(self, pool: CachePool) -> int:
        """Bytes of one slot or block of `pool`."""
        return {
            CachePool.WINDOW: self.window_slot_bytes,
            CachePool.STATE: self.state_slot_bytes,
            CachePool.C4: self.c4_block_bytes,
            CachePool.C128: self.c128_block_bytes,
        }[CachePool(pool)]

    def pool_is_used(self, pool: CachePool) -> bool:
        """False for a pool whose layer kind the model lacks (it then gets no blocks)."""
        pool = CachePool(pool)
        if pool is CachePool.WINDOW:
            return True
        if pool is CachePool.STATE:
            return self.has_compressed_layers
        if pool is CachePool.C4:
            return bool(self.csa_layers)
        return bool(self.hca_layers)

    # ---- blocks a sequence needs ----------------------------------------------------------

    def c4_blocks_for(self, num_tokens: int) -> int:
        """c4 blocks holding the num_tokens // 4 completed CSA entries (0 without CSA layers)."""
        if not self.csa_layers:
            return 0
        return -(-(num_tokens // CSA_RATIO) // self.c4_entries_per_block)

    def c128_blocks_for(self, num_tokens: int) -> int:
        """c128 blocks holding the num_tokens // 128 completed HCA entries (0 without HCA)."""
        if not self.hca_layers:
            return 0
        return -(-(num_tokens // HCA_RATIO) // self.c128_entries_per_block)

    def block_split(self, num_tokens: int) -> dict[CachePool, BlockSplit]:
        """How the compressed entries of num_tokens tokens fill each block pool."""
        split = {}
        for pool, layers, ratio, per_block in (
            (CachePool.C4, self.csa_layers, CSA_RATIO, self.c4_entries_per_block),
            (CachePool.C128, self.hca_layers, HCA_RATIO, self.c128_entries_per_block),
        ):
            entries = num_tokens // ratio if layers else 0
            split[pool] = BlockSplit(entries // per_block, entries % per_block != 0)
        return split

    def max_tokens_for_blocks(self, num_c4_blocks: int, num_c128_blocks: int) -> float:
        """Longest sequence whose compressed entries fit in that many blocks (inf if unbounded)."""
        limit = math.inf
        if self.csa_layers:
            limit = min(limit, num_c4_blocks * self.c4_block_tokens + CSA_RATIO - 1)
        if self.hca_layers:
            limit = min(limit, num_c128_blocks * self.c128_block_tokens + HCA_RATIO - 1)
        return limit

    # ---- summaries --------------------------------------------------------------------------

    def bytes_per_token(self) -> float:
        """Amortised growth per token: Σ_CSA (entry + key)/4 + Σ_HCA entry/128 (spec §4.3)."""
        csa = len(self.csa_layers) * (self.entry_bytes + self.index_key_bytes) / CSA_RATIO
        hca = len(self.hca_layers) * self.entry_bytes / HCA_RATIO
        return csa + hca

    def bytes_for_sequence(self, num_tokens: int) -> int:
        """Everything one live sequence of num_tokens holds: window + state + its blocks."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        state = self.state_slot_bytes if self.has_compressed_layers else 0
        return (
            self.window_slot_bytes
            + state
            + self.c4_blocks_for(num_tokens) * self.c4_block_bytes
            + self.c128_blocks_for(num_tokens) * self.c128_block_bytes
        )
