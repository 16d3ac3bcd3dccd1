"""BatchBuilder: the step's ``ForwardBatch`` from the scheduler's chunks, on persistent buffers.

- Block tables: one persistent row per live sequence, keyed by its window slot (a host mirror,
  pinned on CUDA, and its device copy). A step writes only the blocks added since the row's
  last step; a table that changed otherwise (a slot reused by another request, a readmitted
  one) has its row rewritten: rows are compared by content, so the key only saves work.
- When a captured path (CUDA graph or ``torch.compile``) replays decode steps, a pure-decode
  step (one token per sequence) is padded to a size bucket with padding sequences that address
  only the cache's padding rows, and its context bound is rounded up to ``CONTEXT_BUCKET``, so
  one shape serves many steps. Eager steps keep their exact size.
- Per-token and per-sequence inputs are staged in host buffers (pinned on CUDA) and copied
  non-blocking into persistent device buffers; the forward reads views of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.worker.input_batch import NO_SLOT, CompressPlan, ForwardBatch, runs_of
from engine.worker.kv_cache import CSA_RATIO, HCA_RATIO, CacheShape

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTEXT_BUCKET = 1024  # tokens: the captured decode shapes' context-bound granularity


def decode_bucket(n: int) -> int:
    """The padded size of a decode batch of ``n`` sequences (``n`` itself past the last bucket)."""
    return next((b for b in DECODE_BUCKETS if b >= n), n)


class StagedBuffer:
    """One persistent device tensor fed from a host staging tensor (the same tensor on CPU)."""

    def __init__(self, capacity: int, device: torch.device, width: int | None = None, fill: int = 0):
        shape = (capacity,) if width is None else (capacity, width)
        self.device, self.fill = device, fill
        self.dev = torch.full(shape, fill, dtype=torch.long, device=device)
        self.host = self.dev if device.type == "cpu" else torch.full(shape, fill, dtype=torch.long).pin_memory()

    def put(self, values: list, n: int | None = None) -> torch.Tensor:
        """Write ``values`` (padded with ``fill`` to ``n``) and return the device view ``[:n]``."""
        n = len(values) if n is None else n
        if n > self.dev.shape[0]:
            self._grow(n)
        self.host[:len(values)] = torch.tensor(values, dtype=torch.long)
        self.host[len(values):n] = self.fill
        if self.host is not self.dev:
            self.dev[:n].copy_(self.host[:n], non_blocking=True)
        return self.dev[:n]

    def _grow(self, n: int) -> None:
        cap = max(n, 2 * self.dev.shape[0])
        old = self.dev
        self.__init__(cap, self.device, None if old.dim() == 1 else old.shape[1], self.fill)


@dataclass
class _TableRow:
    row: int
    c4: list[int]  # the blocks the row holds (host mirror)
    c128: list[int]
    table: object = None  # the scheduler's table object the row was last written from


class BlockTables:
    """Persistent block-table rows, one per live request, updated with the blocks each step adds."""

    def __init__(self, rows: int, shape: CacheShape, max_model_len: int, device: torch.device):
        self.width = {CSA_RATIO: max(1, -(-max_model_len // shape.c4_block_tokens)),
                      HCA_RATIO: max(1, -(-max_model_len // shape.c128_block_tokens))}
        self.device = device
        self.tables = {m: StagedBuffer(rows, device, width=w, fill=NO_SLOT) for m, w in self.width.items()}
        self._rows: dict[str, _TableRow] = {}
        self._free = list(range(rows))

    def rows_for(self, chunks, in_step: set[int]) -> list[int]:
        """The table row of every chunk's sequence, after writing its new blocks."""
        return [self._update(ch.block_table.window_slot, ch.block_table, in_step) for ch in chunks]

    def _evict(self, key: int) -> None:
        entry = self._rows.pop(key)
        self._write(entry.row, CSA_RATIO, 0, [NO_SLOT] * len(entry.c4))
        self._write(entry.row, HCA_RATIO, 0, [NO_SLOT] * len(entry.c128))
        self._free.append(entry.row)

    def gather(self, ratio: int, rows: torch.Tensor, blocks: int) -> torch.Tensor:
        """``[B, blocks]`` device block tables of ``rows`` (padding rows read as NO_SLOT)."""
        return self.tables[ratio].dev[rows, :blocks]

    def _update(self, key: int, bt, in_step: set[int]) -> int:
        entry = self._rows.get(key)
        if entry is None:
            entry = self._rows[key] = _TableRow(self._take_row(in_step), [], [])
        # The scheduler hands its live table objects (KVCacheManager.live_table), whose lists only
        # grow while the request runs: the same object again means "only appended", so a step costs
        # O(new blocks), not O(blocks). Another object (a readmitted request, a copy sent to a
        # tensor-parallel worker) is compared by content.
        same = entry.table is bt
        entry.table = bt
        for ratio, known, blocks in ((CSA_RATIO, entry.c4, bt.c4_blocks), (HCA_RATIO, entry.c128, bt.c128_blocks)):
            n = len(known)
            if len(blocks) == n and (same or blocks == known):
                continue
            # Tables only grow while a request runs; anything else (a readmitted request) is rewritten.
            start = n if same or blocks[:n] == known else 0
            if start == 0 and known:
                self._write(entry.row, ratio, 0, [NO_SLOT] * len(known))
            self._write(entry.row, ratio, start, blocks[start:])
            known[start:] = blocks[start:]
        return entry.row

    def _take_row(self, in_step: set[int]) -> int:
        if not self._free:  # a row of a sequence not in this step is rewritten if it returns
            stale = next((k for k in self._rows if k not in in_step), None)
            if stale is None:
                self._grow()
            else:
                self._evict(stale)
        return self._free.pop()

    def _grow(self) -> None:
        n = self.tables[CSA_RATIO].dev.shape[0]
        for m, t in self.tables.items():
            bigger = StagedBuffer(2 * n, self.device, width=t.dev.shape[1], fill=NO_SLOT)
            bigger.dev[:n] = t.dev
            if bigger.host is not bigger.dev:
                bigger.host[:n] = t.host
            self.tables[m] = bigger
        self._free += range(n, 2 * n)

    def _write(self, row: int, ratio: int, start: int, blocks: list[int]) -> None:
        if not blocks:
            return
        if start + len(blocks) > self.width[ratio]:
            raise ValueError(f"block table of {start + len(blocks)} blocks exceeds max_model_len "
                             f"({self.width[ratio]} blocks)")
        t = self.tables[ratio]
        t.host[row, start:start + len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        if t.host is not t.dev:
            t.dev[row, start:start + len(blocks)].copy_(t.host[row, start:start + len(blocks)], non_blocking=True)


class BatchBuilder:
    def __init__(self, shape: CacheShape, max_model_len: int, device: torch.device, capacity: int = 256):
        self.device, self.shape = device, shape
        self.block_tables = BlockTables(capacity, shape, max_model_len, device)
        names = ("input_ids", "positions", "seq_ids", "cu_seqlens", "start_pos", "end_pos", "window_slots",
                 "state_slots", "table_rows", "logits_rows")
        self.buffers = {n: StagedBuffer(capacity, device) for n in names}
        self.padding_row = None  # a block-table row that stays all NO_SLOT, for padding sequences

    def build(self, chunks, captured: bool = False) -> ForwardBatch:
        """The batch of ``chunks``. When ``captured`` (a graph or compiled path replays the
        shape) a pure-decode step is padded to its bucket, its context bound rounded up, and
        every row gets logits (the caller keeps the sampling chunks' rows)."""
        bts = [ch.block_table for ch in chunks]
        in_step = {bt.window_slot for bt in bts}
        rows = self.block_tables.rows_for(chunks, in_step)
        decode = all(len(ch.token_ids) == 1 for ch in chunks)
        B = len(chunks)
        Bp = decode_bucket(B) if decode and captured else B  # eager steps gain nothing from padding
        pad = Bp - B
        starts = [ch.start_pos for ch in chunks]
        if decode:  # one token per sequence: row b is sequence b (no per-token loop)
            ids = [ch.token_ids[0] for ch in chunks]
            ends = [s + 1 for s in starts]
            positions, seq_ids, cu = list(starts), list(range(B)), list(range(B + 1))
            logits_rows = [b for b, ch in enumerate(chunks) if ch.sample]
        else:
            ends = [ch.start_pos + len(ch.token_ids) for ch in chunks]
            ids, positions, seq_ids, cu, logits_rows = [], [], [], [0], []
            for b, ch in enumerate(chunks):
                n = len(ch.token_ids)
                ids += ch.token_ids
                positions += range(ch.start_pos, ch.start_pos + n)
                seq_ids += [b] * n
                cu.append(len(ids))
                if ch.sample:
                    logits_rows.append(len(ids) - 1)
        starts += [0] * pad
        ends += [1] * pad
        for b in range(B, Bp):
            ids.append(0)
            positions.append(0)
            seq_ids.append(b)
            cu.append(len(ids))
        max_end = max(ends[:B])
        if captured and decode:
            max_end = -(-max_end // CONTEXT_BUCKET) * CONTEXT_BUCKET
            logits_rows = list(range(Bp))  # one shape per bucket: every row, the runner picks
        put = {n: b.put for n, b in self.buffers.items()}
        table_rows = put["table_rows"](rows + [self._padding_row(in_step)] * pad)
        tables = {}
        for m, block_tokens in ((CSA_RATIO, self.shape.c4_block_tokens), (HCA_RATIO, self.shape.c128_block_tokens)):
            width = max(1, -(-max_end // block_tokens))
            tables[m] = self.block_tables.gather(m, table_rows, min(width, self.block_tables.width[m]))
        start_pos, end_pos = put["start_pos"](starts), put["end_pos"](ends)
        return ForwardBatch(
            input_ids=put["input_ids"](ids),
            positions=put["positions"](positions),
            seq_ids=put["seq_ids"](seq_ids),
            cu_seqlens=put["cu_seqlens"](cu),
            start_pos=start_pos,
            end_pos=end_pos,
            window_slots=put["window_slots"]([bt.window_slot for bt in bts] + [NO_SLOT] * pad),
            state_slots=put["state_slots"]([NO_SLOT if bt.state_slot is None else bt.state_slot
                                            for bt in bts] + [NO_SLOT] * pad),
            c4_tables=tables[CSA_RATIO],
            c128_tables=tables[HCA_RATIO],
            logits_rows=put["logits_rows"](logits_rows),
            plans={m: CompressPlan.of(starts, ends, start_pos, end_pos, m) for m in (CSA_RATIO, HCA_RATIO)},
            max_end_pos=max_end,
            runs=((Bp, 1),) if decode else runs_of([len(ch.token_ids) for ch in chunks]),
        )

    def _padding_row(self, in_step: set[int]) -> int:
        if self.padding_row is None:
            self.padding_row = self.block_tables._take_row(in_step)
        return self.padding_row
