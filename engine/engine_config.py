"""EngineConfig: every knob of the engine, once, shared by ``LLM(...)`` and ``dsv4 serve``.

Frozen: the engine derives its parts' settings from it at start (SchedulerConfig for the batch
limits, the KV manager for the cache budget and prefix-cache knobs) and nothing changes it later.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SPECULATIVE_METHODS = ("ngram", "mtp")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # checkpoint dir; None = the embedded default model
    dtype: str = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    device: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int | None = None  # bytes; None = a fraction of free GPU memory / 256 MiB on CPU
    gpu_memory_utilization: float = 0.85
    kv_cache_dtype: str = "auto"  # auto | fp8
    enable_prefix_cache: bool = True
    prefix_cache_unit: int = 2048  # checkpoint interval in tokens (multiple of 64)
    # Share of the KV budget for checkpoint snapshots (window + state slot + tail blocks each);
    # the default is measured with bench/prefix_replay.py (bench/RESULTS.md).
    prefix_cache_snapshot_share: float = 0.25
    # Lower tiers for evicted checkpoints (engine/core/checkpoint_store.py): host memory, and a
    # directory that survives restarts (None: no disk tier), each with a size bound in bytes.
    prefix_cache_host_memory: int = 1 << 30
    prefix_cache_dir: str | None = None
    prefix_cache_dir_size: int = 16 << 30
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    seed: int = 0
    compile: bool = False  # torch.compile(fullgraph=True) of the decode forward, any device
    enforce_eager: bool = False  # no CUDA graphs for decode on CUDA
    # FP8-stored projections round their activations to FP8 per 128 channels first, as DeepSeek's
    # reference inference does (spec §3.9). Off: transformers' numerics (unquantised activations).
    fp8_activations: bool = False
    # Speculative decoding: drafts per running greedy sequence, verified in one target forward
    # (0 = off). "ngram" = prompt lookup (engine/worker/drafter.py); "mtp" = the checkpoint's
    # multi-token-prediction layer (engine/model/mtp.py), chained k times.
    speculative_tokens: int = 0
    speculative_method: str = "ngram"
    # Saturation policy: no drafts while more than this many sequences run (the verify rows
    # cost compute a full batch does not have to spare), as vLLM and SGLang turn it off.
    speculative_max_batch: int = 32

    def __post_init__(self) -> None:
        def positive(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for name in ("max_num_seqs", "max_num_batched_tokens", "prefix_cache_unit", "tensor_parallel_size"):
            positive(name)
        if self.compile and self.tensor_parallel_size > 1:
            raise ValueError("compile is not supported with tensor_parallel_size > 1 (ranks run eagerly)")
        if self.kv_cache_memory is not None:
            positive("kv_cache_memory")
        k = self.speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 8:
            raise ValueError(f"speculative_tokens must be an int in [0, 8], got {k!r}")
        if self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {SPECULATIVE_METHODS}, got {self.speculative_method!r}")
        positive("speculative_max_batch")
        if self.prefix_cache_unit % 64:
            raise ValueError(f"prefix_cache_unit must be a multiple of 64, got {self.prefix_cache_unit}")
        share = self.prefix_cache_snapshot_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise ValueError(f"prefix_cache_snapshot_share must be in [0, 1), got {share!r}")
        for name in ("prefix_cache_host_memory", "prefix_cache_dir_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative number of bytes, got {value!r}")
        if self.prefix_cache_dir is not None:
            if not isinstance(self.prefix_cache_dir, str) or not self.prefix_cache_dir:
                raise ValueError(f"prefix_cache_dir must be a directory path, got {self.prefix_cache_dir!r}")
            if self.prefix_cache_dir_size < 1:
                raise ValueError("prefix_cache_dir needs prefix_cache_dir_size >= 1 byte")
            if not self.enable_prefix_cache:
                raise ValueError("prefix_cache_dir needs prefix caching on")
            if self.tensor_parallel_size > 1:
                raise ValueError("prefix_cache_dir is not supported with tensor parallelism (the cache is sharded)")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {self.kv_cache_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]
