"""HTTP-level guards in front of the app: slow clients, oversized or non-JSON bodies, and the
single place that turns an unexpected exception into a 500.

- `RequestGuard` (ASGI middleware) reads a request's whole body before the app sees it: a
  `Content-Length` over `max_body_bytes`, or a body that grows past it, is a 413 without
  buffering more; a body not complete within `body_timeout` seconds is a 408; a `Content-Type`
  that is not JSON is a 415 (no content type is read as JSON, as curl users expect). The app
  then gets the body in one message and later `receive()` calls go to the client (disconnects).
  Any exception the app's handlers did not turn into a response is logged here, once with its
  traceback, and answered with the 500 envelope (or, if the response had started, the
  connection is just ended).
- `header_timeout_protocol(seconds)` is uvicorn's h11 protocol with a deadline for the request
  line and headers (uvicorn has none: a client sending a partial header held its connection
  forever). The deadline runs from the connection's start, and again from the first byte of each
  later request on a kept-alive connection; on expiry the client gets a 408 and is disconnected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import APIError, error_body_for
from server.limits import RequestLimits

logger = logging.getLogger(__name__)

_BODY_METHODS = {"POST", "PUT", "PATCH"}


def _is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime in ("", "application/json") or mime.endswith("+json")


class RequestGuard:
    def __init__(self, app, limits: RequestLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        if scope["method"] in _BODY_METHODS:
            outcome = await self._read_body(scope, receive)
            if isinstance(outcome, APIError):
                return await _send_error(send, scope["path"], outcome, close=True)
            if outcome is None:  # the client left while sending
                return
            receive = _replay(outcome, receive)
        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started:
                await _send_error(send, scope["path"], APIError(
                    500, "Server Error: an internal error occurred, retry after a wait", type="server_error",
                    code="server_error"))

    async def _read_body(self, scope, receive) -> bytes | APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not _is_json(headers.get("content-type", "")):
            return APIError(415, f"Unsupported Media Type: send the body as JSON with 'Content-Type: "
                            f"application/json', got {headers['content-type'][:64]!r}",
                            code="unsupported_media_type")
        limit = self.limits.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return _too_large(limit)
        deadline = time.monotonic() + self.limits.body_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return APIError(408, f"Request Timeout: the body did not arrive within "
                                f"{self.limits.body_timeout:g} s", code="request_timeout")
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"Request Entity Too Large: the body exceeds {limit} bytes (--max-body-bytes)",
                    code="request_too_large")


def _replay(body: bytes, receive):
    delivered = False

    async def replayed():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_error(send, path: str, error: APIError, close: bool = False) -> None:
    body = json.dumps(error_body_for(path, error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the unread rest of the body must not be taken for the next request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s")


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline of `seconds` for each request's line and headers."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # headers still incomplete
                self._arm_header_timer()
            else:
                self._cancel_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._on_header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.our_state is h11.IDLE:  # not inside a response: there is room for a 408
                body = json.dumps(APIError(408, f"Request Timeout: the request headers did not arrive within "
                                                f"{seconds:g} s", code="request_timeout").to_dict()).encode()
                self.transport.write(_TIMEOUT_RESPONSE % (len(body), body))
            self.transport.close()

    return HeaderTimeoutH11Protocol
