"""The worker side (ranks 1..N-1): join the group, build this rank's shard, follow the driver.

Spawned workers start in ``spawned_worker_main``; under a torchrun-style launch every non-zero
rank runs ``python -m engine.distributed.worker`` (or ``run_worker_from_env()`` first thing in
an embedding program, as ``dsv4 serve`` does). Workers receive the model settings from rank 0.
"""
from __future__ import annotations

import logging
import os
import traceback

import torch
import torch.distributed as dist

from engine.distributed.groups import DEFAULT_TIMEOUT_S, GroupSpec, build_runner, env_group_spec, join_groups
from engine.distributed.memory import rank_memory
from engine.distributed.messages import Command, ModelSpec

log = logging.getLogger(__name__)


def _worker_device(spec: ModelSpec, group: GroupSpec) -> torch.device:
    if spec.device_type == "cuda":
        torch.cuda.set_device(group.local_rank)
        return torch.device("cuda", group.local_rank)
    if group.spawned:  # share the node's cores with the driver and the other spawned ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // group.world_size))
    return torch.device("cpu")


def worker_loop(group: GroupSpec) -> None:
    """Join the group, build this rank's shard, then follow the driver's commands until shutdown."""
    groups = join_groups(group)
    control = groups.control
    try:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        cmd: Command = box[0]
        if cmd.op != "init":
            raise RuntimeError(f"expected the driver's init command, got {cmd.op!r}")
        runner, error = None, None
        try:
            runner = build_runner(cmd.payload, group.rank, _worker_device(cmd.payload, group), groups.model)
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
            elif cmd.op == "mtp":
                runner.draft_with_mtp(*cmd.payload)
            elif cmd.op == "allocate":
                runner.allocate_cache(*cmd.payload)
            elif cmd.op == "report":
                dist.gather_object(rank_memory(runner, group.rank), None, dst=0, group=control)
            elif cmd.op == "shutdown":
                return
            else:
                raise RuntimeError(f"unknown command {cmd.op!r} from the driver")
    finally:
        dist.destroy_process_group()


def spawned_worker_main(group: GroupSpec, errors) -> None:
    """Entry point of a spawned worker: a failure's traceback goes to the driver through a pipe."""
    try:
        worker_loop(group)
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
    worker_loop(group)
    return True


def main() -> None:
    """``python -m engine.distributed.worker``: a worker rank of a torchrun-style launch."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(levelname)s %(message)s")
    group = env_group_spec()
    if group is None or group.rank == 0:
        raise SystemExit("engine.distributed.worker runs non-zero ranks of a multi-process launch: set WORLD_SIZE > 1, "
                         "RANK (or NODE_RANK) > 0, MASTER_ADDR and MASTER_PORT; rank 0 runs `dsv4 serve`")
    worker_loop(group)


if __name__ == "__main__":
    main()
