"""When a request stops: every stop rule, in one module (pure Python).

Token rules (`token_stop`, checked by the scheduler on each sampled token): EOS unless
`ignore_eos`, then `stop_token_ids`, both only once `min_tokens` are out; `max_tokens`; the
context window (`max_model_len`). Text rule (`StopChecker`, fed with each output's detokenized
text by the request's `TextStream`, engine/text_stream.py, where the stream is consumed): the
first stop string. A text stop ends the stream at once and finishes the request in the scheduler
(`EngineCore.finish_request`; finish reason "stop", the matched string as `stop_reason`); when
both hit in the same output the stop string is the reported reason and its cut applies.
Aborts and errors are not stops: the scheduler and the engine core end those.
"""

from __future__ import annotations

from engine.core.request import Request, RequestStatus


def token_stop(request: Request, token: int, max_model_len: int | None) -> tuple[RequestStatus | None, int | None]:
    """(terminal status, stop token id or None) if `token`, just appended, ends the request."""
    params = request.sampling_params
    num_output = request.num_output_tokens
    if num_output >= (getattr(params, "min_tokens", 0) or 0):
        if token == request.eos_token_id and not getattr(params, "ignore_eos", False):
            return RequestStatus.FINISHED_STOPPED, None
        if token in (getattr(params, "stop_token_ids", None) or ()):
            return RequestStatus.FINISHED_STOPPED, token
    max_tokens = getattr(params, "max_tokens", None)
    if max_tokens is not None and num_output >= max_tokens:
        return RequestStatus.FINISHED_LENGTH, None
    if max_model_len is not None and request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH, None
    return None, None


class StopChecker:
    """Finds the first stop string in a stream of text deltas.

    The match that completes earliest in the stream wins (at equal end, the longer one), so the
    result does not depend on how the text was split into deltas. Only the longest suffix that
    is a proper prefix of some stop string is held back; the caller gets it from `flush()`.
    """

    def __init__(self, stop: list[str] | str, include_stop_str_in_output: bool = False) -> None:
        stop = [stop] if isinstance(stop, str) else list(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self._stops = stop
        self._include_stop_str = include_stop_str_in_output
        self._proper_prefixes = {s[:n] for s in stop for n in range(1, len(s))}
        self._max_holdback = max((len(s) for s in stop), default=1) - 1
        self._pending = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, new_text: str) -> tuple[str, bool, str | None]:
        """Returns (text to emit, stopped, matched stop string). After a stop, emits nothing."""
        if self.stopped:
            return "", True, self.matched
        text = self._pending + new_text
        match = self._first_match(text)
        if match is not None:
            start, stop_str = match
            self._pending = ""
            self.matched = stop_str
            end = start + len(stop_str) if self._include_stop_str else start
            return text[:end], True, stop_str
        keep = self._holdback_length(text)
        self._pending = text[len(text) - keep:]
        return text[:len(text) - keep], False, None

    def flush(self) -> str:
        """End of generation without a stop: releases the held-back text."""
        released, self._pending = self._pending, ""
        return released

    def cut(self, new_text: str, finished: bool) -> tuple[str, str | None]:
        """One step of a request: (text to emit, the stop string matched, or None). The
        held-back text is released when the request finished for another reason."""
        emit, stopped, matched = self.feed(new_text)
        if stopped:
            return emit, matched
        return (emit + self.flush() if finished else emit), None

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None   # (end, start, stop string)
        for stop_str in self._stops:
            start = text.find(stop_str)
            if start < 0:
                continue
            candidate = (start + len(stop_str), start, stop_str)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _holdback_length(self, text: str) -> int:
        for length in range(min(len(text), self._max_holdback), 0, -1):
            if text[-length:] in self._proper_prefixes:
                return length
        return 0
