"""The FastAPI app: routes under every base URL clients use, auth, lifespan. Handlers stay thin.

Routes (api-surface §1, §5):
- `POST /chat/completions` under `/`, `/v1`, `/beta`, `/v1/beta` (`prefix` only under beta);
- `POST /completions` (FIM) under `/v1`, `/beta`, `/v1/beta`;
- `POST /anthropic/v1/messages`, `/v1/messages` (+ `/count_tokens`): Anthropic Messages
  (server/anthropic_messages.py; `x-api-key` accepted as the key everywhere);
- `POST /responses`, `/v1/responses`: OpenAI Responses, stateless (server/responses_api.py);
- `GET /models`, `/v1/models`; `GET /user/balance`, `/v1/user/balance` (a fixed "available" record);
- `GET /health` (200 empty; 503 while shutting down or after a fatal engine error), `/version`,
  `/metrics`;
  `POST /tokenize`, `/detokenize`.
- `GET /openapi.json`: the OpenAPI schema, request bodies included.
With `--api-key`, every route but `/health`, `/version`, `/metrics` and `/openapi.json` needs
`Authorization: Bearer <key>`. Bodies pass `server/http_guard.py` first (size, read timeout,
JSON content type, the one 500 handler). Shutdown: server/lifecycle.py (`/health` turns 503
while the socket still accepts, then running requests are drained or interrupted with a final
event). The lifespan subscribes the metrics to the engine's per-step stats and runs the
periodic one-line stats log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import json
import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from server.anthropic_messages import CountTokensRequest, MessagesRequest, count_tokens, create_message
from server.chat import api_messages, create_chat_completion, resolve_thinking
from server.chat_template import render_messages
from server.completions import create_completion
from server.errors import authentication_failed, install_error_handlers, invalid_request, unavailable
from server.http_guard import RequestGuard
from server.lifecycle import build_server
from server.metrics import Metrics
from server.protocol import (
    MAX_OUTPUT_TOKENS, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse_body,
)
from server.responses_api import ResponsesRequest, create_response
from server.serve_config import ServeConfig, ServerContext

logger = logging.getLogger(__name__)

CHAT_PREFIXES = ("", "/v1", "/beta", "/v1/beta")
COMPLETION_PREFIXES = ("/v1", "/beta", "/v1/beta")
ANTHROPIC_PREFIXES = ("/anthropic", "")  # the Anthropic SDK appends /v1/messages to its base URL
EFFORT_LEVELS = {"supported_levels": ["low", "high", "max"], "default_level": "high"}


def _version() -> str:
    try:
        return importlib.metadata.version("dsv4-serve")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


async def read_json(request: Request):
    """The decoded body; malformed JSON is a 400 (it never reaches the request type)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
        # JSON may spell lone UTF-16 surrogates (\ud800) that no tokenizer can encode.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise invalid_request(f"Invalid JSON body: {err}") from None
    except RecursionError:
        raise invalid_request("Invalid JSON body: nested too deeply") from None
    except UnicodeEncodeError:
        raise invalid_request("Invalid JSON body: a string holds a lone UTF-16 surrogate") from None
    return data


def _body_doc(model) -> dict:
    """OpenAPI `requestBody` for a route that parses its own body (handlers read raw JSON so
    that malformed input gets our 400/422 envelope, which hides the body from FastAPI)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def create_app(engine, config: ServeConfig) -> FastAPI:
    """App over an `AsyncEngine` (not started: the lifespan starts and stops it)."""
    ctx = ServerContext(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        ctx.on_engine_started()
        engine.add_step_listener(ctx.on_engine_step)
        stats_log = asyncio.create_task(ctx.log_stats_periodically()) if ctx.stats_logger is not None else None
        logger.info("serving %s (context %d tokens)", list(config.model_names), engine.max_model_len)
        try:
            yield
        finally:
            ctx.is_draining = True
            await engine.shutdown(drain_timeout=config.drain_timeout)
            if stats_log is not None:
                stats_log.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stats_log
                ctx.log_stats()  # the tail of the last window
            logger.info("engine stopped")

    app = FastAPI(title="dsv4-serve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(RequestGuard, limits=config.limits)

    async def authorize(request: Request) -> None:
        if not config.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        token = token or request.headers.get("x-api-key", "").strip()  # Anthropic clients' header
        if not any(hmac.compare_digest(token.encode(), key.encode()) for key in config.api_keys):
            raise authentication_failed(token or None)

    def is_serving() -> bool:
        return not ctx.is_draining and engine.accepting  # engine: False after a fatal error too

    async def accepting() -> None:
        if not is_serving():
            raise unavailable(engine.fatal_error or ("shutting down" if ctx.is_draining else None))

    guarded = [Depends(accepting), Depends(authorize)]

    # ---- generation ------------------------------------------------------------------------

    def chat_route(is_beta: bool):
        async def chat_completions(request: Request):
            req = parse_body(await read_json(request), ChatCompletionRequest)
            return await create_chat_completion(ctx, request, req, is_beta)
        return chat_completions

    async def completions(request: Request):
        req = parse_body(await read_json(request), CompletionRequest)
        return await create_completion(ctx, request, req)

    for prefix in CHAT_PREFIXES:
        app.add_api_route(f"{prefix}/chat/completions", chat_route(prefix.endswith("/beta")), methods=["POST"],
                          dependencies=guarded, openapi_extra=_body_doc(ChatCompletionRequest))
    for prefix in COMPLETION_PREFIXES:
        app.add_api_route(f"{prefix}/completions", completions, methods=["POST"], dependencies=guarded,
                          openapi_extra=_body_doc(CompletionRequest))

    async def messages(request: Request):
        return await create_message(ctx, request, parse_body(await read_json(request), MessagesRequest))

    async def messages_count_tokens(request: Request):
        return count_tokens(ctx, parse_body(await read_json(request), CountTokensRequest))

    async def responses(request: Request):
        return await create_response(ctx, request, parse_body(await read_json(request), ResponsesRequest))

    for prefix in ("", "/v1"):
        app.add_api_route(f"{prefix}/responses", responses, methods=["POST"], dependencies=guarded)
    for prefix in ANTHROPIC_PREFIXES:
        app.add_api_route(f"{prefix}/v1/messages", messages, methods=["POST"], dependencies=guarded)
        app.add_api_route(f"{prefix}/v1/messages/count_tokens", messages_count_tokens, methods=["POST"],
                          dependencies=[Depends(authorize)])

    # ---- models and account ----------------------------------------------------------------

    async def list_models():
        created = int(ctx.started_at)
        cards = [{"id": name, "object": "model", "owned_by": "deepseek", "created": created, "name": name,
                  "root": config.served_model_name, "context_window": engine.max_model_len,
                  "max_model_len": engine.max_model_len,
                  "max_output_tokens": min(MAX_OUTPUT_TOKENS, engine.max_model_len),
                  "input_modalities": ["text"], "output_modalities": ["text"], "effort": EFFORT_LEVELS}
                 for name in config.model_names]
        return {"object": "list", "data": cards}

    async def user_balance():
        # A self-hosted daemon has no balance; a fixed record keeps DeepSeek dashboards working.
        return {"is_available": True, "balance_infos": [
            {"currency": "USD", "total_balance": "0.00", "granted_balance": "0.00", "topped_up_balance": "0.00"}]}

    for prefix in ("", "/v1"):
        app.add_api_route(f"{prefix}/models", list_models, methods=["GET"], dependencies=[Depends(authorize)])
        app.add_api_route(f"{prefix}/user/balance", user_balance, methods=["GET"],
                          dependencies=[Depends(authorize)])

    # ---- operations ------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not is_serving():
            raise unavailable(engine.fatal_error or ("shutting down" if ctx.is_draining else None))
        # A body, so probes and people see what answers (an empty 200 looks like a proxy).
        return {"status": "ok", "model": config.served_model_name, "max_model_len": engine.max_model_len}

    @app.get("/version")
    async def version():
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.render(), media_type=Metrics.content_type)

    @app.post("/tokenize", dependencies=[Depends(authorize)], openapi_extra=_body_doc(TokenizeRequest))
    async def tokenize(request: Request):
        req = parse_body(await read_json(request), TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise invalid_request("give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            model = ctx.resolve_model(req.model or config.served_model_name)
            thinking, effort = resolve_thinking(ctx, req.thinking, req.reasoning_effort, model)
            # Same pieces as a chat request: message text never becomes a control token.
            pieces = render_messages(api_messages(req.messages), thinking=thinking, reasoning_effort=effort,
                                     tools=req.tools, add_generation_prompt=req.add_generation_prompt,
                                     replay=ctx.tool_call_replay.generated_pieces)
            tokens = await asyncio.to_thread(engine.tokenizer.encode_prompt, pieces)  # off the event loop
        else:  # a raw prompt may spell control tokens on purpose
            tokens = (await asyncio.to_thread(engine.tokenizer.encode_many, [req.prompt]))[0]
        body = {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}
        if req.return_token_strs:
            body["token_strs"] = [ctx.token_table.token_text(t) for t in tokens]
        return body

    @app.post("/detokenize", dependencies=[Depends(authorize)], openapi_extra=_body_doc(DetokenizeRequest))
    async def detokenize(request: Request):
        req = parse_body(await read_json(request), DetokenizeRequest)
        try:
            return {"prompt": engine.tokenizer.decode(req.tokens)}
        except ValueError as err:
            raise invalid_request(str(err), "tokens") from None

    return app


class BackgroundServer:
    """Serves an app with uvicorn in a daemon thread (tests, notebooks, embedding).

    `port=0` picks a free port; `base_url` is known once `start()` returns. `stop()` drains as
    SIGTERM does (server/lifecycle.py), then the engine stops; it joins the thread.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        config = app.state.ctx.config
        self._server = build_server(app, host, port, log_level, config.drain_timeout, config.limits)
        self._thread: threading.Thread | None = None
        self.host = host
        self.port = port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> str:
        self._thread = threading.Thread(target=self._server.run, name="dsv4-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during startup (see the log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {timeout} s")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self.base_url

    def begin_drain(self) -> None:
        """What SIGTERM does: /health 503, new requests 503, running ones drained then cut."""
        self._server.begin_drain()

    def stop(self, timeout: float = 60.0) -> None:
        self._server.begin_drain()
        if self._thread is not None:
            self._thread.join(timeout)
