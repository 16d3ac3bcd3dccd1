"""Prefix-cache checkpoint data out of and back into the KV cache tensors (host / disk tiers).

A checkpoint's data is the rows of its units — one window slot, one state slot (models with
compressed layers), its c4 and c128 blocks (full ones, then the partially filled tail) — in
every tensor `KVCache.unit_tensors` lists for the pool. `export_units` concatenates those rows
as raw bytes, pool by pool and tensor by tensor; `import_units` writes them into other units of
the same shapes. `layout_signature` names the shapes and dtypes the bytes assume: it is part of
the fingerprint a disk file must match (engine/core/checkpoint_store.py), so bytes are only
ever reinterpreted under the layout that wrote them.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from engine.worker.kv_cache import KVCache

POOL_ORDER = ("window", "state", "c4", "c128")


def layout_signature(cache: KVCache) -> str:
    """Shapes (per unit) and dtypes of every tensor a payload covers, in payload order."""
    parts = [f"{pool}:{tuple(t.shape[1:])}:{t.dtype}" for pool in POOL_ORDER for t in cache.unit_tensors(pool)]
    return hashlib.sha256(";".join(parts).encode()).hexdigest()


def _unit_rows(cache: KVCache, units: dict[str, list[int]]):
    """(tensor, unit ids as an index tensor, bytes of those rows) in payload order."""
    for pool in POOL_ORDER:
        ids = units.get(pool)
        if not ids:
            continue
        index = torch.tensor(ids, dtype=torch.long, device=cache.device)
        for t in cache.unit_tensors(pool):
            yield t, index, len(ids) * t[0].numel() * t.element_size()


def payload_bytes(cache: KVCache, units: dict[str, list[int]]) -> int:
    return sum(size for _, _, size in _unit_rows(cache, units))


def export_units(cache: KVCache, units: dict[str, list[int]]) -> bytes:
    """The rows of `units` (pool -> unit ids, in checkpoint order) as one byte string."""
    pieces = [t.index_select(0, index).contiguous().view(torch.uint8).reshape(-1).cpu()
              for t, index, _ in _unit_rows(cache, units)]
    return torch.cat(pieces).numpy().tobytes() if pieces else b""


def import_units(cache: KVCache, units: dict[str, list[int]], payload: bytes) -> None:
    """Write a payload from `export_units` into `units` (the same counts per pool, other ids).
    ValueError if the payload does not have the size these units need."""
    expected = payload_bytes(cache, units)
    if len(payload) != expected:
        raise ValueError(f"checkpoint payload has {len(payload)} bytes, these units need {expected}")
    data = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy()) if payload else None
    offset = 0
    for t, index, size in _unit_rows(cache, units):
        rows = data[offset:offset + size].clone()  # a fresh buffer is aligned for any dtype
        rows = rows.view(t.dtype).reshape(len(index), *t.shape[1:])
        t.index_copy_(0, index, rows.to(cache.device))
        offset += size
