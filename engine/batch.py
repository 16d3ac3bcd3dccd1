"""ForwardBatch: one flat varlen batch of tokens from many sequences (prefill chunks and decode
tokens mixed), plus where each sequence's cache lives. Built by the model runner, read by the
model; nothing else."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SeqView:
    """One sequence's slice of the flat batch and its cache handles."""

    row_start: int  # first row of this sequence in the flat token tensor
    num_tokens: int  # tokens fed this step
    start_pos: int  # absolute position of the first fed token (= tokens already cached)
    window_slot: int
    state_slot: int | None  # None when the model has no compressed layers
    c4_blocks: list[int] = field(default_factory=list)
    c128_blocks: list[int] = field(default_factory=list)

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_tokens

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_start + self.num_tokens)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    seqs: list[SeqView]
    # Rows whose next-token logits are wanted (the last fed token of sampling sequences).
    logits_rows: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(cls, token_lists: list[list[int]], seqs: list[SeqView], logits_rows: list[int],
              device: torch.device | str = "cpu") -> "ForwardBatch":
        ids = [t for toks in token_lists for t in toks]
        pos = [s.start_pos + i for s in seqs for i in range(s.num_tokens)]
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(pos, dtype=torch.long, device=device),
            seqs=seqs,
            logits_rows=logits_rows,
        )
