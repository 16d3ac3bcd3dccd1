"""Driving engine requests for one API request, and putting the result on the wire.

`EngineJob` submits one engine request per choice (`<id>-<i>`); the engine thread puts their
`RequestOutput`s straight into the job's one queue (`AsyncEngine.submit`), and the job aborts
whatever is unfinished when closed (client gone, error, done).
`sse_response` frames chunks as SSE (`data: <json>`, `data: [DONE]`) with a `: keep-alive`
comment whenever nothing was sent for one keep-alive interval — while queued, during a long
prefill, and while tokens arrive that produce no chunk yet; a stream that fails after it
started ends with an error event and `data: [DONE]`. `json_response` returns a plain JSON
body, or — when the reply is not ready within one interval (queued, long prefill, long
reasoning) — commits a 200 and writes a blank line every interval until the JSON is ready
(DeepSeek's keep-alive for non-streaming requests). Either way a client disconnect closes the
job, which aborts the engine requests and frees their KV cache.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse

from engine.async_engine import EngineDead, EngineOverloaded
from server.errors import APIError, invalid_request, queue_full, unavailable
from server.metrics import RequestTimings

logger = logging.getLogger(__name__)

SSE_SEPARATOR = "\n"
TIMEOUT = object()  # `EngineJob.next` found nothing within its timeout
_CLOSED = object()  # queued by `EngineJob.close` to wake a waiting consumer


class JobClosed(Exception):
    """The job was closed (client gone) while a consumer waited for output."""


@dataclass
class ChoiceProgress:
    """Timing of one engine request, for metrics (engine clock for stamps, gaps measured here)."""

    finished: bool = False
    last_output: object = None  # latest RequestOutput
    last_seen: float | None = None
    gaps: list[float] = field(default_factory=list)

    def timings(self, finish_reason: str) -> RequestTimings | None:
        out = self.last_output
        metrics = getattr(out, "metrics", None)
        if metrics is None:
            return None
        finished = metrics.finished_time
        if finished is None:
            stamps = [metrics.arrival_time, metrics.first_scheduled_time, metrics.first_token_time]
            finished = max(t for t in stamps if t is not None)
        try:
            return RequestTimings(
                arrival_time=metrics.arrival_time, finished_time=finished, finish_reason=finish_reason,
                num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
                num_generation_tokens=out.num_output_tokens,
                first_scheduled_time=metrics.first_scheduled_time,
                first_token_time=metrics.first_token_time if metrics.first_scheduled_time is not None else None,
                inter_token_latencies=tuple(self.gaps))
        except ValueError as err:  # inconsistent stamps must never fail a request
            logger.warning("request timings not recorded: %s", err)
            return None


class _Inbox:
    """The job's fan-in queue, one event loop only. Unlike `wait_for(Queue.get(), t)` (a task and
    a timer per call in Python 3.11), a ready item costs one `popleft` and a wait one future."""

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout: float | None):
        """The oldest item; TimeoutError after `timeout` seconds (None: wait for ever)."""
        while not self._items:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self._items.popleft()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class EngineJob:
    """The engine requests (one per choice) behind one API request."""

    def __init__(self, engine, request_ids: list[str], prompt_ids: list[int], params_list: list,
                 cache_salt: str = "", cache_hints=None):
        self._engine = engine
        self.request_ids = request_ids
        self.progress = [ChoiceProgress() for _ in request_ids]
        self._queue = _Inbox()
        self._closed = False
        for index, (rid, params) in enumerate(zip(request_ids, params_list)):
            try:
                engine.submit(rid, prompt_ids, params, functools.partial(self._put, index), cache_salt=cache_salt,
                              cache_hints=cache_hints)
            except Exception as exc:  # handed to the consumer, which owns the error policy
                self._put(index, exc)

    @property
    def is_done(self) -> bool:
        return all(p.finished for p in self.progress)

    def _put(self, index: int, item) -> None:
        self._queue.put_nowait((index, item))

    async def next(self, timeout: float | None = None):
        """The next `(choice_index, RequestOutput)`, or TIMEOUT. Engine errors are raised here:
        `EngineOverloaded` as 429, `EngineDead` as 503, `ValueError` (a request that can never
        run) as 400."""
        try:
            entry = await self._queue.get(timeout)
        except TimeoutError:
            return TIMEOUT
        if entry is _CLOSED:
            raise JobClosed()
        index, item = entry
        progress = self.progress[index]
        if isinstance(item, Exception):
            progress.finished = True
            raise _engine_error(item)
        now = time.monotonic()
        if progress.last_seen is not None and item.new_token_ids:
            progress.gaps.append(now - progress.last_seen)
        if item.new_token_ids:
            progress.last_seen = now
        progress.last_output = item
        progress.finished = progress.finished or item.finished
        return index, item

    def close(self) -> None:
        """Abort the unfinished engine requests and wake any waiting consumer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for rid, progress in zip(self.request_ids, self.progress):
            if not progress.finished:
                self._engine.abort(rid)
        self._queue.put_nowait(_CLOSED)


def _engine_error(exc: Exception) -> Exception:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloaded):
        return queue_full(str(exc))
    if isinstance(exc, EngineDead):
        return unavailable(str(exc))
    if isinstance(exc, ValueError):
        return invalid_request(str(exc))
    return exc  # unexpected: the catch-all handler logs it and answers 500


class Heartbeat:
    """When the next keep-alive is due: `interval` seconds after anything was last sent."""

    def __init__(self, interval: float):
        self.interval = interval
        self._last_sent = time.monotonic()

    def sent(self) -> None:
        self._last_sent = time.monotonic()

    def timeout(self) -> float:
        """Seconds until a keep-alive is due (0: due now)."""
        return max(0.0, self._last_sent + self.interval - time.monotonic())

    def due(self) -> bool:
        return self.timeout() == 0.0


async def wait_first(job: EngineJob, interval: float):
    """The first output, or TIMEOUT after `interval`; closes the job if that raises."""
    try:
        return await job.next(timeout=interval)
    except BaseException:
        job.close()
        raise


# ---------------------------------------------------------------------------- SSE


@dataclass(frozen=True)
class SseDialect:
    """How one API frames its stream: OpenAI chat chunks (`data:` only, `data: [DONE]` last)
    or named events (`event: <type>` before each `data:`, as Anthropic and OpenAI Responses
    stream, with no end marker). `error` turns a late APIError into the in-band event."""

    named: bool = False
    done: str | None = "[DONE]"
    error: Callable[[APIError], dict] = APIError.to_dict


CHAT_CHUNKS = SseDialect()


def _sse_event(event: dict, dialect: SseDialect) -> ServerSentEvent | str:
    data = json.dumps(event, ensure_ascii=False)
    return ServerSentEvent(data, event=event["type"], sep=SSE_SEPARATOR) if dialect.named else data


def sse_response(events: AsyncIterator[dict | None], job: EngineJob, request_id: str,
                 drain_timeout: float, on_close: Callable[[], None] | None = None,
                 dialect: SseDialect = CHAT_CHUNKS) -> EventSourceResponse:
    """Frame `events` (dicts become `data: <json>`) then the dialect's end marker. `events`
    yields None while the request is waiting; each None becomes a `: keep-alive` comment."""

    async def framed():
        try:
            async for event in events:
                if event is None:
                    yield ServerSentEvent(comment="keep-alive", sep=SSE_SEPARATOR)
                else:
                    yield _sse_event(event, dialect)
            if dialect.done is not None:
                yield dialect.done
        except JobClosed:
            return
        except APIError as err:  # headers are out: report in-band, which the SDKs raise
            yield _sse_event(dialect.error(err), dialect)
            if dialect.done is not None:
                yield dialect.done  # a clean end, so clients do not wait for more
        except Exception:
            logger.exception("stream %s failed", request_id)
            yield _sse_event(dialect.error(_stream_failure()), dialect)
            if dialect.done is not None:
                yield dialect.done
        finally:
            _close(job, on_close)

    # Shutdown: streams get `drain_timeout` to finish before sse-starlette cancels them.
    return EventSourceResponse(framed(), ping=0, sep=SSE_SEPARATOR, shutdown_event=anyio.Event(),
                               shutdown_grace_period=drain_timeout, headers={"x-request-id": request_id})


def _close(job: EngineJob, on_close: Callable[[], None] | None) -> None:
    job.close()
    if on_close is not None:
        try:
            on_close()
        except Exception:  # bookkeeping must never break a response
            logger.exception("on_close callback failed")


def _stream_failure() -> APIError:
    return APIError(500, "Server Error: generation failed, retry after a wait", type="server_error",
                    code="server_error")


# ---------------------------------------------------------------------------- plain JSON


async def _watch_disconnect(request: Request, job: EngineJob) -> None:
    """Read ASGI messages until the client goes away, then abort the job."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            logger.info("client disconnected; aborting %s", job.request_ids)
            job.close()
            return


async def json_response(request: Request, job: EngineJob, first, consume: Callable[[int, object], None],
                        build_body: Callable[[], dict], interval: float, request_id: str,
                        on_close: Callable[[], None] | None = None) -> Response:
    """Collect every output of `job` (`first` already taken by `wait_first`) into one JSON body.

    `consume(index, output)` folds an output into the caller's state; `build_body()` renders
    the response once the job is done.
    """
    headers = {"x-request-id": request_id}
    heartbeat = Heartbeat(interval)
    if first is not TIMEOUT:
        # Collect for one interval; a reply not ready by then (long reasoning) switches to the
        # blank-line keep-alive body below instead of leaving the connection silent.
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        body = None
        try:
            consume(*first)
            while not job.is_done:
                item = await job.next(timeout=heartbeat.timeout())
                if item is TIMEOUT:
                    break
                consume(*item)
            else:
                body = build_body()
        except JobClosed:
            _close(job, on_close)
            return Response(status_code=204)  # nobody is listening any more
        except BaseException:
            _close(job, on_close)
            raise
        finally:
            watcher.cancel()
        if body is not None:
            _close(job, on_close)
            return JSONResponse(body, headers=headers)

    async def stream_body():
        # NOTE: status 200 is already sent; late errors go in the body as the error envelope.
        try:
            yield b"\n"  # one interval has passed already
            heartbeat.sent()
            while not job.is_done:
                item = await job.next(timeout=heartbeat.timeout())
                if item is not TIMEOUT:
                    consume(*item)
                if heartbeat.due():  # time-based: outputs arriving does not reset it
                    yield b"\n"
                    heartbeat.sent()
            yield json.dumps(build_body(), ensure_ascii=False).encode()
        except JobClosed:
            return
        except APIError as err:
            yield json.dumps(err.to_dict()).encode()
        except Exception:
            logger.exception("request %s failed", request_id)
            yield json.dumps(_stream_failure().to_dict()).encode()
        finally:
            _close(job, on_close)

    return StreamingResponse(stream_body(), media_type="application/json", headers=headers)


async def keepalive_events(job: EngineJob, first, interval: float,
                           render: Callable[[int, object], list[dict]]) -> AsyncIterator[dict | None]:
    """Outputs of `job` rendered to chunks by `render`; None (a keep-alive) whenever nothing
    was yielded for `interval`, whether or not outputs arrived meanwhile."""
    heartbeat = Heartbeat(interval)
    item = first
    while True:
        if item is not TIMEOUT:
            for chunk in render(*item):
                yield chunk
                heartbeat.sent()
            if job.is_done:
                return
        if item is TIMEOUT or heartbeat.due():  # TIMEOUT: one interval passed in silence
            yield None
            heartbeat.sent()
        item = await job.next(timeout=heartbeat.timeout())
