"""ForwardBatch: one flat varlen batch of tokens from many sequences (prefill chunks, decode
tokens and multi-token verify chunks mixed), with where each sequence's cache lives — all as
tensors, so the model runs one path for every chunk without reading anything back to the host.

Built by the model runner (or ``ForwardBatch.build`` for tools and tests), read by the model.
Address ``-1`` (a slot or block) is the cache's padding row: writes that must not land anywhere
go there, and padded block-table columns point there.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from engine.worker.kv_cache import CSA_RATIO, HCA_RATIO

NO_SLOT = -1


@dataclass
class SeqView:
    """One sequence's slice of the flat batch and its cache handles (host side)."""

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


@dataclass(frozen=True)
class QueryTile:
    """``n_seqs`` consecutive sequences of the batch with ``rows_each`` query rows each (one
    sequence's slice of a long chunk when ``n_seqs == 1``): the unit the torch attention path
    reads keys for, so each sequence's compressed keys are read once per tile, not per query."""

    row0: int
    seq0: int
    n_seqs: int
    rows_each: int

    @property
    def rows(self) -> slice:
        return slice(self.row0, self.row0 + self.n_seqs * self.rows_each)

    @property
    def seqs(self) -> slice:
        return slice(self.seq0, self.seq0 + self.n_seqs)


def runs_of(lengths: list[int]) -> tuple[tuple[int, int], ...]:
    """Consecutive sequences with equal query lengths: ``((count, length), ...)`` in batch order."""
    runs: list[list[int]] = []
    for n in lengths:
        if runs and runs[-1][1] == n:
            runs[-1][0] += 1
        else:
            runs.append([1, n])
    return tuple((c, n) for c, n in runs)


@dataclass
class CompressPlan:
    """The compressed entries a step may complete at one ratio ``m``: for every sequence, each
    window from the one holding its first fed token to the one holding its last (so a decode
    batch has exactly one candidate per sequence). ``valid`` marks the windows that really
    complete this step; the others are computed and written to the padding row."""

    seq: torch.Tensor  # [E] sequence index
    window: torch.Tensor  # [E] entry (window) index within the sequence
    valid: torch.Tensor  # [E] bool

    @classmethod
    def one_each(cls, start_pos: torch.Tensor, end_pos: torch.Tensor, ratio: int,
                 seq: torch.Tensor | None = None) -> "CompressPlan":
        """One candidate window per sequence (every decode step): the window holding its token.
        ``seq``: ``arange(B)`` when the caller has one."""
        window = start_pos // ratio
        if seq is None:
            seq = torch.arange(start_pos.shape[0], device=start_pos.device)
        return cls(seq, window, (window + 1) * ratio <= end_pos)

    @classmethod
    def of(cls, starts: list[int], ends: list[int], start_pos: torch.Tensor, end_pos: torch.Tensor,
           ratio: int) -> "CompressPlan":
        """From the host-side bounds (which fix the entry count) and their device copies."""
        dev = start_pos.device
        counts = [(e - 1) // ratio - s // ratio + 1 for s, e in zip(starts, ends)]
        total = sum(counts)
        if total == len(starts) and min(counts, default=1) == 1:  # one window each: no repeat
            return cls.one_each(start_pos, end_pos, ratio)
        counts_t = _long(counts, dev)
        seq = torch.repeat_interleave(torch.arange(len(starts), device=dev), counts_t, output_size=total)
        window = start_pos[seq] // ratio + torch.arange(total, device=dev) - (counts_t.cumsum(0) - counts_t)[seq]
        return cls(seq, window, (window + 1) * ratio <= end_pos[seq])


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    seq_ids: torch.Tensor  # [T] which sequence each row belongs to
    cu_seqlens: torch.Tensor  # [B + 1] first row of each sequence (and T)
    start_pos: torch.Tensor  # [B] tokens already cached
    end_pos: torch.Tensor  # [B] tokens cached after this step
    window_slots: torch.Tensor  # [B]
    state_slots: torch.Tensor  # [B] (NO_SLOT without compressed layers)
    c4_tables: torch.Tensor  # [B, n4] block ids, padded with NO_SLOT
    c128_tables: torch.Tensor  # [B, n128]
    logits_rows: torch.Tensor  # [R] rows whose next-token logits are wanted
    plans: dict[int, CompressPlan]  # ratio -> entries this step may complete
    max_end_pos: int  # host-side bound: longest sequence after this step (sizes the loops)
    runs: tuple[tuple[int, int], ...]  # host-side ``runs_of`` the query lengths (shapes the query tiles)
    seqs: list[SeqView] | None = None  # the host views it was built from (for tools; the model never reads them)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    # ---- static copies (CUDA-graph replay) --------------------------------------------
    def _tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def shape_key(self) -> tuple:
        """Everything a captured forward's shapes depend on."""
        plans = tuple((m, p.seq.shape[0]) for m, p in sorted(self.plans.items()))
        return tuple(tuple(t.shape) for _, t in self._tensors()) + plans + (self.max_end_pos, self.runs)

    def clone(self) -> "ForwardBatch":
        plans = {m: CompressPlan(p.seq.clone(), p.window.clone(), p.valid.clone()) for m, p in self.plans.items()}
        return replace(self, plans=plans, seqs=None, **{n: t.clone() for n, t in self._tensors()})

    def copy_(self, other: "ForwardBatch") -> None:
        """Take ``other``'s values into these tensors (same ``shape_key``)."""
        for name, t in self._tensors():
            t.copy_(getattr(other, name), non_blocking=True)
        for m, p in self.plans.items():
            q = other.plans[m]
            p.seq.copy_(q.seq, non_blocking=True)
            p.window.copy_(q.window, non_blocking=True)
            p.valid.copy_(q.valid, non_blocking=True)

    def tables(self, ratio: int) -> torch.Tensor:
        return self.c4_tables if ratio == CSA_RATIO else self.c128_tables

    def max_entries(self, ratio: int) -> int:
        """Most compressed entries any sequence of the batch can see at ``ratio``."""
        return self.max_end_pos // ratio

    def query_tiles(self, max_rows: int) -> list[QueryTile]:
        """The batch's rows as tiles of at most ``max_rows`` rows (at least one sequence or one
        row each): runs of equal-length sequences grouped, long chunks split into row slices."""
        tiles, row, seq = [], 0, 0
        for count, length in self.runs:
            if length >= max_rows:
                for s in range(seq, seq + count):
                    for r in range(0, length, max_rows):
                        tiles.append(QueryTile(row + (s - seq) * length + r, s, 1, min(max_rows, length - r)))
            else:
                per = max(1, max_rows // max(length, 1))
                for s0 in range(0, count, per):
                    tiles.append(QueryTile(row + s0 * length, seq + s0, min(per, count - s0), length))
            row, seq = row + count * length, seq + count
        return tiles

    def following_decode(self, num_seqs: int, input_ids: torch.Tensor) -> "ForwardBatch":
        """A decode batch of this batch's first ``num_seqs`` sequences, one token ``input_ids[b]``
        each at the position after its last fed one (chained MTP drafting: built on the device
        from this batch, no host round trip)."""
        pos = self.end_pos[:num_seqs]
        seqs = torch.arange(num_seqs + 1, device=pos.device)
        start, end = pos, pos + 1
        return ForwardBatch(
            input_ids=input_ids, positions=start, seq_ids=seqs[:num_seqs], cu_seqlens=seqs, start_pos=start,
            end_pos=end, window_slots=self.window_slots[:num_seqs], state_slots=self.state_slots[:num_seqs],
            c4_tables=self.c4_tables[:num_seqs], c128_tables=self.c128_tables[:num_seqs],
            logits_rows=seqs[:num_seqs],
            plans={m: CompressPlan.one_each(start, end, m, seqs[:num_seqs]) for m in (CSA_RATIO, HCA_RATIO)},
            max_end_pos=self.max_end_pos + 1, runs=((num_seqs, 1),))

    def newest_rows(self, span: int) -> torch.Tensor:
        """[T] bool: the row is among the last ``span`` positions of its sequence after this step
        (what a ring of ``span`` rows must keep)."""
        return self.positions >= (self.end_pos - span)[self.seq_ids]

    @classmethod
    def build(cls, token_lists: list[list[int]], seqs: list[SeqView], logits_rows: list[int],
              device: torch.device | str = "cpu") -> "ForwardBatch":
        """From host lists: token ids per sequence, their views, and the rows to sample."""
        ids = [t for toks in token_lists for t in toks]
        pos = [s.start_pos + i for s in seqs for i in range(s.num_tokens)]
        seq_ids = [b for b, s in enumerate(seqs) for _ in range(s.num_tokens)]
        starts, ends = [s.start_pos for s in seqs], [s.end_pos for s in seqs]
        start_pos, end_pos = _long(starts, device), _long(ends, device)
        cu = [0]
        for toks in token_lists:
            cu.append(cu[-1] + len(toks))
        return cls(
            input_ids=_long(ids, device),
            positions=_long(pos, device),
            seq_ids=_long(seq_ids, device),
            cu_seqlens=_long(cu, device),
            start_pos=start_pos,
            end_pos=end_pos,
            window_slots=_long([s.window_slot for s in seqs], device),
            state_slots=_long([NO_SLOT if s.state_slot is None else s.state_slot for s in seqs], device),
            c4_tables=block_table([s.c4_blocks for s in seqs], device),
            c128_tables=block_table([s.c128_blocks for s in seqs], device),
            logits_rows=_long(logits_rows, device),
            plans={m: CompressPlan.of(starts, ends, start_pos, end_pos, m) for m in (CSA_RATIO, HCA_RATIO)},
            max_end_pos=max(ends, default=0),
            runs=runs_of([len(t) for t in token_lists]),
            seqs=seqs,
        )


def block_table(rows: list[list[int]], device, width: int | None = None) -> torch.Tensor:
    """``[B, width]`` long, each row padded with NO_SLOT (the padding block)."""
    width = max(1, max((len(r) for r in rows), default=1)) if width is None else width
    return _long([list(r) + [NO_SLOT] * (width - len(r)) for r in rows], device).view(len(rows), width)


def _long(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
