"""The server side of the engine process: spawn it, send it commands, receive its step frames.

``EngineChannel.start`` spawns ``run_engine_process`` (multiprocessing "spawn": a fresh
interpreter, no inherited threads or locks), binds two ZeroMQ ipc sockets and waits for "ready".
A receiver thread then reads one frame per engine step and hands it to the ``on_frame``
callback (``AsyncEngine``: one ``call_soon_threadsafe`` per event loop per step). The same
thread watches the process: if it exits without being asked (killed, crashed), ``on_lost``
gets a message in the envelope a lost TP rank uses ("engine failure: ...").
"""
from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import os
import pickle
import tempfile
import threading
import uuid
import weakref
from concurrent.futures import Future
from typing import Callable

import zmq

from engine import ipc
from engine.engine_config import EngineConfig
from engine.engine_process import run_engine_process

log = logging.getLogger(__name__)

POLL_MS = 100  # how often the receiver looks at the process when no frame arrives
CALL_TIMEOUT = 120.0


class EngineChannel:
    def __init__(self, config: EngineConfig, on_frame: Callable[[list], None], on_lost: Callable[[str], None]):
        self.config = config
        self._on_frame, self._on_lost = on_frame, on_lost
        self._zmq = zmq.Context()
        base = os.path.join(tempfile.gettempdir(), f"dsv4-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._commands_addr, self._events_addr = f"ipc://{base}-cmd", f"ipc://{base}-ev"
        self._commands = self._zmq.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.bind(self._commands_addr)
        self._events = self._zmq.socket(zmq.PULL)
        self._events.bind(self._events_addr)
        self._send_lock = threading.Lock()  # a zmq socket is not thread-safe; senders are many
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._closing = False
        self._lost: str | None = None
        self.process = None
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> list:
        """Spawn the engine process and wait (blocking) for its READY frame, which is returned."""
        ctx = multiprocessing.get_context("spawn")
        # Not a daemon: a TP driver spawns its rank processes itself (daemons may not have children).
        self.process = ctx.Process(target=run_engine_process, name="dsv4-engine-core", daemon=False,
                                   args=(self.config, self._commands_addr, self._events_addr, os.getpid(),
                                         logging.getLogger().getEffectiveLevel()))
        self.process.start()
        atexit.register(_kill_at_exit, weakref.ref(self))
        waited = 0
        while not self._events.poll(POLL_MS):
            waited += POLL_MS
            if not self.process.is_alive():
                raise RuntimeError(f"the engine process exited during startup (code {self.process.exitcode}; "
                                   "see the log)")
            if waited > timeout * 1000:
                self.close()
                raise TimeoutError(f"the engine process did not start within {timeout} s")
        frame = ipc.unpack(self._events.recv())
        if frame[0] == ipc.DEAD:
            self.close()
            raise RuntimeError(frame[1])
        self._thread = threading.Thread(target=self._receive, name="dsv4-engine-events", daemon=True)
        self._thread.start()
        return frame

    def close(self, timeout: float = 30.0) -> None:
        """Ask the process to stop (after the server drained), wait for it, then kill it if needed."""
        self._closing = True
        if self.process is not None and self.process.is_alive():
            self.send(("stop",))
            self.process.join(timeout)
            if self.process.is_alive():
                log.warning("the engine process did not stop in %.0f s: killing it", timeout)
                self.process.kill()
                self.process.join(5)
        if self._thread is not None:
            self._thread.join(2)
        self._fail_calls(RuntimeError("the engine process has stopped"))
        self._commands.close(linger=0)
        self._events.close(linger=0)
        self._zmq.term()

    # ---- commands ----------------------------------------------------------------------------
    def send(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            data = ipc.encode_add(*cmd[1:])
        else:
            data = ipc.pack(list(cmd))
        with self._send_lock:
            if not self._commands.closed:
                self._commands.send(data)

    def call(self, what, args=None) -> Future:
        """``what(core)`` (a picklable callable), or the core attribute path ``what`` (a tuple of
        names) read, or called with ``args`` = (positional, keyword), in the engine process
        between steps. A concurrent Future of the result."""
        future: Future = Future()
        if self._lost is not None:
            future.set_exception(RuntimeError(self._lost))
            return future
        call_id = next(self._call_ids)
        self._calls[call_id] = future
        self.send((ipc.CALL, call_id, pickle.dumps((what, args))))
        return future

    # ---- the receiver thread -----------------------------------------------------------------
    def _receive(self) -> None:
        while True:
            try:
                ready = self._events.poll(POLL_MS)
            except zmq.ZMQError:  # closed under us
                return
            if ready:
                try:
                    frame = ipc.unpack(self._events.recv())
                    if frame[0] == ipc.REPLY:
                        self._settle(frame[1], frame[2])
                    else:
                        self._on_frame(frame)
                except Exception as e:  # a frame we cannot read: fail loudly rather than hang every client
                    log.exception("bad frame from the engine process")
                    self._lost = f"engine failure: unreadable frame from the engine process ({e})"
                    self._fail_calls(RuntimeError(self._lost))
                    self._on_lost(self._lost)
                    return
                continue
            if self._closing:
                return
            if not self.process.is_alive():
                self._lost = f"engine failure: the engine process exited with code {self.process.exitcode}"
                log.error("%s", self._lost)
                self._fail_calls(RuntimeError(self._lost))
                self._on_lost(self._lost)
                return

    def _settle(self, call_id: int, payload: bytes) -> None:
        future = self._calls.pop(call_id, None)
        if future is None:
            return
        result, error = pickle.loads(payload)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _fail_calls(self, error: BaseException) -> None:
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(error)


class RemoteCore:
    """``AsyncEngine.core`` when the core runs in the engine process (debugging, tests): an
    attribute path whose call (or item read) runs there between steps, synchronously."""

    def __init__(self, channel: EngineChannel, path: tuple = ()):
        self._channel, self._path = channel, path

    def __getattr__(self, name: str) -> "RemoteCore":
        if name.startswith("__"):
            raise AttributeError(name)
        return RemoteCore(self._channel, self._path + (name,))

    def __call__(self, *args, **kwargs):
        return self._channel.call(self._path, (args, kwargs)).result(CALL_TIMEOUT)

    def __getitem__(self, key):
        return self.value()[key]

    def value(self):
        """The attribute's value itself (pickled over)."""
        return self._channel.call(self._path).result(CALL_TIMEOUT)


def _kill_at_exit(ref) -> None:
    """At interpreter exit, before multiprocessing joins its non-daemon children: never hang on
    an engine process nobody stopped."""
    channel = ref()
    if channel is not None and channel.process is not None and channel.process.is_alive():
        channel._closing = True
        channel.process.kill()
        channel.process.join(5)
