"""Drafters for speculative decoding: propose k draft tokens per sequence for the target to verify.

Interface (owned by the engine side of issue 13; `MtpDrafter` implements the same protocol):

    propose(last_token_ids [B] long, hidden [B, H] or None, positions [B] long,
            slots [B] long, k: int, histories: list of 1-D long tensors or None)
        -> draft token ids [B, k] long, and optionally draft probabilities [B, k, V]
           (None for deterministic drafters: q is one-hot on the proposed token).
        `last_token_ids[i]` is the last accepted token of sequence i, at position
        `positions[i]`; `hidden` are the target's final hidden states for those positions
        (MTP consumes them, n-gram ignores them); `slots[i]` names the sequence's row in the
        drafter's own state, stable for the sequence's lifetime.
    accept(slots [B] long, num_accepted [B] long) -> None
        after verification: sequence i kept `num_accepted[i]` of its drafts (plus one target
        token); a drafter with cache state drops what it wrote for the rejected drafts.
    release(slot: int) -> None
        the sequence finished, was aborted or preempted; its drafter state is freed.

A row whose drafter has nothing to propose returns -1 in that draft position; the verifier
treats -1 as an always-rejected draft, so the step degrades to plain decoding for that row.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Drafter(Protocol):
    def propose(
        self,
        last_token_ids: torch.Tensor,
        hidden: torch.Tensor | None,
        positions: torch.Tensor,
        slots: torch.Tensor,
        k: int,
        histories: list[torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def accept(self, slots: torch.Tensor, num_accepted: torch.Tensor) -> None: ...

    def release(self, slot: int) -> None: ...


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens
    (n from `max_n` down to `min_n`) and propose the k tokens that followed it. Stateless."""

    def __init__(self, min_n: int = 1, max_n: int = 3) -> None:
        if not (1 <= min_n <= max_n):
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, last_token_ids, hidden, positions, slots, k, histories):
        if histories is None:
            raise ValueError("NgramDrafter needs the token histories")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        out = torch.full((len(histories), k), -1, dtype=torch.long)
        for i, seq in enumerate(histories):
            out[i] = self._lookup(seq, k)
        return out, None

    def _lookup(self, seq: torch.Tensor, k: int) -> torch.Tensor:
        draft = torch.full((k,), -1, dtype=torch.long)
        length = seq.numel()
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            tail = seq[length - n:]
            windows = seq[: length - 1].unfold(0, n, 1) if length - 1 >= n else None
            if windows is None:
                continue
            hits = (windows == tail).all(dim=1).nonzero().flatten()
            if hits.numel() == 0:
                continue
            start = int(hits[-1]) + n
            follow = seq[start:start + k]
            draft[: follow.numel()] = follow
            return draft
        return draft

    def accept(self, slots, num_accepted) -> None:
        return None

    def release(self, slot: int) -> None:
        return None
