"""What each rank holds: weight bytes by part of the model (dense + quantised copies) and KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.deepseek_v4 import DeepseekV4
from engine.model.layers import Linear
from engine.worker.model_runner import ModelRunner


@dataclass
class RankMemory:
    """Bytes one rank holds: weights by part of the model (dense + quantised copies) and KV cache."""

    rank: int
    device: str
    weights: dict[str, int]
    kv_cache: int

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())


def _weight_part(name: str) -> str:
    if name.startswith(("embed", "head")):
        return "embed_head"
    if ".attn." in name:
        return "attention"
    if ".ffn.experts." in name:
        return "routed_experts"
    if ".ffn.shared." in name:
        return "shared_expert"
    return "other"  # norms, mHC, router, tid2eid, rotary tables


def weight_bytes(model: DeepseekV4) -> dict[str, int]:
    parts: dict[str, int] = {}

    def add(name: str, t: torch.Tensor | None) -> None:
        if t is not None:
            key = _weight_part(name)
            parts[key] = parts.get(key, 0) + t.numel() * t.element_size()

    for name, p in model.named_parameters():
        add(name, p)
    for name, b in model.named_buffers():
        add(name, b)
    for name, mod in model.named_modules():
        if isinstance(mod, Linear):  # the checkpoint-format copy kept beside (or instead of) dense
            add(name + ".", mod.qweight)
            add(name + ".", mod.qscale)
    return parts


def rank_memory(runner: ModelRunner, rank: int) -> RankMemory:
    kv = sum(runner.cache.nbytes().values()) if runner.cache is not None else 0
    return RankMemory(rank, str(runner.device), weight_bytes(runner.model), kv)
