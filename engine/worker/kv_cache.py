"""The KV cache tensors (owned by the model runner). Allocation decisions live in the
pure-Python ``KVCacheManager``; this module only holds storage and performs copies.

Pools (docs/ARCHITECTURE.md):
- window: per layer ``[slots, W, head_dim]`` ring, position p at ``p % W``
- state:  per compressor ``kv``/``score`` ring ``[slots, S, coff*d]`` fp32 (see below)
- c4:     per CSA layer entries ``[blocks, E4, head_dim]`` and indexer keys ``[blocks, E4, idx_dim]``
- c128:   per HCA layer entries ``[blocks, E128, head_dim]``

``kv_cache_dtype`` picks the storage format (spec §3.13, §4.2):
- ``auto``: the model dtype, no rounding (parity with transformers);
- ``fp8``: DeepSeek's layout, as packed uint8 records (last dim = bytes per vector):
  window/compressed entries = e4m3 nope dims | bf16 rope dims | one e8m0 scale per 64 nope dims,
  padded to 8 bytes (584 B for head_dim 512); indexer keys = FP4 (packed e2m1 + one e8m0 per 32)
  of the Hadamard-rotated key. Writes quantise, reads dequantise to the model dtype; the state
  pool stays fp32 in both formats.

Nothing is reset between sequences: a sequence starting at position 0 never reads state or
window rows it did not write itself (validity derives from positions).

Every pool has one extra row at the end, the padding row, addressed as ``-1``: batched writes
that must not land (tokens outside a ring's span, entries that do not complete, padded decode
rows) go there, and padded block-table columns read from it (always masked). ``nbytes`` and
prefix-cache copies only see the real rows.

The state ring: compressor ``kv``/``score`` ``[slots, S, coff*d]`` fp32 with position p at row
``p % S``; S = 2m with overlap (the window in progress and the one before it, whose A-half the
next entry pools) else m.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from engine.model.config import ModelConfig
from kernels.quant import (fp4_block_dequantize, fp4_block_quantize, fp8_kv_dequantize, fp8_kv_quantize,
                          hadamard_rotate)

CSA_RATIO, HCA_RATIO = 4, 128
KV_CACHE_DTYPES = ("auto", "fp8")
FP8_SCALE_BLOCK = 64  # nope dims per e8m0 scale in an FP8 entry
FP4_SCALE_BLOCK = 32  # indexer-key dims per e8m0 scale
RECORD_ALIGN = 8  # FlashMLA pads each FP8 entry to a multiple of 8 bytes
PAD_ROWS = 1  # the padding row at the end of every pool (address -1)


@dataclass(frozen=True)
class CacheShape:
    num_window_slots: int
    num_state_slots: int
    num_c4_blocks: int
    num_c128_blocks: int
    c4_block_tokens: int = 256
    c128_block_tokens: int = 8192
    # Extra rows in every position ring (window, compressor state): at least the draft tokens a
    # verify chunk feeds, so that rejected drafts' writes only land on rows no live position needs.
    ring_slack: int = 0

    @property
    def c4_entries(self) -> int:
        return self.c4_block_tokens // CSA_RATIO

    @property
    def c128_entries(self) -> int:
        return self.c128_block_tokens // HCA_RATIO


@dataclass(frozen=True)
class Fp8EntryCodec:
    """One KV vector <-> its FlashMLA ``fp8_ds_mla`` byte record (spec §4.2):
    ``[0, nope)`` e4m3 | ``[nope, nope + 2*rope)`` bf16 rope dims | ``ceil(nope/64)`` e8m0 scales |
    zero padding to a multiple of 8 bytes. A trailing partial scale block gets its own scale."""

    head_dim: int
    rope_dim: int

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def num_scales(self) -> int:
        return -(-self.nope_dim // FP8_SCALE_BLOCK)

    @property
    def scale_offset(self) -> int:
        return self.nope_dim + 2 * self.rope_dim

    @property
    def nbytes(self) -> int:
        raw = self.scale_offset + self.num_scales
        return -(-raw // RECORD_ALIGN) * RECORD_ALIGN

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., head_dim]`` -> uint8 ``[..., nbytes]``."""
        nope, rope, scale = fp8_kv_quantize(x, self.nope_dim, FP8_SCALE_BLOCK)
        pad = self.nbytes - self.scale_offset - self.num_scales
        return torch.cat([nope.view(torch.uint8), rope.contiguous().view(torch.uint8), scale.view(torch.uint8),
                          nope.new_zeros(*nope.shape[:-1], pad, dtype=torch.uint8)], dim=-1)

    def decode(self, rec: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 ``[..., nbytes]`` -> ``[..., head_dim]`` in ``dtype`` (exact: e4m3 * 2^k)."""
        nope = rec[..., :self.nope_dim].contiguous().view(torch.float8_e4m3fn)
        rope = rec[..., self.nope_dim:self.scale_offset].contiguous().view(torch.bfloat16)
        scale = rec[..., self.scale_offset:self.scale_offset + self.num_scales]
        return fp8_kv_dequantize(nope, rope, scale, dtype, FP8_SCALE_BLOCK)

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x.dtype)


@dataclass(frozen=True)
class Fp4IndexKeyCodec:
    """One indexer key <-> ``dim/2`` bytes of packed e2m1 (low nibble = even dim) followed by one
    e8m0 scale per 32 dims, of the Hadamard-rotated key (spec §3.7: RoPE, Hadamard, then FP4).
    Decoding returns the *rotated* key; queries get the same rotation, which keeps q.k."""

    dim: int

    @property
    def nbytes(self) -> int:
        return self.dim // 2 + -(-self.dim // FP4_SCALE_BLOCK)

    def encode(self, k: torch.Tensor) -> torch.Tensor:
        """Unrotated ``[..., dim]`` -> uint8 ``[..., nbytes]``."""
        packed, scale = fp4_block_quantize(hadamard_rotate(k), FP4_SCALE_BLOCK)
        return torch.cat([packed.view(torch.uint8), scale.view(torch.uint8)], dim=-1)

    def decode(self, rec: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = self.dim // 2
        return fp4_block_dequantize(rec[..., :half].contiguous(), rec[..., half:].contiguous(), dtype,
                                    FP4_SCALE_BLOCK)

    def round_trip(self, k: torch.Tensor) -> torch.Tensor:
        """Hadamard rotation then FP4 simulation, in k's dtype (what indexer queries go through)."""
        return self.decode(self.encode(k), k.dtype)


class CompressorState:
    """kv/score rows of one compressor for all state slots."""

    def __init__(self, slots: int, ratio: int, overlap: bool, width: int, device, slack: int = 0):
        rows = (2 * ratio if overlap else ratio) + slack
        self.kv = torch.zeros(slots + PAD_ROWS, rows, width, dtype=torch.float32, device=device)
        self.score = torch.zeros(slots + PAD_ROWS, rows, width, dtype=torch.float32, device=device)

    def copy_(self, src: int, dst: int) -> None:
        self.kv[dst].copy_(self.kv[src])
        self.score[dst].copy_(self.score[src])


class KVCache:
    def __init__(self, cfg: ModelConfig, shape: CacheShape, dtype: torch.dtype, device, num_local_index_heads=None,
                 kv_cache_dtype: str = "auto", extra_window_layers: int = 0):
        """``extra_window_layers``: sliding-only layers after the main ones (the MTP layer,
        index ``cfg.num_layers``), which own a window ring and nothing else."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        self.cfg, self.shape, self.dtype, self.device = cfg, shape, dtype, device
        self.kv_cache_dtype = kv_cache_dtype
        W, d, di = cfg.sliding_window, cfg.head_dim, cfg.index_head_dim
        # Packed codecs for fp8 (None for auto). Pools then hold uint8 records: the last dim is
        # bytes per vector instead of values per vector.
        self.entry_codec: Fp8EntryCodec | None = None
        self.index_codec: Fp4IndexKeyCodec | None = None
        # The record formats as kernels name them: what KV vectors / indexer queries are rounded
        # to (``kernels.norm_rope``) and how the pools are written (``kernels.store_*``).
        self.kv_format, self.index_format = kernels.PLAIN, kernels.PLAIN
        store_dtype = dtype
        if kv_cache_dtype == "fp8":
            _check_fp8_dims(cfg)
            self.entry_codec, self.index_codec = Fp8EntryCodec(d, cfg.rope_dim), Fp4IndexKeyCodec(di)
            self.kv_format, self.index_format = kernels.FP8_ENTRY, kernels.FP4_KEY
            d, di, store_dtype = self.entry_codec.nbytes, self.index_codec.nbytes, torch.uint8
        self.window_rows = W + shape.ring_slack  # ring rows; attention still reads W of them
        self.window = [torch.zeros(shape.num_window_slots + PAD_ROWS, self.window_rows, d, dtype=store_dtype,
                                   device=device)
                       for _ in range(cfg.num_layers + extra_window_layers)]
        self.state: dict[tuple[int, str], CompressorState] = {}
        self.c4_kv: dict[int, torch.Tensor] = {}
        self.c4_idx: dict[int, torch.Tensor] = {}
        self.c128_kv: dict[int, torch.Tensor] = {}
        for layer, ratio in enumerate(cfg.compress_ratios):
            # Compressor states hold fp32 model-width rows whatever the storage format.
            if ratio == CSA_RATIO:
                self.state[(layer, "main")] = CompressorState(shape.num_state_slots, ratio, True,
                                                              2 * cfg.head_dim, device, shape.ring_slack)
                self.state[(layer, "index")] = CompressorState(shape.num_state_slots, ratio, True,
                                                               2 * cfg.index_head_dim, device, shape.ring_slack)
                self.c4_kv[layer] = torch.zeros(shape.num_c4_blocks + PAD_ROWS, shape.c4_entries, d, dtype=store_dtype,
                                                device=device)
                self.c4_idx[layer] = torch.zeros(shape.num_c4_blocks + PAD_ROWS, shape.c4_entries, di, dtype=store_dtype,
                                                 device=device)
            elif ratio == HCA_RATIO:
                self.state[(layer, "main")] = CompressorState(shape.num_state_slots, ratio, False,
                                                              cfg.head_dim, device, shape.ring_slack)
                self.c128_kv[layer] = torch.zeros(shape.num_c128_blocks + PAD_ROWS, shape.c128_entries, d,
                                                  dtype=store_dtype, device=device)

    # ---- sliding window ring -----------------------------------------------------------
    def read_window(self, layer: int, slot: int, positions: torch.Tensor) -> torch.Tensor:
        rows = self.window[layer][slot][positions % self.window_rows]
        if self.entry_codec is None:
            return rows
        return self.entry_codec.decode(rows, self.dtype)

    def write_window(self, layer: int, slot: int, positions: torch.Tensor, values: torch.Tensor) -> None:
        ring = self.window[layer]
        ring[slot, positions % self.window_rows] = self._encode(ring, values)

    def gather_window(self, layer: int, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Ring rows of ``positions [Q, K]`` in rings ``slots [Q]``: ``[Q, K, head_dim]`` (model dtype)."""
        rows = self.window[layer][slots[:, None], positions % self.window_rows]
        return rows if self.entry_codec is None else self.entry_codec.decode(rows, self.dtype)

    def store_window(self, layer: int, slots: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Token t into ring ``slots[t]`` at row ``rows[t]`` (position % window_rows; slot -1: dropped)."""
        kernels.store_records(self.window[layer], slots, rows, values, self.kv_format, rope_dim=self.cfg.rope_dim)

    # ---- compressed entries: block-table addressing ----------------------------------
    def gather_entries(self, pool: torch.Tensor, tables: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """Entries ``entries [Q, K]`` of the sequences whose block tables are ``tables [Q, nb]``:
        ``[Q, K, dim]`` in the model dtype (indexer keys come back Hadamard-rotated under fp8)."""
        E = pool.shape[1]
        blocks = tables.gather(1, entries // E)
        rows = pool[blocks, entries % E]
        codec = self._codec_for(pool)
        return rows if codec is None else codec.decode(rows, self.dtype)

    def store_entries(self, pool: torch.Tensor, tables: torch.Tensor, entries: torch.Tensor, valid: torch.Tensor,
                      values: torch.Tensor) -> None:
        """Entry ``entries[i]`` of the sequence with block table ``tables[i]`` := ``values[i]``
        where ``valid[i]`` (the others go to the padding row)."""
        fmt = self.index_format if self._codec_for(pool) is self.index_codec else self.kv_format
        kernels.store_entries(pool, tables, entries, valid, values, fmt, rope_dim=self.cfg.rope_dim)

    def _encode(self, pool: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        codec = self._codec_for(pool)
        return codec.encode(values) if codec is not None else values.to(pool.dtype)

    def write_entries(self, pool: torch.Tensor, blocks: list[int], first: int, values: torch.Tensor) -> None:
        """Store entries ``first .. first+len(values)-1`` of a sequence into its blocks."""
        if values.shape[0] == 0:
            return
        E = pool.shape[1]
        idx = torch.arange(first, first + values.shape[0], device=pool.device)
        block_ids = torch.tensor(blocks, dtype=torch.long, device=pool.device)[idx // E]
        pool[block_ids, idx % E] = self._encode(pool, values)

    def read_entries(self, pool: torch.Tensor, blocks: list[int], count: int) -> torch.Tensor:
        """Entries ``0 .. count-1`` of a sequence, ``[count, dim]`` (fp8: dequantised to the model
        dtype; indexer keys come back Hadamard-rotated)."""
        E = pool.shape[1]
        ids = torch.tensor(blocks[:-(-count // E)], dtype=torch.long, device=pool.device)
        rows = pool[ids].reshape(-1, pool.shape[-1])[:count]
        codec = self._codec_for(pool)
        return rows if codec is None else codec.decode(rows, self.dtype)

    def _codec_for(self, pool: torch.Tensor) -> Fp8EntryCodec | Fp4IndexKeyCodec | None:
        """The packed format of ``pool`` (None for auto). Indexer-key pools are told apart by
        identity: their record width could coincide with the entry width."""
        if self.entry_codec is None:
            return None
        codec = self.index_codec if any(pool is t for t in self.c4_idx.values()) else self.entry_codec
        if pool.dtype != torch.uint8 or pool.shape[-1] != codec.nbytes:
            raise ValueError(f"pool must be a packed uint8 [..., {codec.nbytes}] tensor of this cache, "
                             f"got {pool.dtype} {tuple(pool.shape)}")
        return codec

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

    def unit_tensors(self, pool: str) -> list[torch.Tensor]:
        """Every tensor of one pool whose dim 0 is the pool's unit (slot or block) id, in a fixed
        order: what a prefix-cache checkpoint's data is (engine/worker/checkpoint_io.py)."""
        if pool == "window":
            return list(self.window)
        if pool == "state":
            return [t for st in self.state.values() for t in (st.kv, st.score)]
        if pool == "c4":
            return list(self.c4_kv.values()) + list(self.c4_idx.values())
        if pool == "c128":
            return list(self.c128_kv.values())
        raise ValueError(f"unknown cache pool {pool!r}")

    def nbytes(self) -> dict[str, int]:
        """Real bytes held per pool (packed records for fp8)."""
        def size(ts):  # the padding row is not capacity
            return sum(t[:-PAD_ROWS].numel() * t.element_size() for t in ts)

        return {
            "window": size(self.window),
            "state": size([s.kv for s in self.state.values()] + [s.score for s in self.state.values()]),
            "c4": size(list(self.c4_kv.values()) + list(self.c4_idx.values())),
            "c128": size(list(self.c128_kv.values())),
        }


def _check_fp8_dims(cfg: ModelConfig) -> None:
    if not 0 <= cfg.rope_dim < cfg.head_dim:
        raise ValueError(f"kv_cache_dtype 'fp8' needs 0 <= rope_dim < head_dim (some dims to store as e4m3), "
                         f"got rope_dim {cfg.rope_dim}, head_dim {cfg.head_dim}")
    di = cfg.index_head_dim
    if di < 2 or di & (di - 1):
        raise ValueError(f"kv_cache_dtype 'fp8' needs index_head_dim a power of two >= 2 (Hadamard rotation, "
                         f"two FP4 values a byte), got {di}")
