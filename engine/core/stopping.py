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

from array import array

from engine.core.request import Request, RequestStatus


def token_stop(request: Request, token: int, max_model_len: int | None) -> tuple[RequestStatus | None, int | None]:
    """(terminal status, stop token id or None) if `token`, just appended, ends the request."""
    params = request.sampling_params
    num_output = len(request.output_token_ids)
    stop_ids = getattr(params, "stop_token_ids", None)
    # EOS and stop ids are rare: test them first, the rest of the rules only when they match.
    if (token == request.eos_token_id or stop_ids and token in stop_ids) \
            and num_output >= (getattr(params, "min_tokens", 0) or 0):
        if token == request.eos_token_id and not getattr(params, "ignore_eos", False):
            return RequestStatus.FINISHED_STOPPED, None
        if stop_ids and token in stop_ids:
            return RequestStatus.FINISHED_STOPPED, token
    max_tokens = getattr(params, "max_tokens", None)
    if max_tokens is not None and num_output >= max_tokens:
        return RequestStatus.FINISHED_LENGTH, None
    if max_model_len is not None and len(request.prompt_token_ids) + num_output >= max_model_len:
        return RequestStatus.FINISHED_LENGTH, None
    return None, None


class StopChecker:
    """Finds the first stop string in a stream of text deltas.

    The match that completes earliest in the stream wins (at equal end, the longer one), so the
    result does not depend on how the text was split into deltas. Only the longest suffix that
    is a proper prefix of some stop string is held back; the caller gets it from `flush()`.

    Each stop string runs a KMP automaton over the stream: its state is the length of the
    longest prefix of the stop string that ends the text so far, so a match is state ==
    len(stop) and the hold-back is the largest state. Setup is O(total stop length) and each
    character costs amortised O(number of stop strings), whatever the lengths (no prefix sets,
    whose size grows with the square of the length: a 1 MB stop string once took 22 GB).
    """

    def __init__(self, stop: list[str] | str, include_stop_str_in_output: bool = False) -> None:
        stop = [stop] if isinstance(stop, str) else list(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self._stops = list(dict.fromkeys(stop))  # a repeated stop string needs one automaton
        self._include_stop_str = include_stop_str_in_output
        self._failures = [_failure_function(s) for s in self._stops]
        self._states = [0] * len(self._stops)
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
        offset = len(self._pending)  # the pending text was already run through the automata
        for position in range(offset, len(text)):
            matched = self._advance(text[position])
            if matched is not None:
                start = position + 1 - len(matched)
                self._pending = ""
                self.matched = matched
                end = position + 1 if self._include_stop_str else start
                return text[:end], True, matched
        keep = max(self._states, default=0)
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

    def _advance(self, char: str) -> str | None:
        """Step every automaton by one character; the longest stop string completed here."""
        matched = None
        for i, stop_str in enumerate(self._stops):
            state, failure = self._states[i], self._failures[i]
            while state and stop_str[state] != char:
                state = failure[state - 1]
            if stop_str[state] == char:
                state += 1
            if state == len(stop_str):
                if matched is None or len(stop_str) > len(matched):
                    matched = stop_str
                state = failure[state - 1]
            self._states[i] = state
        return matched


def _failure_function(pattern: str) -> array:
    """KMP: failure[i] = length of the longest proper prefix of pattern[:i + 1] that is also
    its suffix (4 bytes per character)."""
    failure = array("i", bytes(4 * len(pattern)))
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = failure[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        failure[i] = k
    return failure
