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

from array import array
from dataclasses import dataclass

import torch

from engine.worker.input_batch import NO_SLOT, CompressPlan, ForwardBatch, runs_of
from engine.worker.kv_cache import CSA_RATIO, HCA_RATIO, CacheShape

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTEXT_BUCKET = 1024  # tokens: the captured decode shapes' context-bound granularity


def decode_bucket(n: int) -> int:
    """The padded size of a decode batch of ``n`` sequences (``n`` itself past the last bucket)."""
    return next((b for b in DECODE_BUCKETS if b >= n), n)


def host_longs(values: list[int]) -> torch.Tensor:
    """A CPU long tensor of ``values``: through ``array('q')``, 4-5x cheaper than
    ``torch.tensor(list)``, which converts element by element (this runs several times a step)."""
    if not values:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(array("q", values), dtype=torch.long)


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
        self.host[:len(values)] = host_longs(values)
        if n > len(values):
            self.host[len(values):n] = self.fill
        if self.host is not self.dev:
            self.dev[:n].copy_(self.host[:n], non_blocking=True)
        return self.dev[:n]

    def _grow(self, n: int) -> None:
        cap = max(n, 2 * self.dev.shape[0])
        old = self.dev
        self.__init__(cap, self.device, None if old.dim() == 1 else old.shape[1], self.fill)


class StagedRows:
    """``R`` per-sequence inputs staged together: one host tensor ``[R, capacity]`` filled by one
    ``torch.tensor`` call and copied to the device in one transfer (per step: one conversion and
    one copy instead of one per input). Each input is a contiguous row view."""

    def __init__(self, num_rows: int, capacity: int, device: torch.device):
        self.num_rows, self.device = num_rows, device
        self.dev = torch.zeros((num_rows, capacity), dtype=torch.long, device=device)
        self.host = self.dev if device.type == "cpu" else torch.zeros((num_rows, capacity), dtype=torch.long).pin_memory()

    def put(self, rows: list[list[int]]) -> torch.Tensor:
        """Write ``rows`` (``R`` lists of one length ``n``) and return the device view ``[R, n]``."""
        n = len(rows[0])
        if n > self.dev.shape[1]:
            self.__init__(self.num_rows, max(n, 2 * self.dev.shape[1]), self.device)
        flat = rows[0].copy()
        for row in rows[1:]:
            flat += row
        self.host[:, :n] = host_longs(flat).view(len(rows), n)
        if self.host is not self.dev:
            self.dev[:, :n].copy_(self.host[:, :n], non_blocking=True)
        return self.dev[:, :n]


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
        rows, get = [], self._rows.get
        for ch in chunks:  # every sequence every step: the common case inline, no call
            bt = ch.block_table
            entry = get(bt.window_slot)
            if entry is not None and entry.table is bt and len(bt.c4_blocks) == len(entry.c4) \
                    and len(bt.c128_blocks) == len(entry.c128):
                rows.append(entry.row)  # most decode steps: the same live table, no block added
            else:
                rows.append(self._update(bt.window_slot, bt, in_step))
        return rows

    def _evict(self, key: int) -> None:
        entry = self._rows.pop(key)
        self._write(entry.row, CSA_RATIO, 0, [NO_SLOT] * len(entry.c4))
        self._write(entry.row, HCA_RATIO, 0, [NO_SLOT] * len(entry.c128))
        self._free.append(entry.row)

    def gather(self, ratio: int, rows: torch.Tensor, blocks: int) -> torch.Tensor:
        """``[B, blocks]`` device block tables of ``rows`` (padding rows read as NO_SLOT)."""
        return self.tables[ratio].dev[rows, :blocks]

    def _update(self, key: int, bt, in_step: set[int]) -> int:
        """Write the blocks of ``bt`` its row lacks (``rows_for`` has checked it lacks some)."""
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
        names = ("input_ids", "positions", "seq_ids", "cu_seqlens", "logits_rows")
        self.buffers = {n: StagedBuffer(capacity, device) for n in names}
        self.seq_inputs = StagedRows(5, capacity, device)  # start_pos, end_pos, window/state slots, table rows
        self.padding_row = None  # a block-table row that stays all NO_SLOT, for padding sequences
        self._ar: torch.Tensor | None = None

    def build(self, chunks, captured: bool = False) -> ForwardBatch:
        """The batch of ``chunks``. When ``captured`` (a graph or compiled path replays the
        shape) a pure-decode step is padded to its bucket, its context bound rounded up, and
        every row gets logits (the caller keeps the sampling chunks' rows)."""
        bts = [ch.block_table for ch in chunks]
        window_slots = [bt.window_slot for bt in bts]
        in_step = set(window_slots)
        rows = self.block_tables.rows_for(chunks, in_step)
        decode = all([len(ch.token_ids) == 1 for ch in chunks])  # a list: faster than a generator here
        if decode:
            return self._build_decode(chunks, bts, window_slots, rows, in_step, captured)
        B = len(chunks)
        put = {n: b.put for n, b in self.buffers.items()}
        starts = [ch.start_pos for ch in chunks]
        ends = [ch.start_pos + len(ch.token_ids) for ch in chunks]
        ids, positions, seq_ids, cu, logits_rows = [], [], [], [0], []
        for b, ch in enumerate(chunks):
            n = len(ch.token_ids)
            ids += ch.token_ids
            positions += range(ch.start_pos, ch.start_pos + n)
            seq_ids += [b] * n
            cu.append(len(ids))
            if ch.sample:  # a verify chunk: after its last known token and after every draft
                logits_rows += range(len(ids) - 1 - ch.num_drafts, len(ids))
        seq_inputs = self._seq_inputs(starts, ends, window_slots, bts, rows, in_step, 0)
        start_pos, end_pos = seq_inputs[0], seq_inputs[1]
        return self._batch(
            max(ends), seq_inputs, ids=put["input_ids"](ids), positions=put["positions"](positions),
            seq_ids=put["seq_ids"](seq_ids), cu_seqlens=put["cu_seqlens"](cu),
            logits_rows=put["logits_rows"](logits_rows),
            plans={m: CompressPlan.of(starts, ends, start_pos, end_pos, m) for m in (CSA_RATIO, HCA_RATIO)},
            runs=runs_of([len(ch.token_ids) for ch in chunks]))

    def _build_decode(self, chunks, bts, window_slots, rows, in_step, captured: bool) -> ForwardBatch:
        """One token per sequence: row b is sequence b, so positions are the start positions,
        ``seq_ids``/``cu_seqlens``/``logits_rows`` are ranges (views of one constant tensor) and
        every sequence completes at most one compressed entry per ratio (no per-token lists)."""
        B = len(chunks)
        Bp = decode_bucket(B) if captured else B  # eager steps gain nothing from padding
        pad = Bp - B
        starts = [ch.start_pos for ch in chunks]
        max_end = max(starts) + 1
        if captured:
            max_end = -(-max_end // CONTEXT_BUCKET) * CONTEXT_BUCKET
        ar = self._arange(Bp + 1)
        if captured or all([ch.sample for ch in chunks]):
            logits_rows = ar[:Bp] if captured else ar[:B]  # captured: one shape per bucket, the runner picks
        else:
            logits_rows = self.buffers["logits_rows"].put([b for b, ch in enumerate(chunks) if ch.sample])
        ends = [s + 1 for s in starts]
        seq_inputs = self._seq_inputs(starts, ends, window_slots, bts, rows, in_step, pad)
        start_pos, end_pos = seq_inputs[0], seq_inputs[1]
        seqs = ar[:Bp]
        return self._batch(
            max_end, seq_inputs, ids=self.buffers["input_ids"].put([ch.token_ids[0] for ch in chunks], Bp),
            positions=start_pos, seq_ids=seqs, cu_seqlens=ar[:Bp + 1], logits_rows=logits_rows,
            plans={m: CompressPlan.one_each(start_pos, end_pos, m, seqs) for m in (CSA_RATIO, HCA_RATIO)},
            runs=((Bp, 1),))

    def _seq_inputs(self, starts, ends, window_slots, bts, rows, in_step, pad: int) -> torch.Tensor:
        """``[5, B + pad]``: start_pos, end_pos, window slots, state slots, block-table rows.
        Padding sequences sit at position 0 (one token) and address only padding rows."""
        state_slots = [NO_SLOT if bt.state_slot is None else bt.state_slot for bt in bts]
        if pad:
            starts, ends = starts + [0] * pad, ends + [1] * pad
            window_slots, state_slots = window_slots + [NO_SLOT] * pad, state_slots + [NO_SLOT] * pad
            rows = rows + [self._padding_row(in_step)] * pad
        return self.seq_inputs.put([starts, ends, window_slots, state_slots, rows])

    def _batch(self, max_end: int, seq_inputs: torch.Tensor, *, ids, positions, seq_ids, cu_seqlens, logits_rows,
               plans, runs) -> ForwardBatch:
        """The parts both layouts share: per-sequence inputs and the block tables' rows."""
        start_pos, end_pos, window_slots, state_slots, table_rows = seq_inputs.unbind(0)
        tables = {}
        for m, block_tokens in ((CSA_RATIO, self.shape.c4_block_tokens), (HCA_RATIO, self.shape.c128_block_tokens)):
            width = max(1, -(-max_end // block_tokens))
            tables[m] = self.block_tables.gather(m, table_rows, min(width, self.block_tables.width[m]))
        return ForwardBatch(
            input_ids=ids, positions=positions, seq_ids=seq_ids, cu_seqlens=cu_seqlens, start_pos=start_pos,
            end_pos=end_pos, window_slots=window_slots, state_slots=state_slots,
            c4_tables=tables[CSA_RATIO], c128_tables=tables[HCA_RATIO], logits_rows=logits_rows, plans=plans,
            max_end_pos=max_end, runs=runs,
        )

    def _arange(self, n: int) -> torch.Tensor:
        """``0 .. n-1`` on the device, a view of one persistent tensor (grown when needed)."""
        if self._ar is None or self._ar.shape[0] < n:
            self._ar = torch.arange(max(n, 2 * (0 if self._ar is None else self._ar.shape[0]), 1025),
                                    dtype=torch.long, device=self.device)
        return self._ar[:n]

    def _padding_row(self, in_step: set[int]) -> int:
        if self.padding_row is None:
            self.padding_row = self.block_tables._take_row(in_step)
        return self.padding_row
