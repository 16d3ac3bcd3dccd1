"""Errors on the wire: the OpenAI envelope with DeepSeek's status codes. The only place that
picks HTTP codes.

Envelope: `{"error": {"message", "type", "param", "code"}}` with string `code`s (DeepSeek style,
not vLLM's integer). Status policy (api-surface §6):
- 400 invalid_request_error: malformed JSON, invalid values, template errors, context length,
  unknown model ("Model Not Exist", as older DeepSeek did), `prefix` outside /beta.
- 422 invalid_request_error: the body does not deserialize into the request type (wrong types,
  missing fields) — DeepSeek answers these with 422 "Failed to deserialize the JSON body".
- 401 authentication_error (the message never repeats any part of the key given), 404 for
  unknown routes, 408/413/415 for slow, oversized or non-JSON bodies (server/http_guard.py),
  429 rate_limit_reached (queue full) and 503 server_overloaded (shutting down, engine
  failure), both with `Retry-After`; 500 server_error for anything unexpected (logged once, by
  server/http_guard.py).
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.chat_template import ChatTemplateError

INVALID_REQUEST = "invalid_request_error"
RETRY_AFTER_SECONDS = 1  # in the Retry-After header of 429 and 503 answers


class APIError(Exception):
    """An error the client should see: HTTP status plus the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str = INVALID_REQUEST, headers: dict | None = None):
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None,
               code: str = INVALID_REQUEST) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(message: str, param: str | None = None) -> APIError:
    """400: the request is well-formed JSON of the right shape, but a value is not acceptable."""
    return APIError(400, message, param=param)


def invalid_parameters(message: str, param: str | None = None) -> APIError:
    """422: the body does not deserialize into the request type."""
    return APIError(422, message, param=param)


def authentication_failed(given_key: str | None) -> APIError:
    if given_key:  # no characters of the key: an error body or log line must not leak it
        message = "Authentication Fails, the api key given is invalid"
    else:
        message = "Authentication Fails, no api key provided (use 'Authorization: Bearer <key>')"
    return APIError(401, message, type="authentication_error")


def queue_full(detail: str = "the request queue is full") -> APIError:
    return APIError(429, f"Rate Limit Reached: {detail}, retry after a wait",
                    type="rate_limit_error", code="rate_limit_reached",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def unavailable(reason: str | None = None) -> APIError:
    why = f" ({reason})" if reason else " (shutting down or engine failure)"
    return APIError(503, f"Server Overloaded: the server is not accepting requests{why}, retry after a wait",
                    type="server_error", code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def model_not_found(model: str, known: list[str]) -> APIError:
    return APIError(400, f"Model Not Exist: {model!r}; this server serves {known}", param="model",
                    code="model_not_found")


# Union members in pydantic locations (`stop.str`, `stop.list[str]`) are not parameters.
_UNION_TAG = re.compile(r"(str|int|float|bool|none|list\[.*\]|dict\[.*\])")


def _location(loc: tuple) -> str | None:
    """Pydantic's error location as the parameter path clients know: messages[0].role."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and _UNION_TAG.fullmatch(p))]
    path = ""
    for part in parts:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path or None


def from_validation_error(err: ValidationError | RequestValidationError) -> APIError:
    """The first pydantic problem as a 422 naming the parameter."""
    first = err.errors()[0]
    param = _location(tuple(first.get("loc", ())))
    where = f"{param}: " if param else ""
    return invalid_parameters(
        f"Failed to deserialize the JSON body into the target type: {where}{first.get('msg')}", param)


# Anthropic Messages routes answer in Anthropic's error shape (same status codes).
ANTHROPIC_PATHS = ("/anthropic/", "/v1/messages")
_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                          404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error",
                          429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_body(error: APIError) -> dict:
    """`{"type": "error", "error": {"type", "message"}}` (Anthropic's envelope and type names)."""
    kind = _ANTHROPIC_ERROR_TYPES.get(error.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def error_body_for(path: str, error: APIError) -> dict:
    """The error body in the envelope the route's clients expect (Anthropic or OpenAI)."""
    return anthropic_error_body(error) if path.startswith(ANTHROPIC_PATHS) else error.to_dict()


def _response(error: APIError, request: Request, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body_for(request.url.path, error), status_code=error.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _response(exc, request, exc.headers)

    @app.exception_handler(ChatTemplateError)
    async def _template_error(request: Request, exc: ChatTemplateError):
        return _response(invalid_request(str(exc), exc.param), request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _response(from_validation_error(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else INVALID_REQUEST
        return _response(APIError(exc.status_code, str(exc.detail), code=code), request, getattr(exc, "headers", None))
