"""Speculative decoding on the runner side: verify drafts against the target's tokens and
propose the next drafts.

A verify chunk feeds ``[t, d1, …, dk]`` (the last known token and k drafts) and gets the
target's token after each of them, ``g0 … gk``. Greedy verification keeps the longest prefix
with ``d(i+1) == g(i)`` — ``a`` drafts — and the target's token after it, so the step yields
``d1 … da, g(a)`` = ``g0 … g(a)``: exactly the tokens greedy decoding would have produced one by
one. A sampled request verifies by rejection sampling (``accept_sampled``), which keeps the
target distribution exactly. Logprobs of the kept tokens come from their verify rows. Requests
with logits processors (grammar, logit bias) speculate when every processor can mask verify rows
(``mask_drafts``, below): row i as if drafts 1..i had been generated, its own state untouched. Drafts
come from a ``Drafter`` (engine/worker/drafter.py) or the MTP layer (engine/worker/mtp_drafter.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.worker.drafter import NgramDrafter


@dataclass
class SpecCounts:
    """One step's verification, with vLLM's speculative-decoding metric meanings."""

    num_drafts: int = 0  # verify chunks
    num_draft_tokens: int = 0  # drafts proposed in them
    num_accepted_tokens: int = 0  # drafts accepted
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: drafts accepted at position i

    def add(self, num_drafts: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_position) < num_drafts:
            self.accepted_per_position += [0] * (num_drafts - len(self.accepted_per_position))
        for i in range(accepted):
            self.accepted_per_position[i] += 1


def accept_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    """The tokens a verify chunk yields: the target's tokens up to and including the first one
    that disagrees with its draft (``targets`` has one more entry than ``drafts``)."""
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return targets[:a + 1]


def accept_sampled(probs: torch.Tensor, drafts: list[int], generator: torch.Generator | None) -> list[int]:
    """Speculative sampling with a deterministic drafter (q one-hot on each draft): draft
    ``d(i+1)`` is kept with probability ``p_i(d)``; at the first rejection the token is drawn from
    the residual ``max(p_i - q, 0)`` (``p_i`` without ``d``, renormalised), and when every draft is
    kept a last token from ``p_k``. The output tokens then follow the target's ``p`` exactly.
    ``probs``: ``[k+1, V]`` target probabilities after temperature / top-k / top-p."""
    out = []
    for i, d in enumerate(drafts):
        u = torch.rand((), generator=generator, device=probs.device)
        if u.item() < probs[i, d].item():
            out.append(d)
            continue
        residual = probs[i].clone()
        residual[d] = 0.0
        out.append(_race(residual, generator))
        return out
    out.append(_race(probs[len(drafts)], generator))
    return out


def _race(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """A token drawn with probability proportional to ``weights`` (the exponential race)."""
    noise = torch.empty_like(weights, dtype=torch.float32).exponential_(generator=generator)
    return int((weights / noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax())


def can_speculate(request) -> bool:
    """Every logits processor can mask verify rows (``mask_drafts(output_token_ids, drafts,
    rows) -> drafts it could follow``); a processor without it (its state advances token by token
    only) keeps its request on plain decoding."""
    return all(hasattr(p, "mask_drafts") for p in request.sampling_params.logits_processors)


def mask_drafts(request, drafts: list[int], rows: torch.Tensor) -> int:
    """Apply the request's processors to its verify rows ``rows [1 + k, V]`` in place (row i
    as after ``drafts[:i]``); the number of leading drafts every processor could follow (a draft
    a grammar refuses cannot be kept, nor anything after it: those count as rejected)."""
    n = len(drafts)
    for proc in request.sampling_params.logits_processors:
        n = min(n, proc.mask_drafts(request.output_token_ids, drafts, rows))
    return n


def make_drafter(method: str):
    if method == "ngram":
        return NgramDrafter()
    raise ValueError(f"unknown speculative method {method!r}")


def propose(drafter, requests: list, k: list[int]) -> list[list[int]]:
    """Up to ``k[i]`` drafts for each request (a drafter's -1 ends a row's drafts)."""
    if not requests:
        return []
    histories = [torch.tensor(r.prompt_token_ids + r.output_token_ids, dtype=torch.long) for r in requests]
    last = torch.tensor([h[-1] for h in histories], dtype=torch.long)
    positions = torch.tensor([len(h) - 1 for h in histories], dtype=torch.long)
    drafts, _ = drafter.propose(last, None, positions, torch.arange(len(requests)), max(k), histories)
    out = []
    for row, n in zip(drafts.tolist(), k):
        row = row[:n]
        out.append(row[:row.index(-1)] if -1 in row else row)
    return out
