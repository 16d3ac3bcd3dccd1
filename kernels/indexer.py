"""Lightning-indexer top-k over the paged C4 indexer keys (spec §3.7), chunked over the context.

For query ``t`` (sequence ``seq[t]``, ``visible[t]`` completed entries) and entry ``e``::

    score[t, e] = sum_h w[t, h] * ReLU(q[t, h] . key[seq[t], e]) * dim^-0.5   (e < visible[t], else -inf)

and the result is the ``topk`` entries of highest score, ties to the lower entry id, with which of
them are real (``< visible``). Entries are scored ``chunk`` at a time and merged into a running
top-k (the k-th largest score as a threshold, ties taken in id order: no sort of the chunk), so
memory is ``[Q, topk + chunk]`` whatever the context: the top-k of the whole order (score
descending, id ascending) does not depend on the chunking.

``indexer_scores_torch`` gathers and decodes the keys, ``indexer_scores_triton`` reads them in
place from the pool through the block tables (FP4 records decoded in the kernel). The torch side
merges each chunk with a dozen small torch ops and sorts once at the end; the Triton side merges
each chunk in one launch (``indexer_merge_triton``, the best kept in final order), so a decode
step with one chunk is two launches. Both orders are the same total order (score descending, id
ascending), so equal scores give identical ids either way. Scores agree to
float32 rounding (the sums run in a different order); with a tensor-parallel ``reduce`` the
partial scores of each rank's heads are summed before the merge.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from kernels.kv_records import FP4_KEY, PLAIN, decode_rows, entry_block_row, gather_rows, load_fp4_key

BLOCK_N = 32  # entries per program
Reduce = Callable[[torch.Tensor], torch.Tensor]


def check_indexer_args(q: torch.Tensor, w: torch.Tensor, seq: torch.Tensor, visible: torch.Tensor,
                       tables: torch.Tensor, pool: torch.Tensor, fmt: int, topk: int) -> None:
    """Raise ValueError (naming the parameter) unless the arguments describe one indexer call."""
    if q.dim() != 3:
        raise ValueError(f"q must be [Q, H, dim], got shape {tuple(q.shape)}")
    Q, H, D = q.shape
    if tuple(w.shape) != (Q, H):
        raise ValueError(f"w must be [Q={Q}, H={H}], got shape {tuple(w.shape)}")
    for name, t in (("seq", seq), ("visible", visible)):
        if tuple(t.shape) != (Q,) or t.dtype != torch.long:
            raise ValueError(f"{name} must be int64 [Q={Q}], got {t.dtype} {tuple(t.shape)}")
    if tables.dim() != 2 or tables.dtype != torch.long:
        raise ValueError(f"tables must be int64 [B, blocks], got {tables.dtype} {tuple(tables.shape)}")
    if pool.dim() != 3:
        raise ValueError(f"pool must be [blocks, entries per block, record], got shape {tuple(pool.shape)}")
    want = D // 2 + -(-D // 32) if fmt == FP4_KEY else D
    if fmt not in (PLAIN, FP4_KEY) or pool.shape[-1] != want or (fmt == FP4_KEY) != (pool.dtype == torch.uint8):
        raise ValueError(f"pool records must be {'uint8 FP4 keys' if fmt == FP4_KEY else 'plain keys'} of width "
                         f"{want} for dim {D}, got {pool.dtype} {tuple(pool.shape)}")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    devices = {t.device for t in (q, w, seq, visible, tables, pool)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must share one device, got {sorted(map(str, devices))}")


def indexer_scores_torch(q, w, seq, visible, tables, pool, fmt: int, c0: int, c1: int) -> torch.Tensor:
    """Scores ``[Q, c1 - c0]`` of entries ``[c0, c1)``: keys gathered and decoded, fp32 einsum."""
    Q, H, D = q.shape
    ids = torch.arange(c0, c1, device=q.device).expand(Q, -1)
    keys = decode_rows(gather_rows(pool, tables, seq, ids), fmt, D, 0, q.dtype).float()
    scores = torch.einsum("qhd,qcd->qhc", q.float(), keys).relu_() * (D ** -0.5)
    scores = (scores * w.float()[:, :, None]).sum(dim=1)
    return scores.masked_fill(ids >= visible[:, None], float("-inf"))


@triton.jit
def _indexer_scores_kernel(
    q_ptr, w_ptr, seq_ptr, vis_ptr, table_ptr, pool_ptr, out_ptr,
    H, D, E, n_cols, pad_row, c0, c1, scale,
    stride_qq, stride_qh, stride_qd, stride_wq, stride_wh, stride_tb, stride_tc,
    stride_pb, stride_pe, stride_oq, stride_oc,
    FMT: tl.constexpr, KEY_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (query, block of entries): all of the query's heads against the block's keys.
    t = tl.program_id(0)
    ids = c0 + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok, d_ok, n_ok = h < H, d < D, ids < c1
    seq = tl.load(seq_ptr + t)
    vis = tl.load(vis_ptr + t)
    q = tl.load(q_ptr + t * stride_qq + h[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=h_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + t * stride_wq + h * stride_wh, mask=h_ok, other=0.0).to(tl.float32)
    block, row = entry_block_row(table_ptr, stride_tb, stride_tc, n_cols, pad_row, seq, ids, n_ok & (ids < vis), E)
    rec = pool_ptr + block.to(tl.int64) * stride_pb + row * stride_pe
    k_ok = (n_ok & (ids < vis))[:, None] & d_ok[None, :]
    if FMT == 2:  # FP4_KEY
        k = load_fp4_key(rec[:, None], d[None, :], k_ok, DIM=KEY_DIM)
    else:
        k = tl.load(rec[:, None] + d[None, :], mask=k_ok, other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32)  # [BLOCK_H, BLOCK_N]
    s = tl.maximum(s, 0.0) * scale
    score = tl.sum(s * w[:, None], axis=0)
    score = tl.where(ids < vis, score, float("-inf"))
    tl.store(out_ptr + t * stride_oq + (ids - c0) * stride_oc, score, mask=n_ok)


def indexer_scores_triton(q, w, seq, visible, tables, pool, fmt: int, c0: int, c1: int) -> torch.Tensor:
    """Same scores as the twin, the keys read in place from ``pool``."""
    Q, H, D = q.shape
    out = torch.empty(Q, c1 - c0, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if fmt == FP4_KEY and D & (D - 1):
        raise ValueError(f"FP4 indexer keys need a power-of-two dim, got {D}")
    if pool.stride(-1) != 1:
        raise ValueError("pool records must be contiguous in their last dimension")
    grid = (Q, triton.cdiv(c1 - c0, BLOCK_N))
    _indexer_scores_kernel[grid](
        q, w, seq, visible, tables, pool, out,
        H, D, pool.shape[1], tables.shape[1], pool.shape[0] - 1, c0, c1, float(D ** -0.5),
        *q.stride(), *w.stride(), *tables.stride(), pool.stride(0), pool.stride(1), *out.stride(),
        FMT=fmt, KEY_DIM=D, BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out


Merge = Callable[[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, int, int],
                 tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def indexer_topk(scores_of: Callable[[int, int], torch.Tensor], Q: int, visible: torch.Tensor, num_entries: int,
                 topk: int, chunk: int, reduce: Reduce | None = None,
                 merge: Merge | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k over entries ``[0, num_entries)``, ``chunk`` at a time: entry ids ``[Q, k]``
    (``k = min(topk, num_entries)``, score descending, ties to the lower id) and which are real
    (``< visible``). ``scores_of(c0, c1)`` gives the ``[Q, c1 - c0]`` scores of a chunk (``-inf``
    where not visible). ``merge``: a fused merge of each chunk into the best (``indexer_merge``'s
    contract: it masks what is not visible itself and keeps the final order); default the torch
    merge below."""
    device = visible.device
    if num_entries <= topk:  # top-k keeps every visible entry: no scoring needed
        ids = torch.arange(num_entries, device=device).expand(Q, -1)
        return ids, ids < visible[:, None]
    chunk = max(chunk, topk)
    if merge is not None:
        best_scores = best_ids = valid = None
        for c0 in range(0, num_entries, chunk):
            scores = scores_of(c0, min(c0 + chunk, num_entries))
            if reduce is not None:  # indexer heads are split across tensor-parallel ranks
                scores = reduce(scores)
            best_scores, best_ids, valid = merge(best_scores, best_ids, scores, visible, c0, topk)
        return best_ids, valid
    best_scores = best_ids = None  # kept in ascending id order, so a column's order is its id's
    for c0 in range(0, num_entries, chunk):
        c1 = min(c0 + chunk, num_entries)
        scores = scores_of(c0, c1)
        if reduce is not None:  # indexer heads are split across tensor-parallel ranks
            scores = reduce(scores).masked_fill(torch.arange(c0, c1, device=device) >= visible[:, None],
                                                float("-inf"))
        best_scores, best_ids = _merge_step(best_scores, best_ids, scores, c0, topk)
    best_scores, best_ids = _final_order(best_scores, best_ids)
    return best_ids, best_ids < visible[:, None]


def _merge_step(best_scores: torch.Tensor | None, best_ids: torch.Tensor | None, scores: torch.Tensor, c0: int,
                topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``topk`` best of the best so far and the chunk ``scores`` of entries ``c0...``, in
    column order (the best first, then the chunk): ties to the lower column."""
    cand = scores if best_scores is None else torch.cat([best_scores, scores], dim=1)
    cols = _top_k_columns(cand, topk)
    kept = 0 if best_ids is None else best_ids.shape[1]
    chunk_ids = cols + (c0 - kept)
    best_ids = chunk_ids if best_ids is None else torch.where(
        cols < kept, best_ids.gather(1, cols.clamp(max=kept - 1)), chunk_ids)
    return cand.gather(1, cols), best_ids


def _final_order(best_scores: torch.Tensor, best_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Score descending; stable, on columns whose order is their ids': equal scores keep the lower id first."""
    sorted_scores, order = best_scores.sort(dim=1, descending=True, stable=True)
    return sorted_scores, best_ids.gather(1, order)


def indexer_merge_torch(best_scores: torch.Tensor | None, best_ids: torch.Tensor | None, scores: torch.Tensor,
                        visible: torch.Tensor, c0: int, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the chunk ``scores [Q, c]`` of entries ``[c0, c0 + c)`` (those ``>= visible`` count as
    ``-inf``) into the best so far (``[Q, k]`` scores and ids in the final order, or None): the new
    best ``topk`` scores, ids (final order: score descending, ties to the lower id) and validity.
    The best's entries all precede the chunk's, and within the best equal scores are in id order,
    so a column's order among equal scores is its id's: the torch merge applies as it is."""
    scores = scores.masked_fill(torch.arange(c0, c0 + scores.shape[1], device=scores.device) >= visible[:, None],
                                float("-inf"))
    best_scores, best_ids = _final_order(*_merge_step(best_scores, best_ids, scores, c0, topk))
    return best_scores, best_ids, best_ids < visible[:, None]


@triton.jit
def _order_keys(score, ids):
    """int64 keys whose descending order is (score descending, id ascending): the float's bits
    made monotonic as a signed int (negatives: low 31 bits flipped) above ``2^31 - 1 - id``."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with 0.0, as in torch's comparisons
    bits = score.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (bits.to(tl.int64) << 32) | (0x7FFFFFFF - ids)


@triton.jit
def _merge_kernel(
    best_s_ptr, best_i_ptr, scores_ptr, vis_ptr, out_s_ptr, out_i_ptr, out_v_ptr,
    kept, n_cols, c0, topk,
    stride_bsq, stride_bsk, stride_biq, stride_bik, stride_sq, stride_sc, stride_oq,
    HAS_BEST: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per query; its best BLOCK_K (>= topk) candidates stay in registers as keys sorted
    # descending. Each block of BLOCK_K chunk entries sorted ascending against them: the lane-wise
    # max of a descending and an ascending sequence is the top half of their union (the bitonic
    # merge step), so one more sort restores the order; no slicing, no global scratch.
    t = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK_K)
    vis = tl.load(vis_ptr + t)
    none = -9223372036854775808  # below every real key (-inf's included)
    if HAS_BEST:
        b_ok = lane < kept
        b_s = tl.load(best_s_ptr + t * stride_bsq + lane * stride_bsk, mask=b_ok, other=0.0)
        b_ids = tl.load(best_i_ptr + t * stride_biq + lane * stride_bik, mask=b_ok, other=0)
        best = tl.sort(tl.where(b_ok, _order_keys(b_s, b_ids), none), descending=True)
    else:
        best = tl.full([BLOCK_K], none, dtype=tl.int64)
    for start in range(0, n_cols, BLOCK_K):
        col = start + lane
        ok = col < n_cols
        ids = c0 + col.to(tl.int64)
        s = tl.load(scores_ptr + t * stride_sq + col.to(tl.int64) * stride_sc, mask=ok, other=0.0)
        s = tl.where(ids < vis, s, float("-inf"))
        keys = tl.where(ok, _order_keys(s, ids), none)
        if tl.max(keys, axis=0) > tl.min(best, axis=0):  # else nothing in the block makes the cut
            best = tl.sort(tl.maximum(best, tl.sort(keys)), descending=True)
    hi = (best >> 32).to(tl.int32)
    out_score = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    out_ids = 0x7FFFFFFF - (best & 0x7FFFFFFF)
    out = lane < topk
    tl.store(out_s_ptr + t * stride_oq + lane, out_score, mask=out)
    tl.store(out_i_ptr + t * stride_oq + lane, out_ids, mask=out)
    tl.store(out_v_ptr + t * stride_oq + lane, out_ids < vis, mask=out)


def indexer_merge_triton(best_scores: torch.Tensor | None, best_ids: torch.Tensor | None, scores: torch.Tensor,
                         visible: torch.Tensor, c0: int, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The twin's merge in one launch (identical results: the order is a total one on exact scores).

    Why sorted keys in registers: k reaches 2048 and a decode chunk holds thousands of entries, so
    a k-pass arg-max costs O(k * chunk) and a threshold/scatter merge is the ~20 launches this
    replaces; a bitonic tl.sort of BLOCK_K packed (score, id) keys costs O(log^2 BLOCK_K) per
    entry, keeps ties exact (ids are in the key) and leaves the best already in final order.
    Blocks whose best key misses the current cut skip the sorts."""
    Q, n_cols = scores.shape
    dev = scores.device
    out_s = torch.empty(Q, topk, dtype=torch.float32, device=dev)
    out_i = torch.empty(Q, topk, dtype=torch.long, device=dev)
    out_v = torch.empty(Q, topk, dtype=torch.bool, device=dev)
    if Q == 0:
        return out_s, out_i, out_v
    has_best = best_scores is not None
    bs = best_scores if has_best else out_s  # any tensor: unused unless HAS_BEST
    bi = best_ids if has_best else out_i
    # At least topk lanes; up to 128 so long chunks take few blocks, no wider than the chunk needs.
    block_k = max(triton.next_power_of_2(topk), min(128, triton.next_power_of_2(n_cols)))
    _merge_kernel[(Q,)](
        bs, bi, scores, visible, out_s, out_i, out_v,
        bs.shape[1] if has_best else 0, n_cols, c0, topk,
        *bs.stride(), *bi.stride(), *scores.stride(), out_s.stride(0),
        HAS_BEST=has_best, BLOCK_K=block_k, num_warps=4 if block_k <= 512 else 8,
    )
    return out_s, out_i, out_v


def _top_k_columns(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Columns ``[Q, k]`` (ascending) of each row's ``k`` highest scores, ties to the lower column:
    the first ``k`` of a stable descending sort, in O(columns) passes instead of a sort."""
    kth = scores.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = scores > kth
    tie = scores == kth
    keep = above | (tie & (tie.cumsum(1) <= k - above.sum(1, keepdim=True)))
    slot = torch.where(keep, keep.cumsum(1) - 1, k)  # rank among the kept; the rest go to column k
    cols = torch.empty(scores.shape[0], k + 1, dtype=torch.long, device=scores.device)
    cols.scatter_(1, slot, torch.arange(scores.shape[1], device=scores.device).expand_as(slot))
    return cols[:, :k]
