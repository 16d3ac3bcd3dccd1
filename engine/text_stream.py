"""One request's text, made where its stream is consumed: detokenizing and stop strings.

The engine core hands out token deltas (`RequestOutput.new_text` empty); `TextStream.apply`
turns each into the same output with its stable text (engine/detokenizer.py) and the stop
strings applied (`StopChecker`, engine/core/stopping.py). When a stop string matches, the output
is finished there and then (reason "stop", the string as `stop_reason`, the text cut, the tokens
so far counted) and the caller finishes the request in the scheduler
(`EngineCore.finish_request`); anything the engine still sends for it is dropped. It runs on
the consumer's side (the `AsyncEngine` caller's event loop, `LLM`'s own loop), not in series
with the forward on the engine thread.
"""

from __future__ import annotations

import time
from dataclasses import replace

from engine.core.stopping import StopChecker
from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 8  # prompt tokens decoded ahead of the first output (leading-space rules)


class TextStream:
    def __init__(self, tokenizer, prompt_ids: list[int], params: SamplingParams):
        self._detok = (IncrementalDetokenizer(tokenizer, prompt_ids[-PROMPT_CONTEXT_TOKENS:], params.skip_special_tokens)
                       if tokenizer else None)
        self._stop = StopChecker(params.stop, params.include_stop_str_in_output) if params.stop else None
        self.finished = False

    def apply(self, out: RequestOutput) -> tuple[RequestOutput | None, bool]:
        """(`out` with its text, or None once the stream has ended; whether a stop string ended
        it now while the engine still runs it, so the caller must finish it there)."""
        if self.finished:
            return None, False
        text = self._detok.add_tokens(out.new_token_ids) if self._detok else ""
        if out.finished and self._detok:
            text += self._detok.flush()
        matched = None
        if self._stop is not None:
            text, matched = self._stop.cut(text, out.finished)
        self.finished = out.finished or matched is not None
        if matched is None:
            return replace(out, new_text=text), False
        # The stop string is the reason even when a token rule ended the request in the same step.
        metrics = out.metrics
        if metrics is not None and metrics.finished_time is None:
            metrics = replace(metrics, finished_time=time.monotonic())  # the engine's clock
        stopped = replace(out, new_text=text, finished=True, finish_reason="stop", stop_reason=matched,
                          metrics=metrics)
        return stopped, not out.finished
