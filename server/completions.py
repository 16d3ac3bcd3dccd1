"""`POST /completions` under /beta and /v1: plain completion and FIM (fill in the middle).

With `suffix` the prompt is rendered as DeepSeek FIM —
`BOS <｜fim▁begin｜>{prompt}<｜fim▁hole｜>{suffix}<｜fim▁end｜>` — and the model writes the middle;
without it the prompt is continued after BOS. Non-thinking only (FIM does not support thinking;
a `thinking` field is ignored). Legacy Completions shapes: `text_completion`, integer
`logprobs` (<= 20) as `{tokens, token_logprobs, top_logprobs, text_offset}`, `echo` prepends
the prompt text (logprobs then cover the generated tokens only). Generation stops at EOS; no
control token (EOS, `</think>`, the FIM markers, DSML, ...) appears in `text` or in the
logprobs tokens (the engine decodes with `skip_special_tokens`). The prompt (and `suffix`) is
encoded as given: raw completions may spell control tokens on purpose. `prompt` must be one string (a
list holding exactly one string is accepted). Usage and the stream's usage placement follow
the chat endpoint (DeepSeek: usage on the final finish chunk).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from engine.sampling_params import SamplingParams
from engine.tokenizer import FIM_BEGIN_TOKEN, FIM_END_TOKEN, FIM_HOLE_TOKEN
from server.chat_template import BOS, EOS
from server.errors import invalid_request
from server.logit_bias import LogitBias, check_logit_bias
from server.protocol import (
    DEFAULT_MAX_TOKENS_FIM, MAX_TOP_LOGPROBS, CompletionRequest, cache_salt, check_n, check_sampling,
    check_stream_options, resolve_max_tokens, wire_logprob,
)
from server.runs import Choice, Run, RunPlan
from server.serve_config import ServerContext

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CompletionPlan(RunPlan):
    prompt_text: str  # what `echo` repeats
    echo: bool
    logprobs: int | None


def render_prompt(tokenizer, prompt: str, suffix: str | None) -> str:
    if suffix is None:
        return BOS + prompt
    missing = [t for t in (FIM_BEGIN_TOKEN, FIM_HOLE_TOKEN, FIM_END_TOKEN) if tokenizer.token_to_id(t) is None]
    if missing:
        raise invalid_request(f"this model's tokenizer has no FIM tokens {missing}; drop `suffix`", "suffix")
    return f"{BOS}{FIM_BEGIN_TOKEN}{prompt}{FIM_HOLE_TOKEN}{suffix}{FIM_END_TOKEN}"


def plan_completion(ctx: ServerContext, req: CompletionRequest) -> CompletionPlan:
    ctx.resolve_model(req.model)
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise invalid_request(f"prompt must be one string (batched prompts are not supported), "
                                  f"got a list of {len(prompt)}", "prompt")
        prompt = prompt[0]
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise invalid_request(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.logprobs}", "logprobs")
    n = check_n(req.n)
    sampling = check_sampling(req, thinking=False, defaults=ctx.engine.generation_defaults, limits=ctx.config.limits)
    logit_bias = check_logit_bias(req.logit_bias, ctx.engine.tokenizer.vocab_size)
    include_usage = check_stream_options(req.stream, req.stream_options)
    salt = cache_salt(req.user_id, req.user)
    prompt_ids = ctx.encode_prompt(render_prompt(ctx.engine.tokenizer, prompt, req.suffix), "prompt")
    max_tokens = resolve_max_tokens(req.max_tokens, "max_tokens", DEFAULT_MAX_TOKENS_FIM, len(prompt_ids),
                                    ctx.engine.max_model_len)
    try:
        params = [SamplingParams(max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                                 seed=None if sampling.seed is None else sampling.seed + i, stop=sampling.stop,
                                 ignore_eos=req.ignore_eos, logprobs=req.logprobs,
                                 logits_processors=[LogitBias(logit_bias)] if logit_bias else [])
                  for i in range(n)]
    except ValueError as err:
        raise invalid_request(str(err)) from None
    return CompletionPlan(model=req.model, prompt_text=prompt, prompt_ids=prompt_ids, params=params,
                          cache_salt=salt, stream=req.stream, include_usage=include_usage,
                          echo=bool(req.echo), logprobs=req.logprobs)


@dataclass(kw_only=True)
class CompletionChoice(Choice):
    text_pieces: list[str] = field(default_factory=list)
    num_chars: int = 0  # text length so far, echo included (for text_offset)
    seen_eos: bool = False
    logprobs: dict = field(default_factory=lambda: {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                    "text_offset": []})

    def feed(self, out, table, eos_id: int, with_logprobs: bool) -> tuple[str, dict | None]:
        """The new text of `out` (EOS cut) and its logprobs in the legacy shape."""
        self.observe(out)
        piece = ""
        if not self.seen_eos:
            piece, eos, _ = out.new_text.partition(EOS)
            self.seen_eos = bool(eos)
        new_logprobs = {key: [] for key in self.logprobs} if with_logprobs else None
        if with_logprobs:
            offset = self.num_chars
            for token_id, entry in zip(out.new_token_ids, out.logprobs or []):
                if token_id == eos_id or table.is_control[token_id]:
                    continue  # not part of `text`
                text = table.token_text(entry.token_id)
                new_logprobs["tokens"].append(text)
                new_logprobs["token_logprobs"].append(wire_logprob(entry.logprob))
                new_logprobs["top_logprobs"].append({table.token_text(t): wire_logprob(lp) for t, lp in entry.top})
                new_logprobs["text_offset"].append(offset)
                offset += len(text)
            for key, values in new_logprobs.items():
                self.logprobs[key].extend(values)
        self.text_pieces.append(piece)
        self.num_chars += len(piece)
        return piece, new_logprobs


class CompletionRun(Run):
    api = "completions"

    def __init__(self, ctx: ServerContext, plan: CompletionPlan):
        choices = [CompletionChoice(index=i, num_chars=len(plan.prompt_text) if plan.echo else 0)
                   for i in range(len(plan.params))]
        super().__init__(ctx, plan, choices)
        self.eos_id = ctx.engine.tokenizer.eos_id

    def _feed(self, index: int, out):
        return self.choices[index].feed(out, self.ctx.token_table, self.eos_id, self.plan.logprobs is not None)

    def consume(self, index: int, out) -> None:
        self._feed(index, out)

    def body(self) -> dict:
        echo = self.plan.prompt_text if self.plan.echo else ""
        choices = [{"text": echo + "".join(c.text_pieces), "index": c.index,
                    "logprobs": c.logprobs if self.plan.logprobs is not None else None,
                    "finish_reason": c.finish_reason} for c in self.choices]
        return {**self.envelope("text_completion", choices), "usage": self.settle()}

    def _chunk(self, index: int, text: str, logprobs, finish_reason: str | None, usage=None,
               with_usage: bool = False) -> dict:
        chunk = self.envelope("text_completion",
                              [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}])
        if with_usage or self.plan.include_usage:
            chunk["usage"] = usage
        return chunk

    def render(self, index: int, out) -> list[dict]:
        choice = self.choices[index]
        is_first = choice.last_output is None
        text, logprobs = self._feed(index, out)
        if is_first and self.plan.echo:
            text = self.plan.prompt_text + text
        chunks = []
        if text or (logprobs and logprobs["tokens"]):
            chunks.append(self._chunk(index, text, logprobs, None))
        if out.finished:
            usage = self.settle() if self.job.is_done else None
            chunks.append(self._chunk(index, "", None, choice.finish_reason, usage, with_usage=usage is not None))
        return chunks


async def create_completion(ctx: ServerContext, request: Request, req: CompletionRequest) -> Response:
    plan = await asyncio.to_thread(plan_completion, ctx, req)  # tokenizing is slow for big prompts
    return await CompletionRun(ctx, plan).respond(request)
