"""Serving with uvicorn, and shutting down without cutting anyone off silently.

`DrainingServer` replaces uvicorn's shutdown order (close the listening socket, then wait)
with one a load balancer can follow. On the first SIGTERM/SIGINT (or `begin_drain()`):

1. the app starts draining: `/health` answers 503 and new requests get 503 + Retry-After,
   while the socket keeps accepting (a balancer polling /health sees 503, not "refused");
2. running requests get until `drain_timeout - cut_margin` to finish;
3. whatever still runs is interrupted: streams end with an error event and `data: [DONE]`,
   waiting non-streaming requests get a 503; their engine requests are aborted;
4. then uvicorn's own shutdown runs (sockets closed, connections ended, the app's lifespan
   stops the engine) and the process exits with status 0.

A second signal exits at once (uvicorn's force exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time

import uvicorn

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def cut_margin(drain_timeout: float) -> float:
    """Seconds before the drain deadline at which running requests are interrupted, so their
    final events are out before the deadline."""
    return min(1.0, drain_timeout / 4)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx, drain_timeout: float):
        super().__init__(config)
        self._ctx = ctx
        self._drain_timeout = drain_timeout
        self._drain_requested = False
        self._drain_task: asyncio.Task | None = None

    def begin_drain(self) -> None:
        """Start the drain (thread-safe: it only sets a flag the server loop polls)."""
        self._drain_requested = True

    @property
    def drain_done(self) -> bool:
        return self._drain_task is not None and self._drain_task.done()

    # ---- uvicorn hooks -------------------------------------------------------------------

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the captured signal after a graceful exit (status 143); a drained
        # server has shut down as asked, so it exits normally instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if self._drain_requested:
            self.force_exit = True
            self.should_exit = True
        else:
            logger.info("received %s: draining (up to %g s)", signal.Signals(sig).name, self._drain_timeout)
            self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())
        return await super().on_tick(counter)

    # ---- the drain -----------------------------------------------------------------------

    async def _drain(self) -> None:
        ctx = self._ctx
        ctx.is_draining = True
        deadline = time.monotonic() + self._drain_timeout
        cut_at = deadline - cut_margin(self._drain_timeout)
        engine = ctx.engine
        while engine.num_in_flight and time.monotonic() < cut_at:
            await asyncio.sleep(0.02)
        if engine.num_in_flight:
            logger.warning("drain deadline: interrupting %d running requests", engine.num_in_flight)
            engine.interrupt_all("the server is shutting down")
        while engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # let the last final events reach the sockets
        self.should_exit = True


def build_server(app, host: str, port: int, log_level: str, drain_timeout: float, limits) -> DrainingServer:
    """A `DrainingServer` for `app` (created by `server.app.create_app`) with the HTTP limits."""
    from server.http_guard import header_timeout_protocol

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            http=header_timeout_protocol(limits.header_timeout),
                            limit_concurrency=limits.max_connections,
                            timeout_graceful_shutdown=max(1, int(cut_margin(drain_timeout)) + 1))
    return DrainingServer(config, app.state.ctx, drain_timeout)
