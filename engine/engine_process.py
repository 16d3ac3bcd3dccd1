"""The engine core in its own process: scheduler, KV manager, model runner (TP rank 0).

``run_engine_process`` is the target of a spawned process (``AsyncEngine`` starts it). It builds
the ``EngineCore``, reports "ready" with what the server needs to know (model config, context
length, generation defaults), then loops: drain the command socket, run one step, send ONE frame
with every output of that step (engine/ipc.py). The server process keeps HTTP, chat encoding,
tokenization, detokenization, stop strings and output parsing, so this loop never waits for
their interpreter lock: on a GPU the host work between two forwards is what it does, nothing else.

A fatal step error (a lost TP rank) is reported once as "dead" with the same message the
in-process loop uses; the process then only answers calls (diagnostics) until told to stop.
SIGINT/SIGTERM are ignored here: the server drains first and then stops this process; if the
server process disappears, this one exits on its own.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import pickle
import signal
import time

import zmq

from engine import ipc
from engine.engine_config import EngineConfig

log = logging.getLogger(__name__)

STATS_INTERVAL = 0.25  # scheduler stats walk every block table: at most 4×/s, and once when idle
IDLE_POLL_MS = 50

_core = None  # this process's EngineCore (``process_core``)


def process_core():
    """The EngineCore of the engine process this code runs in (None elsewhere). Lets objects
    unpickled here (a grammar recipe) find the tokenizer and vocabulary they compile against."""
    return _core


def run_engine_process(config: EngineConfig, commands_addr: str, events_addr: str, parent_pid: int,
                       log_level: int = logging.WARNING) -> None:
    global _core
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack to stderr (a hang)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    ctx = zmq.Context()
    commands = ctx.socket(zmq.PULL)
    commands.connect(commands_addr)
    events = ctx.socket(zmq.PUSH)
    events.setsockopt(zmq.LINGER, 2000)
    events.connect(events_addr)
    try:
        from engine.engine_core import EngineCore

        _core = EngineCore(config)
    except Exception as e:
        log.exception("engine start failed")
        events.send(ipc.pack([ipc.DEAD, f"engine failed to start: {e}"]))
        events.close()
        ctx.term()
        return
    events.send(ipc.pack([ipc.READY, pickle.dumps(_core.model_config), _core.max_model_len,
                          list(_core.generation_defaults), _core.tokenizer is not None, ipc.plain_keys(_core.stats())]))
    try:
        _EngineLoop(_core, commands, events, parent_pid).run()
    finally:
        _core.shutdown()
        events.close()
        commands.close(linger=0)
        ctx.term()


class _EngineLoop:
    def __init__(self, core, commands, events, parent_pid: int):
        self.core, self.commands, self.events, self.parent_pid = core, commands, events, parent_pid
        self.dead = False
        self.errors: list = []  # [request id, message] of adds the core refused, sent with the next step
        self.stats_time = 0.0

    def run(self) -> None:
        core = self.core
        while True:
            if not self._drain_commands():
                return
            if self.dead or not core.has_unfinished():
                if self.errors:
                    self._send_step([], None, None)  # refusals only: no step ran, no stats (they are deltas)
                if self.commands.poll(IDLE_POLL_MS) == 0 and os.getppid() != self.parent_pid:
                    log.warning("the server process is gone: stopping")
                    return
                continue
            try:
                outputs = core.step()
            except Exception as e:  # fatal (a lost rank): tell the server once, stop stepping
                log.exception("engine loop crashed")
                self.dead = True
                self.events.send(ipc.pack([ipc.DEAD, f"engine failure: {e}"]))
                continue
            now = time.monotonic()
            stats = None
            if not core.has_unfinished() or now - self.stats_time >= STATS_INTERVAL:
                stats, self.stats_time = core.stats(), now
            self._send_step(outputs, core.last_step_stats, stats)

    def _send_step(self, outputs, step_stats, stats) -> None:
        errors, self.errors = self.errors, []
        self.events.send(ipc.encode_step(outputs, step_stats, errors, stats))

    def _drain_commands(self) -> bool:
        while True:
            try:
                data = self.commands.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            frame = ipc.unpack(data)
            kind = frame[0]
            if kind == ipc.STOP:
                return False
            if self.dead and kind != ipc.CALL:
                continue
            if kind == ipc.ADD:
                rid, ids, params, salt, hints, arrival = ipc.decode_add(frame)
                try:
                    self.core.add_request(rid, ids, params, cache_salt=salt, arrival_time=arrival, cache_hints=hints)
                except ValueError as e:
                    self.errors.append([rid, str(e)])
            elif kind == ipc.ABORT:
                self.core.abort(frame[1])
            elif kind == ipc.FINISH:
                self.core.finish_request(*frame[1:])
            elif kind == ipc.CALL:
                self._call(frame[1], frame[2])

    def _call(self, call_id: int, payload: bytes) -> None:
        """A diagnostic call between steps: ``fn(core)`` (a picklable callable) or an attribute
        path of the core read or called; the result or exception goes back pickled."""
        try:
            what, args = pickle.loads(payload)
            if callable(what):
                result = what(self.core)
            else:
                target = self.core
                for name in what:
                    target = getattr(target, name)
                result = target(*args[0], **args[1]) if args is not None else target
            reply = pickle.dumps((result, None))
        except Exception as e:  # the caller's problem, not the engine's
            try:
                reply = pickle.dumps((None, e))
            except Exception:
                reply = pickle.dumps((None, RuntimeError(repr(e))))
        self.events.send(ipc.pack([ipc.REPLY, call_id, reply]))
