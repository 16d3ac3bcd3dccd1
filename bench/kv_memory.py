"""KV-cache memory arithmetic for the real V4 models (no GPU needed).

    python bench/kv_memory.py

Per model and cache dtype: amortised bytes per token, what one 1M-token sequence holds
(window + compressor state + compressed blocks), whether it fits an 80 GB GPU next to the
model's weights share, and the ratio to an uncompressed cache (one head_dim vector per layer
per token, the same model without compression).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.core.cache_layout import CacheLayout  # noqa: E402

MODELS = {
    # name: (compress_ratios of the main layers, head_dim, index_head_dim, rope_dim)
    "V4-Flash": ([0, 0] + [4, 128] * 20 + [4], 512, 128, 64),
    "V4-Pro": ([128, 128] + [4, 128] * 29 + [4], 512, 128, 64),
}
GIB = 1024 ** 3


def main() -> int:
    print(f"{'model':<9} {'kv dtype':<8} {'B/token':>8} {'1M-token seq':>13} {'uncompressed':>13} {'ratio':>7} "
          f"{'fits 80 GB':>10}")
    for name, (ratios, d, di, rope) in MODELS.items():
        for kv_dtype, nbytes in (("bf16", 2), ("fp8", 1)):
            lay = CacheLayout.from_model(ratios, d, di, 128, rope, kv_dtype_bytes=2 if kv_dtype == "bf16" else 1,
                                         kv_cache_dtype="auto" if kv_dtype == "bf16" else "fp8")
            seq = lay.bytes_for_sequence(1 << 20)
            unc = (1 << 20) * lay.num_layers * d * 2  # bf16 MQA cache, one 512-vector per layer per token
            print(f"{name:<9} {kv_dtype:<8} {lay.bytes_per_token():8.0f} {seq / GIB:11.2f} GiB "
                  f"{unc / GIB:9.1f} GiB {seq / unc:7.1%} {str(seq < 80e9):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
