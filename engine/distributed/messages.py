"""What the driver (rank 0) sends the workers on the control group: picklable, torch-light.

``Command`` carries one step (``forward``: chunks + cache copies), the one-time model settings
(``init``: ``ModelSpec``), a cache allocation, a memory report request or the shutdown. A
chunk's cache handles travel as ``BlockRefs`` (the part of a ``BlockTable`` the forward reads).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.model.config import ModelConfig


@dataclass
class BlockRefs:
    """The cache handles of one chunk (what ``ModelRunner.forward`` reads of a BlockTable)."""

    window_slot: int
    state_slot: int | None
    c4_blocks: list[int]
    c128_blocks: list[int]


@dataclass
class ChunkSpec:
    token_ids: list[int]
    start_pos: int
    sample: bool
    block_table: BlockRefs


@dataclass
class ModelSpec:
    """What a worker needs to build its shard: sent once by the driver after the group forms."""

    model_dir: str
    cfg: ModelConfig
    dtype: torch.dtype
    device_type: str  # "cpu" | "cuda"; a worker picks its own device index
    tp_size: int
    expert_parallel: bool
    seed: int


@dataclass
class Command:
    op: str  # "init" | "allocate" | "forward" | "report" | "shutdown"
    payload: Any = None


def chunk_spec(ch) -> ChunkSpec:
    bt = ch.block_table
    return ChunkSpec(list(ch.token_ids), ch.start_pos, ch.sample,
                     BlockRefs(bt.window_slot, bt.state_slot, list(bt.c4_blocks), list(bt.c128_blocks)))
