"""MTP drafting: after each target forward, the checkpoint's MTP layer (engine/model/mtp.py)
drafts the next step's tokens.

1. **Catch-up pass** over every position the step made final — each fed row whose next token
   is now known: a prefill chunk's rows (the next prompt token, or the sampled one after the
   last), a decode row (the sampled token), a verify chunk's rows up to its last kept token
   (the kept tokens). It reads the target's final streams of those rows and writes the MTP
   layer's KV window there, so every position passes through the MTP layer exactly once with
   its true inputs (prefill included: a sequence's first drafts see its whole window).
2. **Chain**: the catch-up's last row of each drafting sequence gives draft 1; draft ``j+1``
   comes from one more MTP pass at the next position, fed the layer's own output streams and
   draft ``j`` (DeepSeek-V3's chaining). These passes are decode batches derived on the device,
   and their window writes land beyond the last final position: the ring slack keeps them off
   live rows, and the next catch-up rewrites the positions that become final.

Drafts are greedy (argmax of the MTP logits): a deterministic drafter, which the verifier's
rejection sampling expects (q one-hot on the draft). One device->host copy per step: the
``[B, k]`` draft table.

``plan`` (host only: what to feed) and ``run`` (the passes) are apart so that tensor-parallel
ranks, which all hold the step's target streams, run the same passes from the driver's plan.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.worker.batch_builder import host_longs
from engine.worker.sampler import first_argmax
from engine.worker.spec_decode import can_speculate


@dataclass
class MtpPlan:
    """One step's MTP passes: the catch-up chunks (the drafting requests' first), the target
    batch row each catch-up row reads its streams from, and how many chunks draft."""

    chunks: list  # ScheduledChunk: the tokens after the final rows, at their positions
    rows: list[int]
    num_drafting: int

    @property
    def request_ids(self) -> list[str]:
        return [ch.request_id for ch in self.chunks[:self.num_drafting]]


class MtpDrafting:
    def __init__(self, num_tokens: int, max_batch: int):
        if num_tokens < 1:
            raise ValueError(f"MTP drafting needs speculative_tokens >= 1, got {num_tokens}")
        self.num_tokens, self.max_batch = num_tokens, max_batch
        self.target_streams = None  # final streams [T, hc, D] of the step's target forward

    def plan(self, chunks, requests: dict, sampled) -> MtpPlan:
        """Catch-up over the step's chunks; drafts for the sampling chunks whose requests may
        speculate (none past ``max_batch``)."""
        wants = [ch.sample and can_speculate(requests[ch.request_id]) for ch in chunks]
        if sum(wants) > self.max_batch:
            wants = [False] * len(chunks)
        first, rest, row0 = [], [], 0
        for ch, want in zip(chunks, wants):  # the target batch lays chunks out in order, unpadded
            nxt = _next_tokens(ch, requests[ch.request_id], sampled)
            (first if want else rest).append((replace(ch, token_ids=nxt, sample=want, num_drafts=0), row0))
            row0 += len(ch.token_ids)
        # Drafting sequences first: the chain batches are their prefix of the catch-up batch.
        order = first + rest
        rows = [r for ch, row0 in order for r in range(row0, row0 + len(ch.token_ids))]
        return MtpPlan([ch for ch, _ in order], rows, len(first))

    @torch.inference_mode()
    def run(self, model, builder, cache, plan: MtpPlan) -> dict[str, list[int]]:
        """The catch-up pass, then the chain; the drafts by request id."""
        streams, self.target_streams = self.target_streams, None
        if not plan.chunks:
            return {}
        # The sampled tokens reached the host already: the builder's staging buffers are free.
        mb = builder.build(plan.chunks)
        prev = streams[host_longs(plan.rows).to(streams.device, non_blocking=True)]
        out, hidden = model.mtp_hidden(prev, mb.input_ids, mb, cache)
        if not plan.num_drafting:
            return {}
        drafts = [first_argmax(model.compute_logits(hidden))]
        prev, step = out[mb.logits_rows], mb
        for _ in range(self.num_tokens - 1):
            step = step.following_decode(plan.num_drafting, drafts[-1])
            prev, hidden = model.mtp_hidden(prev, drafts[-1], step, cache)
            drafts.append(first_argmax(model.compute_logits(hidden)))
        return dict(zip(plan.request_ids, torch.stack(drafts, dim=1).tolist()))


def _next_tokens(chunk, request, sampled) -> list[int]:
    """The token after each of the chunk's rows that is now final (see the module docstring)."""
    if chunk.num_drafts:
        return sampled.verified[chunk.request_id]
    if chunk.sample:
        return chunk.token_ids[1:] + [sampled.token_ids[chunk.request_id]]
    end = chunk.start_pos + len(chunk.token_ids)
    return chunk.token_ids[1:] + request.token_ids_slice(end, end + 1)
