"""Attention workspace per layer of the torch path for one prefill chunk at a given context
(arithmetic from the shapes ``engine/model/attention.py`` allocates; no model is run).

    python bench/sparse_workspace.py [--context 1048576] [--chunk 8192] [--dtype-bytes 2]

Counts the largest tensors alive at once inside one query block (the window gathers, the
compressed keys, the concatenated keys, the sink-attention scores) and inside one indexer chunk
(gathered indexer keys in the model dtype and in fp32, the per-head scores), plus the
compressor's per-step gathers (which scale with the chunk, not the context). Activations of the
chunk itself (q, kv, the MoE) are not workspace and are left out. V4-Flash dims by default.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.model.attention import WORKSPACE_ELEMENTS  # noqa: E402

FLASH = dict(heads=64, head_dim=512, window=128, index_heads=64, index_dim=128, topk=512)


def query_block(keys: int, head_dim: int) -> int:
    return max(1, WORKSPACE_ELEMENTS // (keys * head_dim))


def attention_bytes(keys_compressed: int, c: dict, bt: int) -> tuple[int, int]:
    """(query block, peak bytes) of one query block attending window + ``keys_compressed``."""
    W, D, H = c["window"], c["head_dim"], c["heads"]
    K = W + keys_compressed
    Q = query_block(K, D)
    window = 3 * Q * W * D * bt  # this step's rows, ring rows, the merged keys
    compressed = Q * keys_compressed * D * bt
    cat = Q * K * D * bt
    scores = 2 * Q * H * (K + 1) * 4  # fp32 logits with the sink column and probabilities
    return Q, window + compressed + cat + scores


def indexer_bytes(entries: int, c: dict, bt: int) -> tuple[int, int, int]:
    """(query block, chunk, peak bytes) of one indexer chunk: a query tile of one sequence reads
    that sequence's keys of the chunk once (``[1, C, d]``) for all its queries."""
    Q, _ = attention_bytes(min(c["topk"], entries), c, bt)
    C = min(entries, max(c["topk"], WORKSPACE_ELEMENTS // (Q * c["index_heads"] + c["index_dim"])))
    keys = C * c["index_dim"] * (bt + 4)  # gathered (model dtype) and upcast, once per tile
    scores = Q * c["index_heads"] * C * 4 + Q * C * 4 + 2 * Q * (c["topk"] + C) * (4 + 8)
    return Q, C, keys + scores


def compressor_bytes(chunk: int, ratio: int, dim: int, overlap: bool) -> int:
    """Per-step entry gathers: kv and score rows from the step and from the state ring, fp32."""
    entries = chunk // ratio + 1
    width = (2 if overlap else 1) * dim
    slots = ratio * (2 if overlap else 1)
    return 4 * entries * slots * width * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=1 << 20)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--dtype-bytes", type=int, default=2)
    args = ap.parse_args()
    c, bt, mib = FLASH, args.dtype_bytes, 1 << 20
    n4, n128 = args.context // 4, args.context // 128
    q, attn = attention_bytes(c["topk"], c, bt)
    qi, chunk, idx = indexer_bytes(n4, c, bt)
    comp4 = compressor_bytes(args.chunk, 4, c["head_dim"], True) + compressor_bytes(args.chunk, 4, c["index_dim"], True)
    qh, hca = attention_bytes(n128, c, bt)
    comp128 = compressor_bytes(args.chunk, 128, c["head_dim"], False)
    print(f"V4-Flash, context {args.context}, prefill chunk {args.chunk}, model dtype {bt} B, "
          f"WORKSPACE_ELEMENTS {WORKSPACE_ELEMENTS}")
    print(f"CSA layer: query block {q} | attention {attn / mib:.1f} MiB | indexer chunk {chunk} entries "
          f"({-(-n4 // chunk)} chunks per block) {idx / mib:.1f} MiB | compressors {comp4 / mib:.1f} MiB | "
          f"peak ≈ {(max(attn, idx) + comp4) / mib:.1f} MiB")
    print(f"HCA layer: query block {qh} | attention over window + {n128} entries {hca / mib:.1f} MiB | "
          f"compressor {comp128 / mib:.1f} MiB | peak ≈ {(hca + comp128) / mib:.1f} MiB")
    dense = args.chunk * c["index_heads"] * n4 * 4 + n4 * c["head_dim"] * bt
    print(f"for scale — a dense indexer over every entry for the chunk (the per-sequence path before): "
          f"{dense / (1 << 30):.1f} GiB per CSA layer")


if __name__ == "__main__":
    main()
