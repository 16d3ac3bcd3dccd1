"""What the driver (rank 0) sends the workers on the control group: picklable, torch-light.

``Command`` carries one step (``forward``: chunks + cache copies), the one-time model settings
(``init``: ``ModelSpec``), a cache allocation, a memory report request or the shutdown. Chunks
travel as the scheduler's own ``ScheduledChunk`` with a copy of its ``BlockTable`` (plain ints
and lists): one type for a sequence's cache handles on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.core.scheduler import ScheduledChunk
from engine.model.config import ModelConfig


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
    speculative_method: str = "ngram"  # "mtp": every rank holds the MTP layer and runs its passes
    speculative_tokens: int = 0
    speculative_max_batch: int = 32
    fp8_activations: bool = False


@dataclass
class Command:
    op: str  # "init" | "allocate" | "forward" | "mtp" | "report" | "shutdown"
    payload: Any = None


def chunk_message(ch: ScheduledChunk) -> ScheduledChunk:
    """A chunk as sent to the workers: a snapshot, so later table growth on rank 0 cannot race it."""
    return ScheduledChunk(ch.request_id, list(ch.token_ids), ch.start_pos, ch.sample, ch.block_table.copy(),
                          ch.num_drafts)
