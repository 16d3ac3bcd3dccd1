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
class DecodeGroup:
    """The sequences of a batch that feed exactly one token, as tensors, so attention can
    serve all of them with batched gathers instead of a loop."""

    seq_index: list[int]  # positions in ForwardBatch.seqs
    rows: torch.Tensor  # [B] flat-batch rows
    positions: torch.Tensor  # [B]
    window_slots: torch.Tensor  # [B]
    state_slots: torch.Tensor | None  # [B]
    c4_tables: torch.Tensor  # [B, max blocks] (padded with 0; entries past a sequence's count are masked)
    c128_tables: torch.Tensor

    @classmethod
    def of(cls, seqs: list[SeqView], device) -> "DecodeGroup | None":
        idx = [i for i, s in enumerate(seqs) if s.num_tokens == 1]
        if not idx:
            return None
        chosen = [seqs[i] for i in idx]

        def table(attr):
            width = max(1, max(len(getattr(s, attr)) for s in chosen))
            return torch.tensor([getattr(s, attr) + [0] * (width - len(getattr(s, attr))) for s in chosen],
                                dtype=torch.long, device=device)

        def col(values):
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            seq_index=idx,
            rows=col([s.row_start for s in chosen]),
            positions=col([s.start_pos for s in chosen]),
            window_slots=col([s.window_slot for s in chosen]),
            state_slots=col([s.state_slot for s in chosen]) if chosen[0].state_slot is not None else None,
            c4_tables=table("c4_blocks"),
            c128_tables=table("c128_blocks"),
        )


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    seqs: list[SeqView]
    # Rows whose next-token logits are wanted (the last fed token of sampling sequences).
    logits_rows: list[int] = field(default_factory=list)

    # Sequences feeding one token each; built once per batch, shared by every layer.
    decode: DecodeGroup | None = None
    batched_decode: bool = True

    def __post_init__(self) -> None:
        if self.batched_decode and self.decode is None:
            self.decode = DecodeGroup.of(self.seqs, self.input_ids.device)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def loop_seqs(self) -> list[SeqView]:
        """Sequences the per-sequence path handles (everything not in the decode group)."""
        if self.decode is None:
            return self.seqs
        in_group = set(self.decode.seq_index)
        return [s for i, s in enumerate(self.seqs) if i not in in_group]

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
