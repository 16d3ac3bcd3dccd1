"""Failure detection on the driver: a dead, hung or failing rank becomes one ParallelWorkerError.

``DriverGroup`` is rank 0's view of the group. It notices a dead spawned worker before every
command (``is_alive``) and while the rendezvous runs, turns any exception inside a lockstep
operation (a broken connection, a collective past ``timeout_s``) into a ParallelWorkerError that
names the rank and the cause (a spawned worker's traceback comes through a pipe), then tears the
group down; every later call raises the same error instead of hanging clients.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

import torch.distributed as dist

from engine.distributed.groups import Groups, GroupSpec, join_groups
from engine.distributed.messages import Command

log = logging.getLogger(__name__)

STARTUP_POLL_S = 0.2


class ParallelWorkerError(RuntimeError):
    """A tensor/expert-parallel rank died, hung or failed: the engine cannot run any more steps."""


class DriverGroup:
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
            self._set(join_groups(self.spec))
            return
        result: dict = {}

        def rendezvous():
            try:
                result["groups"] = join_groups(self.spec)
            except BaseException as e:  # surfaced by the main thread below
                result["error"] = e

        t = threading.Thread(target=rendezvous, name="tp-rendezvous", daemon=True)
        t.start()
        while t.is_alive():
            t.join(STARTUP_POLL_S)
            if t.is_alive() and self._dead_workers():
                raise self.fail("startup", None)
        if "error" in result:
            raise self.fail("startup", result["error"])
        self._set(result["groups"])

    def _set(self, groups: Groups) -> None:
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
