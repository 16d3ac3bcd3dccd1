"""ModelRunner: owns the device, the model, the KV cache tensors and the sampler.

``execute(scheduler_output, requests)`` performs the cache copies the scheduler asked for,
runs one flat forward over every scheduled chunk, samples the sequences that reached their
last known token, and returns what was sampled. It never decides anything about scheduling.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from engine.model.config import ModelConfig
from engine.model.deepseek_v4 import DeepseekV4, Parallel
from engine.model.loader import load_weights
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams
from engine.worker.batch_builder import BatchBuilder
from engine.worker.input_batch import ForwardBatch
from engine.worker.kv_cache import CacheShape, KVCache
from engine.worker.mtp_drafter import MtpDrafting
from engine.worker.sampler import Sampler, filtered_probs, make_generator, verify_logprobs
from engine.worker.spec_decode import SpecCounts, accept_greedy, accept_sampled, make_drafter, mask_drafts, propose
from engine.worker.step_executor import make_step
import kernels

log = logging.getLogger(__name__)
_GREEDY = SamplingParams(temperature=0)  # verify rows: the sampler gives the greedy pick and no logprobs


@dataclass
class SampledTokens:
    """What a step sampled: the token of every sampling chunk's request, and the raw logprobs of
    the requests that asked for them (dicts built at C speed: this runs every step)."""

    token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)  # one per token, for those that asked
    # Verify chunks (speculative decoding): every token the chunk yields, and the step's counts.
    verified: dict[str, list[int]] = field(default_factory=dict)
    spec: SpecCounts | None = None
    # MTP drafting: the next step's drafts of every request that may speculate (None: no MTP).
    drafts: dict[str, list[int]] | None = None


class ModelRunner:
    def __init__(self, model_dir: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 par: Parallel | None = None, seed: int = 0, shard_loader=None, compile: bool = False,
                 enforce_eager: bool = False, speculative_method: str = "ngram", speculative_tokens: int = 0,
                 speculative_max_batch: int = 32, fp8_activations: bool = False):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        # MTP drafting runs the checkpoint's MTP layer after every step (MtpDrafting below).
        self.mtp = MtpDrafting(speculative_tokens, speculative_max_batch) \
            if speculative_method == "mtp" and speculative_tokens > 0 else None
        self.model = DeepseekV4(cfg, dtype, par, mtp=self.mtp is not None)
        # The torch path dequantises once at load (dense matmuls); the kernel path keeps the stored
        # FP8/FP4 form, which its GEMMs read in place.
        keep_dense = kernels.backend_for_device(device) == "torch"
        load_weights(self.model, model_dir, keep_dense=keep_dense, shard=shard_loader, fp8_activations=fp8_activations)
        self.model.to(device)
        self.cache: KVCache | None = None  # allocated once the KV budget is known
        self.builder: BatchBuilder | None = None
        self.sampler = Sampler(seed=seed)
        self._generators: dict[str, torch.Generator] = {}
        self.speculative_method, self.drafter = speculative_method, None
        # Tensor-parallel ranks run eagerly: their collectives stay outside captured graphs. So do
        # MTP steps for now: the MTP layer reads every row's final streams.
        eager = (par is not None and par.tp_size > 1) or self.mtp is not None
        self.step = make_step(self._logits, torch.device(device), compile and not eager, enforce_eager or eager)

    def allocate_cache(self, shape: CacheShape, kv_cache_dtype: str = "auto") -> None:
        self.cache = KVCache(self.cfg, shape, self.dtype, self.device, kv_cache_dtype=kv_cache_dtype,
                             extra_window_layers=len(self.model.mtp))
        self.builder = BatchBuilder(shape, self.cfg.max_position_embeddings, torch.device(self.device))

    def _logits(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model.compute_logits(self.model(batch, self.cache))

    # ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, chunks, copies_before=(), copies_after=()) -> torch.Tensor | None:
        """Run the model over ``chunks``; returns logits [n_sampling_chunks, V] in chunk order
        (a verify chunk has ``1 + num_drafts`` consecutive rows)."""
        for c in copies_before:
            self.cache.copy(c.pool, c.src, c.dst)
        logits = None
        sampling = [i for i, ch in enumerate(chunks) if ch.sample]
        if chunks:
            decode = all([len(ch.token_ids) == 1 for ch in chunks])  # a list: faster than a generator here
            batch = self.builder.build(chunks, captured=self.step.captured)
            if self.mtp is not None:  # keep every row's streams for the MTP layer
                streams = self.mtp.target_streams = self.model.streams(batch, self.cache)
                if sampling:
                    logits = self.model.compute_logits(self.model.final_hidden(streams[batch.logits_rows]))
            elif sampling or decode and self.step.captured:
                logits = self.step(batch, decode)
                if decode and logits.shape[0] != len(sampling):  # a captured decode bucket: every row has logits
                    logits = logits[torch.tensor(sampling, device=logits.device)]
            else:  # nothing to sample (prefill chunks only): no head
                self.model(batch, self.cache)
        for c in copies_after:
            self.cache.copy(c.pool, c.src, c.dst)
        return logits

    @torch.inference_mode()
    def execute(self, sched_out, requests: dict) -> SampledTokens:
        sampling = [requests[ch.request_id] for ch in sched_out.chunks if ch.sample]
        _prepare_logits_processors(sampling)
        if self.mtp is None:
            logits = self.forward(sched_out.chunks, sched_out.copies_before, sched_out.copies_after)
            return self._sample(logits, sched_out.chunks, sampling, requests)
        # With MTP the checkpoint snapshots wait for the MTP layer's window writes of this step.
        logits = self.forward(sched_out.chunks, sched_out.copies_before)
        sampled = self._sample(logits, sched_out.chunks, sampling, requests)
        sampled.drafts = self.draft_with_mtp(self.mtp.plan(sched_out.chunks, requests, sampled),
                                             sched_out.copies_after)
        return sampled

    @torch.inference_mode()
    def draft_with_mtp(self, plan, copies_after=()) -> dict[str, list[int]]:
        """The MTP passes of ``plan`` over the last forward's streams, then the step's checkpoint
        snapshots (which must hold the MTP layer's window writes)."""
        drafts = self.mtp.run(self.model, self.builder, self.cache, plan)
        for c in copies_after:
            self.cache.copy(c.pool, c.src, c.dst)
        return drafts

    def _sample(self, logits: torch.Tensor | None, chunks, sampling_requests: list, requests: dict) -> SampledTokens:
        """The step's tokens; ``sampling_requests``: the requests of the sampling chunks, in order."""
        if not sampling_requests:
            return SampledTokens()
        if logits.shape[0] != len(sampling_requests):  # verify chunks: several rows each
            return self._sample_with_verify(logits, [ch for ch in chunks if ch.sample], requests)
        sampling = [r.request_id for r in sampling_requests]
        params: list[SamplingParams] = [r.sampling_params for r in sampling_requests]
        # Only rows with processors or a seed need `_row_generator` (most rows: no call).
        gens = [self._row_generator(logits, i, r) if p.logits_processors or p.seed is not None else None
                for i, (r, p) in enumerate(zip(sampling_requests, params))]
        out = self.sampler.sample(logits, params, gens)
        return SampledTokens(
            dict(zip(sampling, out.token_ids)),
            {sampling[i]: [TokenLogprob(out.token_ids[i], out.logprobs[i], list(out.top_logprobs[i] or []))]
             for i in out.logprob_rows})

    def _sample_with_verify(self, logits: torch.Tensor, chunks: list, requests: dict) -> SampledTokens:
        """A step with verify chunks: greedy ones keep their agreeing drafts, sampled ones verify by
        rejection sampling (``spec_decode``); the other chunks sample as usual."""
        params, gens, rows, verifiable = [], [], [], {}
        for ch in chunks:
            p = requests[ch.request_id].sampling_params
            rows.append(len(params))
            if ch.num_drafts:
                # Logits processors mask each verify row as after the drafts before it, and say
                # how many drafts they could follow (the rest count as rejected).
                verifiable[ch.request_id] = mask_drafts(requests[ch.request_id], ch.token_ids[1:],
                                                        logits[len(params):len(params) + 1 + ch.num_drafts])
                # Verify rows take the sampler's greedy pick (unused by a sampled chunk, decided
                # below); their logprobs are computed below for the kept tokens only.
                params += [_GREEDY] * (1 + ch.num_drafts)
                gens += [None] * (1 + ch.num_drafts)
                continue
            gens.append(self._row_generator(logits, len(params), requests[ch.request_id]))
            params.append(p)
        out = self.sampler.sample(logits, params, gens)
        result = SampledTokens(spec=SpecCounts())
        counts = result.spec
        for ch, r in zip(chunks, rows):
            rid = ch.request_id
            if ch.num_drafts:
                p = requests[rid].sampling_params
                n = verifiable[rid]
                drafts, rows_k = ch.token_ids[1:1 + n], slice(r, r + 1 + n)
                if p.greedy:
                    tokens = accept_greedy(drafts, out.token_ids[rows_k])
                else:
                    probs = filtered_probs(logits[rows_k].float(), [p] * (1 + n))
                    tokens = accept_sampled(probs, drafts, self._generator(rid, p)
                                            or self.sampler.shared_generator(logits.device))
                result.verified[rid] = tokens
                counts.add(ch.num_drafts, len(tokens) - 1)
                if p.logprobs is not None:
                    result.logprobs[rid] = verify_logprobs(logits[r:r + len(tokens)], tokens, p)
                continue
            result.token_ids[rid] = out.token_ids[r]
            if out.logprobs[r] is not None:
                result.logprobs[rid] = [TokenLogprob(out.token_ids[r], out.logprobs[r], list(out.top_logprobs[r] or []))]
        return result

    def _row_generator(self, logits: torch.Tensor, row: int, request) -> torch.Generator | None:
        """Apply the request's logits processors to its row; its seeded generator (None: greedy or
        unseeded)."""
        p = request.sampling_params
        for proc in p.logits_processors:
            logits[row] = proc(request.output_token_ids, logits[row])
        return None if p.seed is None or p.greedy else self._generator(request.request_id, p)

    def propose_drafts(self, requests: list, k: list[int]) -> list[list[int]]:
        """Drafts for the next step (``spec_decode.propose``; the drafter is built on first use)."""
        if self.drafter is None:
            self.drafter = make_drafter(self.speculative_method)
        return propose(self.drafter, requests, k)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        g = self._generators.get(request_id)
        if g is None:
            g = self._generators[request_id] = make_generator(params.seed, device=self.device)
        return g

    def release(self, request_id: str) -> None:
        """Forget per-request state (the seeded generator) once a request is finished."""
        self._generators.pop(request_id, None)


def _prepare_logits_processors(sampling_requests: list) -> None:
    """Let processors with a `prepare(output_token_ids)` start their work (a grammar mask) now,
    so that it runs beside the forward instead of after it."""
    for request in sampling_requests:
        for proc in request.sampling_params.logits_processors:
            prepare = getattr(proc, "prepare", None)
            if prepare is not None:
                prepare(request.output_token_ids)
