"""Which part of each checkpoint tensor a tensor/expert-parallel rank holds (spec §3.14, §2.2).

Split by rank (contiguous ranges, rank r gets the r-th of ``tp_size`` equal parts):
- attention query heads: ``wq_b`` rows (``h*head_dim + j``), ``attn_sink``;
- the grouped output projection by group: ``wo_a`` rows (group-major), ``wo_b`` columns;
- indexer heads: ``indexer.wq_b`` rows (``h*index_head_dim + j``), ``indexer.weights_proj`` rows;
- the shared expert's intermediate: ``w1``/``w3`` rows, ``w2`` columns;
- routed experts: the same intermediate split under plain TP; whole experts, partitioned by
  expert id, under expert parallelism (``Parallel.expert_range``; the loader skips the others);
- vocab-parallel ``embed``/``head`` rows (``Parallel.vocab_range``).
Everything else (``wq_a``, ``wkv``, the single KV head's norms, compressors, router, mHC) is
replicated. Ranges are in the *logical* (dequantised) shape; the loader maps them onto FP8/MXFP4
storage and refuses splits that cut a quantisation block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from engine.model.config import ModelConfig


@dataclass(frozen=True)
class Split:
    """This rank's part of a tensor: indices ``[start, stop)`` along ``dim`` (0 rows, 1 columns)."""

    dim: int
    start: int
    stop: int


def validate_parallel(cfg: ModelConfig, tp_size: int, expert_parallel: bool) -> None:
    """ValueError (naming ``tensor_parallel_size``) when the model cannot split ``tp_size`` ways."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp_size!r}")
    need = {
        "num_attention_heads": cfg.num_heads,
        "o_groups": cfg.o_groups,
        "index_n_heads": cfg.index_n_heads,
        "moe_intermediate_size (shared expert)": cfg.moe_intermediate_size,
    }
    if expert_parallel:
        need["n_routed_experts"] = cfg.n_routed_experts
    bad = {k: v for k, v in need.items() if v % tp_size}
    if bad:
        raise ValueError(f"tensor_parallel_size={tp_size} must divide "
                         + ", ".join(f"{k} ({v})" for k, v in bad.items()))


_LAYER = r"^(?:layers|mtp)\.\d+\."  # main layers and the MTP layer split alike
_ROW_PER_HEAD = re.compile(_LAYER + r"attn\.wq_b\.weight$")
_SINK = re.compile(_LAYER + r"attn\.attn_sink$")
_WO_A = re.compile(_LAYER + r"attn\.wo_a\.weight$")
_WO_B = re.compile(_LAYER + r"attn\.wo_b\.weight$")
_INDEX_Q = re.compile(_LAYER + r"attn\.indexer\.wq_b\.weight$")
_INDEX_W = re.compile(_LAYER + r"attn\.indexer\.weights_proj\.weight$")
_SHARED = re.compile(_LAYER + r"ffn\.shared_experts\.(w1|w2|w3)\.weight$")
_ROUTED = re.compile(_LAYER + r"ffn\.experts\.\d+\.(w1|w2|w3)\.weight$")


def tensor_split(name: str, cfg: ModelConfig, tp_size: int, tp_rank: int, expert_parallel: bool,
                 vocab_range: tuple[int, int]) -> Split | None:
    """The rank's part of the official tensor ``name`` (a ``.weight`` or plain tensor name);
    ``None`` when the tensor is replicated (or, for EP experts, owned whole)."""
    if tp_size == 1:
        return None

    def part(total: int, dim: int) -> Split:
        per = total // tp_size
        return Split(dim, tp_rank * per, (tp_rank + 1) * per)

    if name in ("embed.weight", "head.weight"):
        return Split(0, *vocab_range)
    if _ROW_PER_HEAD.match(name):
        return part(cfg.num_heads * cfg.head_dim, 0)
    if _SINK.match(name):
        return part(cfg.num_heads, 0)
    if _WO_A.match(name):
        return part(cfg.o_groups * cfg.o_lora_rank, 0)
    if _WO_B.match(name):
        return part(cfg.o_groups * cfg.o_lora_rank, 1)
    if _INDEX_Q.match(name):
        return part(cfg.index_n_heads * cfg.index_head_dim, 0)
    if _INDEX_W.match(name):
        return part(cfg.index_n_heads, 0)
    m = _SHARED.match(name) or (None if expert_parallel else _ROUTED.match(name))
    if m:
        return part(cfg.moe_intermediate_size, 1 if m.group(1) == "w2" else 0)
    return None
