"""Offline batched generation: ``LLM(model_dir).generate(prompts, SamplingParams(...))``.

Drives the same ``EngineCore`` as the server: every prompt is added at once and the core's
continuous batching, chunked prefill and prefix cache do the rest.
"""
from __future__ import annotations

import itertools
from typing import Sequence

from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore
from engine.outputs import CompletionOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.text_stream import TextStream


class LLM:
    def __init__(self, model: str | None = None, **engine_kwargs):
        """``model``: checkpoint directory (None = the embedded default model). Keyword
        arguments are ``EngineConfig`` fields (``dtype``, ``max_num_seqs``,
        ``max_num_batched_tokens``, ``kv_cache_memory``, ``enable_prefix_cache``,
        ``prefix_cache_unit``, ``tensor_parallel_size``, ``enable_expert_parallel`` …)."""
        self.config = EngineConfig(model=model, **engine_kwargs)
        self.engine = EngineCore(self.config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[CompletionOutput]:
        """One ``CompletionOutput`` per prompt, in order. Prompts are strings (tokenized as-is,
        no special tokens added) or lists of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        order, collected, texts = [], {}, {}
        for prompt, p in zip(prompts, params_list):
            if isinstance(prompt, str) and self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass prompts as token ids")
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, ids, p)
            texts[rid] = TextStream(self.tokenizer, ids, p)
            order.append(rid)
            collected[rid] = CompletionOutput(rid, ids, [], "", None, logprobs=[] if p.logprobs is not None else None)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                c = collected.get(out.request_id)
                if c is None:
                    continue
                out, stopped_now = texts[out.request_id].apply(out)
                if stopped_now:
                    self.engine.finish_request(out.request_id, out.finish_reason, out.stop_reason)
                if out is None:  # after a stop string: what the engine ran meanwhile is not output
                    continue
                c.token_ids += out.new_token_ids
                c.text += out.new_text
                if out.logprobs and c.logprobs is not None:
                    c.logprobs += out.logprobs
                if out.finished:
                    c.finish_reason = out.finish_reason
                    c.num_cached_tokens = out.num_cached_tokens
        return [collected[r] for r in order]

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass


__all__ = ["LLM", "SamplingParams", "TokenLogprob"]
