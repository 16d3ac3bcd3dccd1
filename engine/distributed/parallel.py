"""Tensor and expert parallel execution over ``torch.distributed`` (docs/PARALLEL.md).

This module is the driver's runner; the rest of engine/distributed/ splits by job: groups.py
(rendezvous, process groups, collectives), messages.py (what the driver sends), failures.py
(failure detection), memory.py (memory report), worker.py (ranks 1..N-1).

One *driver* (rank 0) owns the scheduler, the KV-cache manager and the sampler; ranks 1..N-1
are *workers* that hold their shard of the weights and their own KV cache tensors (the cache is
a single shared K=V head, so it is replicated; only heads, groups and experts are split). Each
step the driver announces the forward (chunks + cache copies, picklable) on a gloo *control*
group, then every rank runs the same forward in lockstep; the collectives inside the model
(``Parallel`` hooks) run on the default group (gloo on CPU, NCCL for CUDA tensors).

Two ways to form the group:
- spawn (one node): ``ParallelModelRunner`` starts N-1 worker processes itself;
- torchrun-style env (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK`` or ``NODE_RANK``,
  ``LOCAL_RANK``): rank 0 builds the runner, every other rank calls ``run_worker_from_env()``
  (or ``python -m engine.distributed.worker``). Workers receive the model settings from rank 0.

Failure handling: the control group waits without limit (an idle server is fine) but the model
collectives time out after ``timeout_s`` (a hung rank); a dead spawned worker is noticed before
every command (``is_alive``) and by the connection error inside a collective. Any of these
tears the group down and raises ``ParallelWorkerError`` (a RuntimeError) in the driver — now
and on every later call — instead of hanging clients.
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.distributed.failures import DriverGroup, ParallelWorkerError
from engine.distributed.groups import DEFAULT_TIMEOUT_S, GroupSpec, build_runner, env_group_spec, free_port
from engine.distributed.memory import RankMemory, rank_memory
from engine.distributed.messages import Command, ModelSpec, chunk_message
from engine.distributed.worker import spawned_worker_main
from engine.model.config import ModelConfig
from engine.model.deepseek_v4 import DeepseekV4
from engine.model.sharding import validate_parallel
from engine.worker.kv_cache import CacheShape
from engine.worker.model_runner import ModelRunner, SampledTokens

__all__ = ["ParallelModelRunner", "ParallelWorkerError", "RankMemory"]


class _LockstepRunner(ModelRunner):
    """Rank 0's ModelRunner: every forward is announced to the workers first, so all ranks run
    it together; sampling (``execute``) stays on this rank."""

    def __init__(self, *args, lockstep: DriverGroup, **kwargs):
        self._group = lockstep
        super().__init__(*args, **kwargs)

    def allocate_cache(self, shape: CacheShape, kv_cache_dtype: str = "auto") -> None:
        self._group.send(Command("allocate", (shape, kv_cache_dtype)))
        super().allocate_cache(shape, kv_cache_dtype)  # local: a failure here leaves the workers usable

    def forward(self, chunks, copies_before=(), copies_after=()):
        chunks, before, after = list(chunks), list(copies_before), list(copies_after)
        self._group.send(Command("forward", ([chunk_message(c) for c in chunks], before, after)))
        with self._group.guard("forward"):
            return super().forward(chunks, before, after)

    def draft_with_mtp(self, plan, copies_after=()):
        after = list(copies_after)
        plan = replace(plan, chunks=[chunk_message(c) for c in plan.chunks])
        self._group.send(Command("mtp", (plan, after)))
        with self._group.guard("MTP drafting"):
            return super().draft_with_mtp(plan, after)


class ParallelModelRunner:
    """``ModelRunner``'s interface over ``tp_size`` ranks (this process is rank 0).

    ``cache_shape`` may be given here or later through ``allocate_cache`` (the engine sizes the
    KV budget after the weights are loaded). ``timeout_s`` bounds every model collective."""

    def __init__(self, model_dir: str, cfg: ModelConfig, dtype: torch.dtype, device,
                 cache_shape: CacheShape | None = None, *, tp_size: int, enable_expert_parallel: bool = False,
                 seed: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S, speculative_method: str = "ngram",
                 speculative_tokens: int = 0, speculative_max_batch: int = 32, fp8_activations: bool = False):
        validate_parallel(cfg, tp_size, enable_expert_parallel)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        device = torch.device(device)
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised in this process; "
                               "shut down the previous ParallelModelRunner first")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds rank 0 to this device
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.tp_size, self.expert_parallel = tp_size, enable_expert_parallel
        group = env_group_spec(timeout_s)
        if group is not None:
            if group.rank != 0:
                raise ValueError(f"ParallelModelRunner runs on rank 0 only (this is RANK={group.rank}); "
                                 "other ranks call engine.distributed.parallel.run_worker_from_env()")
            if group.world_size != tp_size:
                raise ValueError(f"tensor_parallel_size={tp_size} does not match WORLD_SIZE={group.world_size}")
            self._group = DriverGroup(group, [], [])
        else:
            if device.type == "cpu":  # the spawned ranks share this node's cores with us
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_size))
            self._group = self._spawn(tp_size, timeout_s, device)
        self._group.join()
        spec = ModelSpec(model_dir, cfg, dtype, device.type, tp_size, enable_expert_parallel, seed,
                         speculative_method, speculative_tokens, speculative_max_batch, fp8_activations)
        self._group.send(Command("init", spec))
        runner, own_error = None, None
        try:
            runner = build_runner(spec, 0, device, self._group.model, runner_cls=_LockstepRunner, lockstep=self._group)
        except Exception as e:
            own_error = e
        with self._group.guard("model load"):
            errors = [None] * tp_size
            dist.all_gather_object(errors, None if own_error is None else repr(own_error), group=self._group.load)
        if own_error is not None:  # the workers saw it in the gather and stop by themselves
            self._group.down = f"rank 0 failed to load the model: {own_error}"
            self._group.teardown()
            raise own_error
        failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
        if failed:
            self._group.down = "model load failed on " + "; ".join(failed)
            self._group.teardown()
            raise ParallelWorkerError(f"tensor-parallel {self._group.down}")
        self._runner: ModelRunner = runner
        if cache_shape is not None:
            self.allocate_cache(cache_shape)

    @staticmethod
    def _spawn(tp_size: int, timeout_s: float, device: torch.device) -> DriverGroup:
        ctx = mp.get_context("spawn")
        init = f"tcp://127.0.0.1:{free_port()}"
        procs, pipes = [], []
        for rank in range(1, tp_size):
            recv, send = ctx.Pipe(duplex=False)
            spec = GroupSpec(tp_size, rank, rank, init, timeout_s, spawned=True)
            p = ctx.Process(target=spawned_worker_main, args=(spec, send), name=f"dsv4-tp-rank{rank}", daemon=True)
            p.start()
            send.close()
            procs.append(p)
            pipes.append(recv)
        local = device.index or 0
        return DriverGroup(GroupSpec(tp_size, 0, local, init, timeout_s, spawned=True), procs, pipes)

    # ---- ModelRunner interface ------------------------------------------------------------
    @property
    def cache(self):
        return self._runner.cache

    @property
    def model(self) -> DeepseekV4:
        """Rank 0's shard of the model."""
        return self._runner.model

    def allocate_cache(self, shape: CacheShape, kv_cache_dtype: str = "auto") -> None:
        """Every rank allocates the same (replicated) cache tensors."""
        self._runner.allocate_cache(shape, kv_cache_dtype)

    def forward(self, chunks, copies_before=(), copies_after=()) -> torch.Tensor | None:
        return self._runner.forward(chunks, copies_before, copies_after)

    def execute(self, sched_out, requests: dict) -> SampledTokens:
        return self._runner.execute(sched_out, requests)

    def propose_drafts(self, requests: list, k: list[int]) -> list[list[int]]:
        return self._runner.propose_drafts(requests, k)  # drafting reads no sharded tensor

    def release(self, request_id: str) -> None:
        self._runner.release(request_id)

    # ---- parallel extras --------------------------------------------------------------------
    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the spawned workers (empty under a torchrun-style launch)."""
        return [p.pid for p in self._group.procs]

    def check_alive(self) -> None:
        """Raise ParallelWorkerError if the group is down or a spawned worker has died."""
        self._group.check_alive()

    def memory_report(self) -> list[RankMemory]:
        """What every rank holds, rank order."""
        self._group.send(Command("report"))
        with self._group.guard("memory report"):
            out = [None] * self.tp_size
            dist.gather_object(rank_memory(self._runner, 0), out, dst=0, group=self._group.control)
        return out

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        self._group.shutdown()
