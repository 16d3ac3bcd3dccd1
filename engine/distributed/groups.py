"""How ranks form the group: rendezvous, the three process groups, and the model's collectives.

Every rank joins the default group (gloo on CPU, NCCL for CUDA tensors), then in the same order
a gloo *control* group (the driver's commands; workers wait on it without limit, an idle server
is fine), the *model* group (the collectives inside the forward, bounded by ``timeout_s``) and
a gloo *load* group (the load-status exchange after every rank read its shard). A launch is
either spawned (one node, ``tcp://127.0.0.1:<free port>``) or torchrun-style (``env://``).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.distributed.messages import ModelSpec
from engine.model.deepseek_v4 import Parallel
from engine.worker.model_runner import ModelRunner

DEFAULT_TIMEOUT_S = float(os.environ.get("DSV4_PARALLEL_TIMEOUT_S", "600"))
# Workers wait on the control group between steps; an idle server must not time them out. The
# driver's side of the same group uses timeout_s: its send blocks until every worker receives.
WORKER_CONTROL_TIMEOUT = timedelta(days=365)
RENDEZVOUS_TIMEOUT = timedelta(minutes=10)  # nodes of a multi-node launch may start late
LOAD_TIMEOUT = timedelta(hours=1)  # ranks wait for each other to finish reading their shards


@dataclass(frozen=True)
class GroupSpec:
    world_size: int
    rank: int
    local_rank: int  # CUDA device index on this node
    init_method: str  # "tcp://host:port" (spawned) or "env://" (torchrun-style)
    timeout_s: float
    spawned: bool


def backend() -> str:
    # One backend string for every rank whatever its device: CPU tensors over gloo, CUDA over NCCL.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@dataclass
class Groups:
    control: dist.ProcessGroup  # gloo: pickled commands from the driver, reports back
    model: dist.ProcessGroup  # the model's collectives, bounded by timeout_s
    load: dist.ProcessGroup  # gloo: the load-status exchange after every rank read its shard


def join_groups(spec: GroupSpec) -> Groups:
    """Rendezvous (default group), then the control and model groups, in the same order on every rank."""
    timeout = timedelta(seconds=spec.timeout_s)
    dist.init_process_group(backend(), init_method=spec.init_method, world_size=spec.world_size,
                            rank=spec.rank, timeout=RENDEZVOUS_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=timeout if spec.rank == 0 else WORKER_CONTROL_TIMEOUT)
    model = dist.new_group(backend=backend(), timeout=timeout)
    return Groups(control, model, dist.new_group(backend="gloo", timeout=LOAD_TIMEOUT))


def env_group_spec(timeout_s: float = DEFAULT_TIMEOUT_S) -> GroupSpec | None:
    """The torchrun-style launch this process belongs to, or None for a single process.

    ``RANK`` is the global rank (torchrun sets it per process); with one process per node
    ``NODE_RANK`` may stand in for it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank_text = os.environ.get("RANK", os.environ.get("NODE_RANK"))
    if rank_text is None:
        raise ValueError("WORLD_SIZE > 1 but neither RANK nor NODE_RANK is set")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 but {', '.join(missing)} is not set")
    rank = int(rank_text)
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, {world}), got {rank}")
    return GroupSpec(world, rank, int(os.environ.get("LOCAL_RANK", "0")), "env://", timeout_s, spawned=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_parallel(tp_size: int, tp_rank: int, expert_parallel: bool, vocab_size: int,
                  group: dist.ProcessGroup | None = None) -> Parallel:
    """``Parallel`` whose hooks run on ``group`` (default: the default process group)."""
    vocab_part = -(-vocab_size // tp_size)

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        # Partial sums are added in fp32 (spec §3.14); fp32 input is reduced in place.
        acc = t.float().contiguous()
        dist.all_reduce(acc, group=group)
        return acc.to(t.dtype)

    def all_gather_vocab(local: torch.Tensor) -> torch.Tensor:
        # Every rank's slice is padded to the same width (the last one may be short).
        local = F.pad(local, (0, vocab_part - local.shape[-1])).contiguous()
        parts = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(parts, local, group=group)
        return torch.cat(parts, dim=-1)

    return Parallel(tp_size, tp_rank, expert_parallel, all_reduce, all_gather_vocab)


def build_runner(spec: ModelSpec, rank: int, device: torch.device, group: dist.ProcessGroup,
                  runner_cls=ModelRunner, **kw) -> ModelRunner:
    par = make_parallel(spec.tp_size, rank, spec.expert_parallel, spec.cfg.vocab_size, group)
    return runner_cls(spec.model_dir, spec.cfg, spec.dtype, device, par=par, seed=spec.seed,
                      speculative_method=spec.speculative_method, speculative_tokens=spec.speculative_tokens,
                      speculative_max_batch=spec.speculative_max_batch, fp8_activations=spec.fp8_activations, **kw)
