"""One API request in flight, shared by chat and text completions.

request → `RunPlan` (validated by the endpoint) → `Run` submits one engine request per choice
(`EngineJob`) → each `RequestOutput` is folded into its `Choice` → usage and billing once
(`settle`) → finish reasons. The endpoints say only how a choice reads an output and what the
reply and its chunks look like (`consume`, `body`, `render`).

Finish reasons (DeepSeek): `length` when the engine hit max_tokens or the context window;
`insufficient_system_resource` when the engine aborted or failed the request ("interrupted");
otherwise the endpoint's natural reason (`stop`, or `tool_calls` for chat with a complete call).
Metrics count aborts and errors as such.
"""

from __future__ import annotations

import logging
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from engine.core.request import CacheHints
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.protocol import UsageCounts
from server.serve_config import ServerContext
from server.streaming import (
    CHAT_CHUNKS, EngineJob, SseDialect, json_response, keepalive_events, sse_response, wait_first,
)

logger = logging.getLogger(__name__)

INTERRUPTED = "insufficient_system_resource"


def envelope(kind: str, reply_id: str, created: int, model: str, system_fingerprint: str, choices: list[dict]) -> dict:
    """The fields every reply and chunk of both endpoints start with."""
    return {"id": reply_id, "object": kind, "created": created, "model": model, "system_fingerprint": system_fingerprint,
            "choices": choices}


@dataclass(kw_only=True)
class RunPlan:
    """What every validated request hands the engine, and how it wants the answer."""

    model: str
    prompt_ids: list[int]
    params: list[SamplingParams]  # one per choice
    cache_salt: str
    cache_hints: CacheHints | None = None  # what the prefix cache should know about reuse
    stream: bool
    include_usage: bool


@dataclass(kw_only=True)
class Choice:
    """How one choice's engine request ended (the endpoint adds its parse)."""

    index: int
    engine_finish: str | None = None  # the engine's reason, once finished
    last_output: RequestOutput | None = None

    def observe(self, out: RequestOutput) -> None:
        self.last_output = out
        if out.finished:
            self.engine_finish = out.finish_reason or "abort"  # engine aborts carry no reason
            if self.engine_finish in ("abort", "error"):
                logger.warning("request %s ended by the engine: %s (%s)", out.request_id, self.engine_finish,
                               out.stop_reason)

    def natural_finish(self) -> str:
        return "stop"

    @property
    def finish_reason(self) -> str:
        if self.engine_finish == "length":
            return "length"
        if self.engine_finish in ("abort", "error"):
            return INTERRUPTED
        return self.natural_finish()

    @property
    def metric_reason(self) -> str:
        if self.engine_finish in (None, "abort"):
            return "abort"
        return "error" if self.engine_finish == "error" else self.finish_reason


class Run(ABC):
    """The choices of one request, their engine job, and the bill (settled once)."""

    dialect: SseDialect = CHAT_CHUNKS  # how this API frames its stream
    api: str = "chat_completions"  # the `api` label of its metrics

    def __init__(self, ctx: ServerContext, plan: RunPlan, choices: list[Choice]):
        self.ctx = ctx
        self.plan = plan
        self.id = str(uuid.uuid4())
        self.created = int(time.time())
        self.choices = choices
        self.job = EngineJob(ctx.engine, [f"{self.id}-{i}" for i in range(len(plan.params))],
                             plan.prompt_ids, plan.params, plan.cache_salt, plan.cache_hints)
        self._usage: dict | None = None
        self._accounted = False

    # ---- what an endpoint defines ------------------------------------------------------------

    @abstractmethod
    def consume(self, index: int, out: RequestOutput) -> None:
        """Fold one output into choice `index` (non-streaming)."""

    @abstractmethod
    def body(self) -> dict:
        """The non-streaming reply, once every choice has finished."""

    @abstractmethod
    def render(self, index: int, out: RequestOutput) -> list[dict]:
        """The stream chunks for one output of choice `index`."""

    def reasoning_tokens(self) -> int:
        return 0

    def before_settle(self) -> None:
        """Last look at the finished choices before billing (e.g. count tool-call problems)."""

    # ---- shared ------------------------------------------------------------------------------

    def usage(self) -> UsageCounts:
        """The prompt once (choice 0's cache split), every choice's output."""
        first = self.choices[0].last_output
        return UsageCounts(
            prompt_tokens=first.num_prompt_tokens if first else len(self.plan.prompt_ids),
            cache_hit_tokens=first.num_cached_tokens if first else 0,
            completion_tokens=sum(c.last_output.num_output_tokens for c in self.choices if c.last_output),
            reasoning_tokens=self.reasoning_tokens())

    def settle(self) -> dict:
        """Bill the request and feed metrics (once); the usage object."""
        if self._usage is None:
            self.before_settle()
            counts = self.usage()
            cost = self.ctx.account(self.job.progress, [c.metric_reason for c in self.choices], counts, self.api)
            self._usage = counts.to_dict(cost)
            self._accounted = True
        return self._usage

    def on_closed(self) -> None:
        """Client gone or failure before the end: record the requests, bill nothing."""
        if not self._accounted:
            self._accounted = True
            self.ctx.account(self.job.progress, [c.metric_reason for c in self.choices], None, self.api)

    def envelope(self, kind: str, choices: list[dict]) -> dict:
        return envelope(kind, self.id, self.created, self.plan.model, self.ctx.system_fingerprint, choices)

    async def respond(self, request: Request) -> Response:
        """Wait one keep-alive interval for the first output, then stream (SSE) or answer JSON."""
        interval = self.ctx.config.keep_alive_interval
        first = await wait_first(self.job, interval)
        if self.plan.stream:
            events = keepalive_events(self.job, first, interval, self.render)
            return sse_response(events, self.job, self.id, self.ctx.config.drain_timeout, on_close=self.on_closed,
                                dialect=self.dialect)
        return await json_response(request, self.job, first, self.consume, self.body, interval, self.id,
                                   on_close=self.on_closed)
