"""Tensor and expert parallel execution over ``torch.distributed`` (docs/PARALLEL.md).

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
  (or ``python -m engine.distributed.parallel``). Workers receive the model settings from rank 0.

Failure handling: the control group waits without limit (an idle server is fine) but the model
collectives time out after ``timeout_s`` (a hung rank); a dead spawned worker is noticed before
every command (``is_alive``) and by the connection error inside a collective. Any of these
tears the group down and raises ``ParallelWorkerError`` (a RuntimeError) in the driver — now
and on every later call — instead of hanging clients.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from engine.model.config import ModelConfig
from engine.worker.kv_cache import CacheShape
from engine.model.deepseek_v4 import DeepseekV4, Parallel
from engine.model.layers import Linear
from engine.model.sharding import validate_parallel
from engine.worker.model_runner import ModelRunner, SampleResult

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = float(os.environ.get("DSV4_PARALLEL_TIMEOUT_S", "600"))
# Workers wait on the control group between steps; an idle server must not time them out. The
# driver's side of the same group uses timeout_s: its send blocks until every worker receives.
_WORKER_CONTROL_TIMEOUT = timedelta(days=365)
_RENDEZVOUS_TIMEOUT = timedelta(minutes=10)  # nodes of a multi-node launch may start late
_LOAD_TIMEOUT = timedelta(hours=1)  # ranks wait for each other to finish reading their shards
_STARTUP_POLL_S = 0.2


class ParallelWorkerError(RuntimeError):
    """A tensor/expert-parallel rank died, hung or failed: the engine cannot run any more steps."""


# ---- messages from the driver to the workers (pickled on the control group) ------------------
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


def _chunk_spec(ch) -> ChunkSpec:
    bt = ch.block_table
    return ChunkSpec(list(ch.token_ids), ch.start_pos, ch.sample,
                     BlockRefs(bt.window_slot, bt.state_slot, list(bt.c4_blocks), list(bt.c128_blocks)))


# ---- how a process joins the group ---------------------------------------------------------
@dataclass(frozen=True)
class GroupSpec:
    world_size: int
    rank: int
    local_rank: int  # CUDA device index on this node
    init_method: str  # "tcp://host:port" (spawned) or "env://" (torchrun-style)
    timeout_s: float
    spawned: bool


def _backend() -> str:
    # One backend string for every rank whatever its device: CPU tensors over gloo, CUDA over NCCL.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@dataclass
class _Groups:
    control: dist.ProcessGroup  # gloo: pickled commands from the driver, reports back
    model: dist.ProcessGroup  # the model's collectives, bounded by timeout_s
    load: dist.ProcessGroup  # gloo: the load-status exchange after every rank read its shard


def _join(spec: GroupSpec) -> _Groups:
    """Rendezvous (default group), then the control and model groups, in the same order on every rank."""
    timeout = timedelta(seconds=spec.timeout_s)
    dist.init_process_group(_backend(), init_method=spec.init_method, world_size=spec.world_size,
                            rank=spec.rank, timeout=_RENDEZVOUS_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=timeout if spec.rank == 0 else _WORKER_CONTROL_TIMEOUT)
    model = dist.new_group(backend=_backend(), timeout=timeout)
    return _Groups(control, model, dist.new_group(backend="gloo", timeout=_LOAD_TIMEOUT))


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the collectives the model calls -------------------------------------------------------
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


def _build_runner(spec: ModelSpec, rank: int, device: torch.device, group: dist.ProcessGroup,
                  runner_cls=ModelRunner, **kw) -> ModelRunner:
    par = make_parallel(spec.tp_size, rank, spec.expert_parallel, spec.cfg.vocab_size, group)
    return runner_cls(spec.model_dir, spec.cfg, spec.dtype, device, par=par, seed=spec.seed, **kw)


# ---- memory report --------------------------------------------------------------------------
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


def _rank_memory(runner: ModelRunner, rank: int) -> RankMemory:
    kv = sum(runner.cache.nbytes().values()) if runner.cache is not None else 0
    return RankMemory(rank, str(runner.device), weight_bytes(runner.model), kv)


# ---- the worker side ------------------------------------------------------------------------
def _worker_device(spec: ModelSpec, group: GroupSpec) -> torch.device:
    if spec.device_type == "cuda":
        torch.cuda.set_device(group.local_rank)
        return torch.device("cuda", group.local_rank)
    if group.spawned:  # share the node's cores with the driver and the other spawned ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // group.world_size))
    return torch.device("cpu")


def _worker_loop(group: GroupSpec) -> None:
    """Join the group, build this rank's shard, then follow the driver's commands until shutdown."""
    groups = _join(group)
    control = groups.control
    try:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        cmd: Command = box[0]
        if cmd.op != "init":
            raise RuntimeError(f"expected the driver's init command, got {cmd.op!r}")
        runner, error = None, None
        try:
            runner = _build_runner(cmd.payload, group.rank, _worker_device(cmd.payload, group), groups.model)
        except Exception as e:  # reported to the driver, which raises it with this rank named
            error = f"{type(e).__name__}: {e}"
            log.exception("rank %d failed to load its shard", group.rank)
        errors = [None] * group.world_size
        dist.all_gather_object(errors, error, group=groups.load)
        if any(e is not None for e in errors):  # the driver raises; nothing more will come
            return
        while True:
            dist.broadcast_object_list(box, src=0, group=control)
            cmd = box[0]
            if cmd.op == "forward":
                runner.forward(*cmd.payload)
            elif cmd.op == "allocate":
                runner.allocate_cache(*cmd.payload)
            elif cmd.op == "report":
                dist.gather_object(_rank_memory(runner, group.rank), None, dst=0, group=control)
            elif cmd.op == "shutdown":
                return
            else:
                raise RuntimeError(f"unknown command {cmd.op!r} from the driver")
    finally:
        dist.destroy_process_group()


def _spawned_worker_main(group: GroupSpec, errors) -> None:
    """Entry point of a spawned worker: a failure's traceback goes to the driver through a pipe."""
    try:
        _worker_loop(group)
    except BaseException:
        errors.send(traceback.format_exc())
        raise SystemExit(1)


def run_worker_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """For launchers (``dsv4 serve`` under torchrun): on a non-zero rank of a torchrun-style
    launch, serve as a worker until the driver shuts down and return True; otherwise return
    False at once (this process is the driver or runs alone)."""
    group = env_group_spec(timeout_s)
    if group is None or group.rank == 0:
        return False
    _worker_loop(group)
    return True


# ---- the driver side ------------------------------------------------------------------------
class _Group:
    """The driver's view of the group: sends commands, watches the workers, turns any failure
    into one clear ParallelWorkerError and tears everything down."""

    def __init__(self, spec: GroupSpec, procs: list, error_pipes: list):
        self.spec, self.procs, self.error_pipes = spec, procs, error_pipes
        self.control: dist.ProcessGroup | None = None
        self.model: dist.ProcessGroup | None = None
        self.load: dist.ProcessGroup | None = None
        self.down: str | None = None  # why the group is unusable (set once)
        self._joined = False  # this process is in the default group (and must leave it once)

    # -- startup --
    def join(self) -> None:
        """Rendezvous; in spawn mode while watching the workers, so one that dies while starting
        is reported at once instead of after the rendezvous timeout."""
        if not self.procs:
            self._set(_join(self.spec))
            return
        result: dict = {}

        def rendezvous():
            try:
                result["groups"] = _join(self.spec)
            except BaseException as e:  # surfaced by the main thread below
                result["error"] = e

        t = threading.Thread(target=rendezvous, name="tp-rendezvous", daemon=True)
        t.start()
        while t.is_alive():
            t.join(_STARTUP_POLL_S)
            if t.is_alive() and self._dead_workers():
                raise self.fail("startup", None)
        if "error" in result:
            raise self.fail("startup", result["error"])
        self._set(result["groups"])

    def _set(self, groups: _Groups) -> None:
        self.control, self.model, self.load = groups.control, groups.model, groups.load
        self._joined = True

    # -- commands --
    def send(self, cmd: Command) -> None:
        self.check_alive()
        with self.guard(cmd.op):
            dist.broadcast_object_list([cmd], src=0, group=self.control)

    def check_alive(self) -> None:
        if self.down is not None:
            raise ParallelWorkerError(f"tensor-parallel group is down: {self.down}")
        if self._dead_workers():
            raise self.fail("heartbeat", None)

    @contextmanager
    def guard(self, what: str):
        """Any exception inside a lockstep operation leaves the ranks out of step: fail for good."""
        if self.down is not None:
            raise ParallelWorkerError(f"tensor-parallel group is down: {self.down}")
        try:
            yield
        except ParallelWorkerError:
            raise
        except Exception as e:
            raise self.fail(what, e) from e

    # -- failure --
    def _dead_workers(self) -> list[tuple[int, int | None]]:
        return [(r + 1, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]

    def fail(self, what: str, exc: BaseException | None) -> ParallelWorkerError:
        for p in self.procs:  # a worker whose connection just broke is usually exiting: reap it
            p.join(timeout=1.0)
        reasons = [f"worker rank {r} exited with code {code}" for r, code in self._dead_workers()]
        for r, conn in enumerate(self.error_pipes, start=1):
            tb = _pending_traceback(conn)
            if tb:
                reasons.append(f"rank {r}: {tb[-1]}")
        if exc is not None:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "timed out" in text.lower() or "timeout" in text.lower():
                reasons.append(f"a rank did not respond within {self.spec.timeout_s:g} s (hung?): {text}")
            elif not reasons:
                reasons.append(f"{type(exc).__name__}: {text}")
        if not self.procs and exc is not None:
            reasons.append("check the other ranks' logs")
        self.down = f"{what} failed: " + "; ".join(reasons or ["unknown cause"])
        log.error("tensor-parallel %s", self.down)
        self.teardown()
        return ParallelWorkerError(f"tensor-parallel {self.down}")

    def teardown(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():  # stopped or stuck in native code: SIGTERM is not enough
                p.kill()
                p.join(timeout=5.0)
        if self._joined and dist.is_initialized():
            dist.destroy_process_group()
        self._joined = False

    def shutdown(self) -> None:
        """Tell the workers to stop, then leave the group (idempotent)."""
        if self.down is None:
            self.down = "shut down"
            try:
                dist.broadcast_object_list([Command("shutdown")], src=0, group=self.control)
            except Exception:  # already broken: the teardown below still cleans up
                log.warning("could not tell the workers to shut down", exc_info=True)
            for p in self.procs:
                p.join(timeout=10.0)
        self.teardown()


def _pending_traceback(conn) -> list[str]:
    """Lines of the traceback a spawned worker sent before exiting ([] if none: killed workers send nothing)."""
    try:
        return conn.recv().strip().splitlines() if conn.poll() else []
    except (EOFError, OSError):
        return []


class _LockstepRunner(ModelRunner):
    """Rank 0's ModelRunner: every forward is announced to the workers first, so all ranks run
    it together; sampling (``execute``) stays on this rank."""

    def __init__(self, *args, lockstep: _Group, **kwargs):
        self._group = lockstep
        super().__init__(*args, **kwargs)

    def allocate_cache(self, shape: CacheShape, kv_cache_dtype: str = "auto") -> None:
        self._group.send(Command("allocate", (shape, kv_cache_dtype)))
        super().allocate_cache(shape, kv_cache_dtype)  # local: a failure here leaves the workers usable

    def forward(self, chunks, copies_before=(), copies_after=()):
        chunks, before, after = list(chunks), list(copies_before), list(copies_after)
        self._group.send(Command("forward", ([_chunk_spec(c) for c in chunks], before, after)))
        with self._group.guard("forward"):
            return super().forward(chunks, before, after)


class ParallelModelRunner:
    """``ModelRunner``'s interface over ``tp_size`` ranks (this process is rank 0).

    ``cache_shape`` may be given here or later through ``allocate_cache`` (the engine sizes the
    KV budget after the weights are loaded). ``timeout_s`` bounds every model collective."""

    def __init__(self, model_dir: str, cfg: ModelConfig, dtype: torch.dtype, device,
                 cache_shape: CacheShape | None = None, *, tp_size: int, enable_expert_parallel: bool = False,
                 seed: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S):
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
            self._group = _Group(group, [], [])
        else:
            if device.type == "cpu":  # the spawned ranks share this node's cores with us
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_size))
            self._group = self._spawn(tp_size, timeout_s, device)
        self._group.join()
        spec = ModelSpec(model_dir, cfg, dtype, device.type, tp_size, enable_expert_parallel, seed)
        self._group.send(Command("init", spec))
        runner, own_error = None, None
        try:
            runner = _build_runner(spec, 0, device, self._group.model, runner_cls=_LockstepRunner, lockstep=self._group)
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
    def _spawn(tp_size: int, timeout_s: float, device: torch.device) -> _Group:
        ctx = mp.get_context("spawn")
        init = f"tcp://127.0.0.1:{_free_port()}"
        procs, pipes = [], []
        for rank in range(1, tp_size):
            recv, send = ctx.Pipe(duplex=False)
            spec = GroupSpec(tp_size, rank, rank, init, timeout_s, spawned=True)
            p = ctx.Process(target=_spawned_worker_main, args=(spec, send), name=f"dsv4-tp-rank{rank}", daemon=True)
            p.start()
            send.close()
            procs.append(p)
            pipes.append(recv)
        local = device.index or 0
        return _Group(GroupSpec(tp_size, 0, local, init, timeout_s, spawned=True), procs, pipes)

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

    def execute(self, sched_out, requests: dict) -> dict[str, SampleResult]:
        return self._runner.execute(sched_out, requests)

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
            dist.gather_object(_rank_memory(self._runner, 0), out, dst=0, group=self._group.control)
        return out

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        self._group.shutdown()


def main() -> None:
    """``python -m engine.distributed.parallel``: a worker rank of a torchrun-style launch."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(levelname)s %(message)s")
    group = env_group_spec()
    if group is None or group.rank == 0:
        raise SystemExit("engine.distributed.parallel runs non-zero ranks of a multi-process launch: set WORLD_SIZE > 1, "
                         "RANK (or NODE_RANK) > 0, MASTER_ADDR and MASTER_PORT; rank 0 runs `dsv4 serve`")
    _worker_loop(group)


if __name__ == "__main__":
    main()
