"""FCFS scheduler with chunked prefill, prefix-cache units and recompute preemption.

Pure Python (no torch). One token-accounting rule, no prefill/decode modes: each step gives a
request the tokens that let `num_computed_tokens` catch up with `num_tokens` (prompt + outputs),
within the step's token budget. A chunk samples when it reaches the last known token.

Per step (`schedule`):
  1. running requests, FCFS: decodes first (one token each), then continuing prefills;
  2. waiting requests, FCFS, while `max_num_seqs` and the budget allow (none after a preemption);
  3. checkpoints for chunks that end on a cache-unit boundary (a multiple of `unit_interval`,
     a position the request's `CacheHints` name, or one token short of the prompt end): a
     prefill chunk never crosses one, so the snapshot is exact.
When a running request cannot get blocks, checkpoints are evicted first (in the KV manager),
then the most recently arrived running request is preempted (its KV freed, recomputed later).
A request that cannot fit even alone finishes with FINISHED_ERROR instead of looping.

`update` consumes the sampled token ids, applies stop rules and returns per-request deltas.
Call `abort_request` / `finish_request` between `update` and the next `schedule`.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.core.kv_cache_manager import BlockTable, CacheCopy, KVCacheManager
from engine.core.prefix_cache import MissReason
from engine.core.request import FinishReason, Request, RequestStatus
from engine.core.stopping import token_stop


@dataclass(frozen=True)
class SchedulerConfig:
    """The batch limits. The prefix-cache knobs (on/off, unit interval) belong to the KV manager
    alone; the scheduler reads them from there."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # finish with "length" when a sequence reaches it

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        max_len = self.max_model_len
        if max_len is not None and (not isinstance(max_len, int) or max_len < 2):
            raise ValueError(f"max_model_len must be None or an int >= 2, got {self.max_model_len!r}")


@dataclass
class ScheduledChunk:
    """Tokens fed for one request this step. start_pos == 0 means a fresh sequence: the
    runner must reset the compressor state slot before writing to it."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    sample: bool  # the chunk reaches the last known token, so the runner samples after it
    block_table: BlockTable
    # A verify chunk: the last known token then this many draft tokens (speculative decoding);
    # the runner samples after every one of them and keeps the longest agreeing prefix.
    num_drafts: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    copies_before: list[CacheCopy]  # prefix-hit restores, run in order before the forward
    copies_after: list[CacheCopy]  # checkpoint snapshots, run in order after the forward
    preempted_ids: list[str]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class RequestDelta:
    """What changed for one request in a step: its new tokens and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


@dataclass
class _StepPlan:
    budget: int
    chunks: dict[str, ScheduledChunk] = field(default_factory=dict)
    copies_before: list[CacheCopy] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_manager: KVCacheManager,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kv = kv_manager
        self._clock = clock
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival (add) order
        self._arrival_order: dict[str, int] = {}
        self._next_order = 0
        self._in_flight: set[str] = set()
        self._deltas_from_schedule: list[RequestDelta] = []
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if not isinstance(request, Request):
            raise ValueError(f"request must be a Request, got {type(request).__name__}")
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already queued")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r} must be new (WAITING, nothing computed)")
        self.requests[request.request_id] = request
        self._arrival_order[request.request_id] = self._next_order
        self._next_order += 1
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Abort a waiting or running request and free its KV; None if it is unknown."""
        return self.finish_request(request_id, FinishReason.ABORT)

    def finish_request(
        self, request_id: str, reason: FinishReason | str, stop_reason: int | str | None = None
    ) -> Request | None:
        """Finish a request from outside (a stop string matched, abort, error). A normal
        finish ("stop"/"length") keeps its KV as an end-of-output checkpoint."""
        status = RequestStatus.for_reason(reason)
        request = self.requests.get(request_id)
        if request is None:
            return None
        cache_output = (
            status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
            and request.status is RequestStatus.RUNNING
            and request_id not in self._in_flight  # a forward still writes to its slots
        )
        self._finish(request, status, stop_reason, cache_output)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def stats(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "preemptions": self.num_preemptions,
            "kv_cache": self.kv.usage().as_dict(),
            "prefix_cache": self.kv.prefix_cache.stats(),
        }

    # ---- one step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        # Snapshots planned by a step that never reached update() were never copied.
        self.kv.discard_pending_checkpoints()
        plan = _StepPlan(budget=self.config.max_num_batched_tokens)
        self._schedule_running(plan)
        if not plan.preempted_ids:  # memory is short; admitting more would only thrash
            self._schedule_waiting(plan)
        copies_after: list[CacheCopy] = []
        if self.kv.enable_prefix_cache:
            for chunk in plan.chunks.values():
                if chunk.num_drafts:  # its end is not known before verification: no snapshot
                    continue
                request = self.requests[chunk.request_id]
                end = chunk.start_pos + len(chunk.token_ids)
                if self._is_unit_end(request, end):
                    copies_after += self.kv.checkpoint(request, end)
        chunks = list(plan.chunks.values())
        self._in_flight = set(plan.chunks)
        return SchedulerOutput(
            chunks=chunks,
            copies_before=plan.copies_before,
            copies_after=copies_after,
            preempted_ids=plan.preempted_ids,
            num_batched_tokens=self.config.max_num_batched_tokens - plan.budget,
        )

    def update(self, scheduler_output: SchedulerOutput, sampled: dict[str, int],
               verified: dict[str, list[int]] | None = None) -> list[RequestDelta]:
        """Apply a finished step: advance computed tokens, commit checkpoints, append the
        sampled token of every sampling chunk, apply stop rules. Returns the deltas (also for
        requests that `schedule` finished with an error).

        A verify chunk (``num_drafts > 0``) takes ``verified[request_id]`` instead: its accepted
        drafts and the target's token after them (1 to ``num_drafts + 1`` tokens). Only the last
        known token and the accepted drafts are computed; the rest of the chunk is rolled back."""
        done = self._applicable(scheduler_output.chunks, sampled if isinstance(sampled, dict) else {}, verified or {})
        mark_computed = self.kv.mark_computed if self.kv.enable_prefix_cache else None
        stops = {}  # verify chunks: (tokens kept, stop status, stop reason)
        for request, chunk, tokens in done:
            if chunk.num_drafts:
                stops[request.request_id] = self._append_verified(request, chunk, tokens)
            else:
                request.num_computed_tokens += len(chunk.token_ids)
            if mark_computed is not None:
                mark_computed(request)
        self.kv.commit_checkpoints()  # before finishing, so end-of-output keys dedupe
        self._in_flight.clear()

        # Only now the sampled tokens: the checkpoints committed above read each request's tokens.
        deltas, self._deltas_from_schedule = self._deltas_from_schedule, []
        now, max_model_len, append = self._clock(), self.config.max_model_len, deltas.append
        for request, chunk, token in done:
            if not chunk.sample:
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            if chunk.num_drafts:
                kept, status, stop_reason = stops[request.request_id]
            else:  # one decode token: the common case, every running sequence every step
                request.output_token_ids.append(token)
                status, stop_reason = token_stop(request, token, max_model_len)
                kept = [token]
            if status is None:
                append(RequestDelta(request.request_id, kept, False))
            else:
                self._finish(request, status, stop_reason, cache_output=True)
                append(RequestDelta(request.request_id, kept, True, request.finish_reason, stop_reason))
        return deltas

    def _applicable(self, chunks, sampled: dict[str, int], verified: dict[str, list[int]]) -> list[tuple]:
        """(request, chunk, its sampled token / verified tokens / None) of every chunk whose request
        still runs from where the chunk started (not aborted or finished since `schedule`, no stale
        output). Checks every result before `update` changes anything: a bad one is a ValueError."""
        done = []
        requests, running, append = self.requests, RequestStatus.RUNNING, done.append
        for chunk in chunks:
            request = requests.get(chunk.request_id)
            if request is None or request.status is not running or request.num_computed_tokens != chunk.start_pos:
                continue
            if chunk.num_drafts:
                tokens = verified.get(chunk.request_id)
                if not isinstance(tokens, list) or not 1 <= len(tokens) <= chunk.num_drafts + 1 or any(
                        not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in tokens):
                    raise ValueError(f"verified must map {chunk.request_id!r} to 1..{chunk.num_drafts + 1} "
                                     f"token ids, got {tokens!r}")
                append((request, chunk, tokens))
            elif chunk.sample:
                token = sampled.get(chunk.request_id)
                if token.__class__ is not int and (not isinstance(token, int) or isinstance(token, bool)) \
                        or token < 0:
                    raise ValueError(f"sampled must map {chunk.request_id!r} to a token id, got {token!r}")
                append((request, chunk, token))
            else:
                append((request, chunk, None))
        return done

    def _append_verified(self, request: Request, chunk: ScheduledChunk, tokens: list[int]):
        """Append a verify chunk's tokens one by one under the stop rules (a stop drops the rest)
        and advance the computed tokens over the last known token and the accepted drafts: one
        fewer than the tokens kept, as after any decode (the last token is fed next step)."""
        status = stop_reason = None
        kept = 0
        for token in tokens:
            request.output_token_ids.append(token)
            kept += 1
            status, stop_reason = token_stop(request, token, self.config.max_model_len)
            if status is not None:
                break
        request.num_computed_tokens = min(chunk.start_pos + len(tokens), request.num_tokens - 1)
        return tokens[:kept], status, stop_reason

    # ---- scheduling internals -----------------------------------------------------------------

    def _schedule_running(self, plan: _StepPlan) -> None:
        decodes, prefills = [], []
        for r in self.running:
            ahead = len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens
            if ahead == 1:
                decodes.append(r)
            elif ahead > 1:
                prefills.append(r)
        running, chunks = RequestStatus.RUNNING, plan.chunks
        # Each decode's table if its blocks already cover one more token (read-only: a preemption
        # below only changes its victim, whose status the loop checks).
        tables = self.kv.tables_with_room(decodes, 1)
        for request, table in zip(decodes, tables):  # one token each: no chunking rule can shorten it
            if plan.budget == 0:
                return
            if request.status is not running:  # preempted earlier in this step
                continue
            if request.draft_token_ids:
                self._add_verify(request, plan)
                continue
            # `_reserve` only when blocks are short (it allocates, evicts or preempts); the chunk is
            # the one token a decode feeds, its last known token. This loop runs for every running
            # sequence every step.
            if table is None:
                if not self._reserve(request, 1, plan):
                    continue
                table = self.kv.live_table(request.request_id)
            request_id = request.request_id
            token = (request.output_token_ids or request.prompt_token_ids)[-1]
            chunks[request_id] = ScheduledChunk(request_id, [token], request.num_computed_tokens, True, table)
            plan.budget -= 1
        for request in prefills:
            if plan.budget == 0:
                return
            if request.status is not running:
                continue
            num_tokens = self._chunk_len(request, plan.budget)
            if self._reserve(request, num_tokens, plan):
                self._add_chunk(request, num_tokens, plan)

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        skipped = 0  # requests at the head whose checkpoint is still being read from disk
        while len(self.waiting) > skipped and plan.budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[skipped]
            problem = self._admission_problem(request)
            if problem:
                del self.waiting[skipped]
                self._finish_with_error(request, problem)
                continue
            alone = not self.running and not plan.chunks
            result = self.kv.lookup_and_admit(request)
            if result is None:
                if self.kv.is_loading(request):
                    skipped += 1
                    continue
                if not alone:
                    return
                del self.waiting[skipped]
                self._finish_with_error(request, "no free KV cache slot even with the cache to itself")
                continue
            num_tokens = self._chunk_len(request, plan.budget)
            if not self.kv.ensure_capacity(request, num_tokens):
                self.kv.free(request)
                request.num_computed_tokens = 0
                if not alone:
                    return
                del self.waiting[skipped]
                self._finish_with_error(request, "not enough KV cache blocks even with the cache to itself")
                continue
            del self.waiting[skipped]
            first_admission = request.num_cached_tokens < 0
            self._start_running(request, result.num_cached_tokens, result.miss_reason)
            if first_admission:  # a preempted request's re-admission is not a new query
                self.kv.record_admission(request, result)
            plan.copies_before += result.copies
            self._add_chunk(request, num_tokens, plan)

    def _admission_problem(self, request: Request) -> str | None:
        max_len = self.config.max_model_len
        if max_len is not None and request.num_tokens >= max_len:
            return f"prompt of {request.num_tokens} tokens leaves no room under max_model_len={max_len}"
        if not self.kv.can_fit_alone(request.num_tokens):
            return (f"prompt of {request.num_tokens} tokens exceeds the KV cache capacity of "
                    f"{self.kv.max_num_tokens} tokens")
        return None

    def _start_running(
        self, request: Request, num_cached_tokens: int, miss_reason: MissReason | None
    ) -> None:
        request.status = RequestStatus.RUNNING
        if request.num_cached_tokens < 0:  # first admission: what usage reports
            request.num_cached_tokens = num_cached_tokens
            request.miss_reason = miss_reason.value if miss_reason is not None else None
            request.first_scheduled_time = self._clock()
        bisect.insort(self.running, request, key=lambda r: self._arrival_order[r.request_id])

    def _reserve(self, request: Request, num_tokens: int, plan: _StepPlan) -> bool:
        """Blocks for a running request's chunk, preempting newer requests if needed."""
        while not self.kv.ensure_capacity(request, num_tokens):
            victim = self.running[-1]  # the most recently arrived
            if victim is request and len(self.running) == 1:
                self._finish_with_error(
                    request,
                    f"sequence of {request.num_computed_tokens + num_tokens} tokens exceeds the KV "
                    f"cache capacity of {self.kv.max_num_tokens} tokens",
                )
                return False
            self._preempt(victim, plan)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        """Recompute preemption: free the KV, keep the outputs, requeue at the front."""
        self.kv.free(request)
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        chunk = plan.chunks.pop(request.request_id, None)
        if chunk is not None:
            plan.budget += chunk.num_tokens
        plan.preempted_ids.append(request.request_id)

    def _chunk_len(self, request: Request, budget: int) -> int:
        start = request.num_computed_tokens
        num_tokens = min(request.num_tokens - start, budget)
        if self.kv.enable_prefix_cache:
            unit = self.kv.unit_interval
            boundary = (start // unit + 1) * unit
            if start < request.num_prompt_tokens - 1:  # prompt units all lie before the prompt's end
                for end in self._prompt_units(request):
                    if end > start:
                        boundary = min(boundary, end)
                        break
            num_tokens = min(num_tokens, boundary - start)
        return num_tokens

    def _is_unit_end(self, request: Request, end: int) -> bool:
        if not self.kv.enable_prefix_cache:
            return False
        return end % self.kv.unit_interval == 0 or (
            end < request.num_prompt_tokens and end in self._prompt_units(request))

    @staticmethod
    def _prompt_units(request: Request) -> tuple[int, ...]:
        """Unit positions inside the prompt, ascending: the caller's hints (e.g. the end of a
        shared system block) and the end-of-prompt unit, one token short of the prompt's
        end: a later request with the *same* prompt can then resume from it and still has a
        token to compute logits from (a unit at the very end could only serve longer prompts)."""
        last = request.num_prompt_tokens - 1
        return tuple(n for n in request.cache_hints.unit_ends if n < last) + (last,)

    def _add_chunk(self, request: Request, num_tokens: int, plan: _StepPlan) -> None:
        start = request.num_computed_tokens
        end = start + num_tokens
        plan.chunks[request.request_id] = ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids_slice(start, end),
            start_pos=start,
            sample=end == request.num_tokens,
            # The live table, not a copy (O(1) per step): the runner reads it before the next schedule.
            block_table=self.kv.live_table(request.request_id),
        )
        plan.budget -= num_tokens

    def _add_verify(self, request: Request, plan: _StepPlan) -> None:
        """The last known token and the request's drafts (as many as the budget allows) as one
        chunk; its blocks cover every draft, the rejected ones' entries are rewritten later."""
        drafts, request.draft_token_ids = request.draft_token_ids[:plan.budget - 1], []
        num_tokens = 1 + len(drafts)
        if not self._reserve(request, num_tokens, plan):
            return
        request_id = request.request_id
        token = (request.output_token_ids or request.prompt_token_ids)[-1]
        plan.chunks[request_id] = ScheduledChunk(request_id, [token] + drafts, request.num_computed_tokens, True,
                                                 self.kv.live_table(request_id), len(drafts))
        plan.budget -= num_tokens

    # ---- finishing ------------------------------------------------------------------------------

    def _finish(self, request: Request, status: RequestStatus, stop_reason, cache_output: bool) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.requests.pop(request.request_id, None)
        self._arrival_order.pop(request.request_id, None)
        if cache_output and request.cache_hints.keep_output:
            self.kv.finish(request, cache_output=True)
        else:
            self.kv.free(request)
        request.status = status
        request.finish_reason = status.finish_reason
        request.stop_reason = stop_reason
        request.finished_time = self._clock()

    def _finish_with_error(self, request: Request, message: str) -> None:
        self._finish(request, RequestStatus.FINISHED_ERROR, message, cache_output=False)
        self._deltas_from_schedule.append(
            RequestDelta(request.request_id, [], True, FinishReason.ERROR, message)
        )
