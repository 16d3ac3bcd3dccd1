"""The wire between the server process and the engine process: msgpack frames over ZeroMQ.

Two one-way ipc sockets: the server PUSHes commands (add / abort / finish / call / stop), the
engine PUSHes back one frame per engine step carrying every output of that step, the step's
stats and, now and then, the scheduler stats; plus "ready", "dead" and call replies. Frames are
msgpack lists whose first item names the kind. Sampling params go field by field; only logits
processors (server-side callables such as a grammar recipe or a logit bias) are pickled, and
only when a request has any.
"""
from __future__ import annotations

import dataclasses
import pickle

import msgpack

from engine.core.request import CacheHints
from engine.outputs import RequestMetrics, RequestOutput, StepStats, TokenLogprob
from engine.sampling_params import SamplingParams

# Commands (server -> engine)
ADD, ABORT, FINISH, CALL, STOP = "add", "abort", "finish", "call", "stop"
# Events (engine -> server)
READY, STEP, DEAD, REPLY = "ready", "step", "dead", "reply"

_PARAM_FIELDS = [f.name for f in dataclasses.fields(SamplingParams) if f.name != "logits_processors"]


def pack(frame: list) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def unpack(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# ---- requests ----------------------------------------------------------------------------

def encode_add(request_id: str, prompt_ids: list[int], params: SamplingParams, cache_salt: str,
               hints: CacheHints | None, arrival: float) -> bytes:
    fields = [getattr(params, name) for name in _PARAM_FIELDS]
    processors = pickle.dumps(params.logits_processors) if params.logits_processors else None
    hint = None if hints is None else [list(hints.unit_ends), hints.keep_output]
    return pack([ADD, request_id, prompt_ids, fields, processors, cache_salt, hint, arrival])


def decode_add(frame: list) -> tuple:
    """(request_id, prompt_ids, params, cache_salt, hints, arrival) of an ADD frame."""
    _, rid, ids, fields, processors, salt, hint, arrival = frame
    params = SamplingParams(**dict(zip(_PARAM_FIELDS, fields)))
    if processors is not None:
        params.logits_processors = pickle.loads(processors)
    hints = None if hint is None else CacheHints(tuple(hint[0]), hint[1])
    return rid, ids, params, salt, hints, arrival


# ---- step outputs ------------------------------------------------------------------------

def _encode_output(o: RequestOutput) -> list:
    lp = None if o.logprobs is None else [[t.token_id, t.logprob, [list(x) for x in t.top]] for t in o.logprobs]
    m = o.metrics
    met = None if m is None else [m.arrival_time, m.first_scheduled_time, m.first_token_time, m.finished_time,
                                  m.num_preemptions]
    return [o.request_id, o.new_token_ids, o.finished, o.finish_reason, o.stop_reason, o.num_prompt_tokens,
            o.num_cached_tokens, o.miss_reason, o.num_output_tokens, lp, met]


def _decode_output(f: list) -> RequestOutput:
    rid, ids, finished, reason, stop_reason, n_prompt, n_cached, miss, n_out, lp, met = f
    logprobs = None if lp is None else [TokenLogprob(t, l, [tuple(x) for x in top]) for t, l, top in lp]
    return RequestOutput(rid, ids, "", finished, reason, stop_reason, n_prompt, n_cached, miss, n_out, logprobs,
                         None if met is None else RequestMetrics(*met))


def _encode_stats(s: StepStats) -> dict:
    d = {f.name: getattr(s, f.name) for f in dataclasses.fields(StepStats)}
    d["prefix_cache_evictions"] = [[pool, kind, n] for (pool, kind), n in s.prefix_cache_evictions.items()]
    return d


def _decode_stats(d: dict) -> StepStats:
    d["prefix_cache_evictions"] = {(pool, kind): n for pool, kind, n in d["prefix_cache_evictions"]}
    return StepStats(**d)


def plain_keys(obj):
    """``obj`` with every tuple dict key spelled "a/b" (msgpack maps, like JSON objects, cannot
    be keyed by arrays): the scheduler stats key evictions by (pool, kind)."""
    if isinstance(obj, dict):
        return {"/".join(map(str, k)) if isinstance(k, tuple) else k: plain_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_keys(v) for v in obj]
    return obj


def encode_step(outputs: list[RequestOutput], stats: StepStats | None, errors: list, scheduler_stats: dict | None) -> bytes:
    """One frame per engine step: every output, the step's stats, requests the core refused
    ([request id, message]) and, when refreshed, the scheduler stats (tuple keys spelled out)."""
    return pack([STEP, [_encode_output(o) for o in outputs], None if stats is None else _encode_stats(stats), errors,
                 None if scheduler_stats is None else plain_keys(scheduler_stats)])


def decode_step(frame: list) -> tuple[list[RequestOutput], StepStats | None, list, dict | None]:
    _, outs, stats, errors, scheduler_stats = frame
    return [_decode_output(o) for o in outs], None if stats is None else _decode_stats(stats), errors, scheduler_stats
