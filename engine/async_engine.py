"""AsyncEngine: the server-facing engine. By default the ``EngineCore`` (scheduler, KV manager,
model runner, TP rank 0) runs in its own spawned process (engine/engine_process.py) and this
object talks to it over ZeroMQ (engine/engine_channel.py): commands go out, one frame per engine
step comes back with every output of that step. ``engine_process=False`` (or an explicit
``core``) keeps the old layout, the step loop in a background thread of this process (debugging).

Either way each request's ``RequestOutput`` deltas are handed to a sink on the caller's event
loop (``submit``; ``generate`` wraps one in an async iterator), one wake-up per event loop per
step; the text of each output is made there, by the request's ``TextStream`` (detokenizing,
stop strings). Commands (add, abort, finish on a stop string) are drained by the engine between
steps, so aborts land at step boundaries and the scheduler never sees concurrent mutation.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import queue
import threading
import time
from typing import AsyncIterator, Callable

from engine.core.request import CacheHints
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore
from engine import ipc
from engine.outputs import RequestOutput, StepStats
from engine.sampling_params import SamplingParams
from engine.text_stream import TextStream

log = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (HTTP 429)."""


class EngineDead(RuntimeError):
    """The engine loop stopped after a fatal error (HTTP 503)."""


StepListener = Callable[[StepStats], None]
# Gets every output of one request, then a finished one or an exception (the last call).
OutputSink = Callable[["RequestOutput | BaseException"], None]


class AsyncEngine:
    """``on_step`` (and listeners added with ``add_step_listener``) get each step's
    ``StepStats`` on the loop thread, before that step's outputs are delivered; they must
    be quick and thread-safe. A listener that raises is logged, never fatal."""

    def __init__(self, config: EngineConfig, max_queue: int = 1024, core: EngineCore | None = None,
                 on_step: StepListener | None = None, engine_process: bool | None = None):
        """``engine_process``: run the core in its own process (default; DSV4_ENGINE_IN_PROCESS=1
        or an explicit ``core`` switch it off)."""
        if on_step is not None and not callable(on_step):
            raise ValueError(f"on_step must be callable, got {type(on_step).__name__}")
        self.config = config
        self.max_queue = max_queue
        self.core = core
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, OutputSink]] = {}  # unfinished requests
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.fatal_error: str | None = None
        self._stats: dict = {}
        self._stats_time = 0.0
        self._step_listeners: list[StepListener] = [on_step] if on_step is not None else []
        if engine_process is None:
            engine_process = core is None and os.environ.get("DSV4_ENGINE_IN_PROCESS", "") in ("", "0")
        if engine_process and core is not None:
            raise ValueError("an explicit core runs in this process: engine_process must be False")
        self.engine_process = engine_process
        self._channel = None  # EngineChannel, once the engine process started
        self._remote: dict = {}  # what the engine process reported when ready

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self.engine_process:
            await self._start_process()
            return
        if self.core is None:
            # Model loading is slow and blocking: keep it off the event loop.
            self.core = await asyncio.to_thread(EngineCore, self.config)
        self._stats = self.core.stats()
        self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting, let running requests finish (up to ``drain_timeout``), stop the loop."""
        self._stopping = True
        deadline = time.monotonic() + drain_timeout
        while self._streams and time.monotonic() < deadline and self.fatal_error is None:
            await asyncio.sleep(0.02)
        for rid in list(self._streams):
            self.abort(rid)
        if self._channel is not None:
            await asyncio.to_thread(self._channel.close)
            return
        self._inbox.put(("stop",))
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        if self.core is not None:
            self.core.shutdown()

    async def _start_process(self) -> None:
        from engine.default_model import default_model_dir
        from engine.engine_channel import EngineChannel, RemoteCore
        from engine.tokenizer import Tokenizer

        channel = EngineChannel(self.config, self._on_frame, self._on_engine_lost)
        _, model_config, max_model_len, defaults, has_tokenizer, stats = await asyncio.to_thread(channel.start)
        self._channel = channel
        self.core = RemoteCore(channel)
        model_dir = self.config.model or default_model_dir()
        # Tokenizing and detokenizing stay here: the server loads its own copy of the tokenizer.
        tokenizer = await asyncio.to_thread(Tokenizer.from_dir, model_dir) if has_tokenizer else None
        self._remote = dict(model_config=pickle.loads(model_config), max_model_len=max_model_len,
                            generation_defaults=tuple(defaults), tokenizer=tokenizer)
        self._stats = stats

    @property
    def engine_pid(self) -> int | None:
        """The engine process's pid (None in the in-process layout)."""
        return self._channel.pid if self._channel is not None else None

    def _engine_attr(self, name: str):
        return self._remote[name] if self._channel is not None else getattr(self.core, name)

    @property
    def tokenizer(self):
        return self._engine_attr("tokenizer")

    @property
    def model_config(self):
        return self._engine_attr("model_config")

    @property
    def generation_defaults(self) -> tuple[float, float]:
        return self._engine_attr("generation_defaults")

    @property
    def max_model_len(self) -> int:
        return self._engine_attr("max_model_len")

    @property
    def accepting(self) -> bool:
        return not self._stopping and self.fatal_error is None

    @property
    def num_in_flight(self) -> int:
        """Requests admitted and not yet finished (inbox, waiting or running)."""
        return len(self._streams)

    def interrupt_all(self, reason: str) -> None:
        """Stop accepting, abort every request in flight and end its stream with
        ``EngineDead(reason)`` (shutdown past its drain deadline)."""
        self._stopping = True
        with self._lock:
            request_ids = list(self._streams)
        for rid in request_ids:
            self.abort(rid)
            self._deliver(rid, EngineDead(reason))

    def stats(self) -> dict:
        """The latest scheduler stats, published by the loop thread after each step."""
        return dict(self._stats, in_flight=len(self._streams))

    def add_step_listener(self, listener: StepListener) -> None:
        """Also call ``listener(StepStats)`` after every step (e.g. a metrics sink)."""
        if not callable(listener):
            raise ValueError(f"listener must be callable, got {type(listener).__name__}")
        self._step_listeners = [*self._step_listeners, listener]  # copy: the loop may be iterating

    # ---- requests ------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: OutputSink,
               cache_salt: str = "", cache_hints: CacheHints | None = None) -> None:
        """Start a request: the loop thread hands each output straight to the calling event loop
        (``call_soon_threadsafe``), where the request's ``TextStream`` adds its text and passes
        it to ``sink``; no queue or task in between. The last call gets a finished output or the
        exception that ended the request. Raises EngineDead, EngineOverloaded or ValueError at
        once when the request cannot be accepted."""
        if self.fatal_error is not None:
            raise EngineDead(self.fatal_error)
        if self._stopping:
            raise EngineDead("the server is shutting down")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens but the context window is "
                             f"{self.max_model_len} tokens")
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            # Live admission: every admitted request not yet finished counts, whether it still
            # sits in the inbox, waits in the scheduler or runs (the step stats lag a step).
            capacity = self.config.max_num_seqs + self.max_queue
            if len(self._streams) >= capacity:
                raise EngineOverloaded(f"too many requests in flight ({len(self._streams)} of {capacity}: "
                                       f"{self.config.max_num_seqs} running + {self.max_queue} queued); retry later")
            self._streams[request_id] = (asyncio.get_running_loop(), self._text_sink(request_id, prompt_ids, params, sink))
        self._post(("add", request_id, list(prompt_ids), params, cache_salt, cache_hints, time.monotonic()))

    def _text_sink(self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: OutputSink) -> OutputSink:
        """``sink`` behind the request's TextStream; a stop string finishes the request in the core."""
        text = TextStream(self.tokenizer, prompt_ids, params)

        def deliver(item) -> None:
            if isinstance(item, BaseException):
                if not text.finished:
                    sink(item)
                return
            shown, stopped_now = text.apply(item)
            if stopped_now:
                self._post(("finish", request_id, shown.finish_reason, shown.stop_reason))
            if shown is not None:
                sink(shown)

        return deliver

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       cache_salt: str = "", cache_hints: CacheHints | None = None) -> AsyncIterator[RequestOutput]:
        """``submit`` as an async iterator of the request's outputs; leaving early aborts it."""
        q: asyncio.Queue = asyncio.Queue()
        self.submit(request_id, prompt_ids, params, q.put_nowait, cache_salt, cache_hints)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer went away (client disconnect, cancellation)
                self.abort(request_id)

    async def run_in_engine_thread(self, fn: Callable[[EngineCore], object]):
        """``fn(core)`` on the loop thread between steps, its result (or exception) returned
        here: a consistent view of the scheduler and the cache (e.g. ``check_integrity``)."""
        if self._channel is not None:  # in the engine process: ``fn`` must be picklable (module-level)
            return await asyncio.wrap_future(self._channel.call(fn))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("call", fn, loop, future))
        self._wake.set()
        return await future

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def _post(self, cmd: tuple) -> None:
        """A command for the engine: over the channel to the engine process, or into the
        loop thread's inbox (drained between steps either way)."""
        if self._channel is not None:
            self._channel.send(cmd)
            return
        self._inbox.put(cmd)
        self._wake.set()

    # ---- frames from the engine process (its receiver thread) -------------------------------
    def _on_frame(self, frame: list) -> None:
        if frame[0] == ipc.STEP:
            outputs, step_stats, errors, stats = ipc.decode_step(frame)
            if stats is not None:
                self._stats = stats
            if step_stats is not None:  # None: a frame of refused requests only, no step ran
                self._publish_step(step_stats)  # first, so metrics already count what clients get
            for rid, message in errors:
                self._deliver(rid, ValueError(message))
            self._deliver_step(outputs)
        elif frame[0] == ipc.DEAD:
            self._on_engine_lost(frame[1])

    def _on_engine_lost(self, message: str) -> None:
        """The engine cannot step any more (a lost rank, the process gone): fail everything,
        /health turns 503 with ``message``."""
        if self.fatal_error is None:
            self.fatal_error = message
        self._fail_all(EngineDead(self.fatal_error))

    # ---- the loop thread -------------------------------------------------------------------
    def _loop(self) -> None:
        core = self.core
        while True:
            if not self._drain_inbox():
                return
            if not core.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = core.step()
            except Exception as e:  # fatal: tell every client, stop serving
                log.exception("engine loop crashed")
                self.fatal_error = f"engine failure: {e}"
                self._fail_all(EngineDead(self.fatal_error))
                return
            # Full stats walk every live block table: refresh them at most 4×/s, and always once
            # the engine goes idle (so a finished run is reflected before clients hear of it).
            now = time.monotonic()
            if not core.has_unfinished() or now - self._stats_time >= 0.25:
                self._stats, self._stats_time = core.stats(), now
            self._publish_step(core.last_step_stats)  # first, so metrics already count what clients get
            self._deliver_step(outputs)

    def _publish_step(self, stats: StepStats) -> None:
        for listener in self._step_listeners:
            try:
                listener(stats)
            except Exception:  # a metrics bug must not take the engine down
                log.exception("step listener %r failed", listener)

    def _drain_inbox(self) -> bool:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if cmd[0] == "stop":
                return False
            if cmd[0] == "add":
                _, rid, ids, params, salt, hints, arrival = cmd
                if rid not in self._streams:  # cancelled before it reached the loop
                    continue
                try:
                    self.core.add_request(rid, ids, params, cache_salt=salt, arrival_time=arrival, cache_hints=hints)
                except ValueError as e:
                    self._deliver(rid, e)
            elif cmd[0] == "abort":
                self.core.abort(cmd[1])
            elif cmd[0] == "finish":
                self.core.finish_request(*cmd[1:])
            elif cmd[0] == "call":
                _, fn, loop, future = cmd
                try:
                    result, error = fn(self.core), None
                except Exception as e:  # the caller's problem, not the engine's
                    result, error = None, e
                _resolve(loop, future, result, error)

    def _deliver(self, request_id: str, item) -> None:
        last = isinstance(item, BaseException) or item.finished
        with self._lock:
            target = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if target is not None:
            loop, sink = target
            try:
                loop.call_soon_threadsafe(sink, item)
            except RuntimeError:  # the client's loop is closed
                pass

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs: one wake-up per event loop per step (not one per output)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                rid = out.request_id
                target = self._streams.pop(rid, None) if out.finished else self._streams.get(rid)
                if target is not None:
                    batches.setdefault(target[0], []).append((target[1], out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_run_sinks, items)
            except RuntimeError:  # the client's loop is closed
                pass

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            targets = list(self._streams.items())
        for rid, _ in targets:
            self._deliver(rid, exc)


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result, error) -> None:
    def settle():
        if future.done():  # the caller gave up waiting
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's loop is closed
        pass


def _run_sinks(items: list) -> None:
    for sink, item in items:
        try:
            sink(item)
        except Exception:  # one consumer's bug must not starve the others of this step
            log.exception("output sink failed")
