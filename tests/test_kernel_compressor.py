"""kernels.compress_entries / kernels.store_compressor_state: the twins against the engine's
Compressor math from before the fusion (copied below as the reference), bit for bit; the Triton
kernels against the twins under the interpreter; the engine's Compressor through the entry points;
the custom ops through opcheck and a fullgraph compile."""
import textwrap

import pytest
import torch

import kernels
from engine.model.attention import Compressor
from engine.model.layers import Rotary, apply_rope, rms_norm
from engine.worker.input_batch import NO_SLOT, CompressPlan, ForwardBatch, SeqView
from engine.worker.kv_cache import CompressorState
from kernels.compressor import compress_entries_torch, store_compressor_state_torch
from tests_util import assert_interpreted_script_passes

EPS = 1e-6

# Shared by the in-process tests and the interpreted script: a flat batch of sequences fed
# ``(start position, tokens)`` each (state slot i, or NO_SLOT where ``no_slot`` names it), raw GEMM
# outputs, a state ring with ``slack`` extra rows holding earlier steps' rows, norm and cos/sin.
SETUP = textwrap.dedent("""
    import torch
    from engine.worker.input_batch import CompressPlan, ForwardBatch, SeqView

    def setup(feeds, ratio, overlap, d, rope, seed, slack=0, no_slot=(), dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        coff = 2 if overlap else 1
        seqs, row = [], 0
        for i, (start, n) in enumerate(feeds):
            seqs.append(SeqView(row, n, start, i, None if i in no_slot else i))
            row += n
        batch = ForwardBatch.build([[0] * n for _, n in feeds], seqs, [])
        starts, ends = [s.start_pos for s in seqs], [s.end_pos for s in seqs]
        plan = batch.plans[ratio] = CompressPlan.of(starts, ends, batch.start_pos, batch.end_pos, ratio)
        T, E, width = row, plan.seq.shape[0], coff * d
        kv = torch.randn(T, width, generator=g)
        score = torch.randn(T, width, generator=g) * 2
        ape = torch.randn(ratio, width, generator=g)
        span = coff * ratio + slack
        state_kv = torch.randn(len(feeds) + 1, span, width, generator=g)
        state_score = torch.randn(len(feeds) + 1, span, width, generator=g) * 2
        norm_weight = torch.randn(d, generator=g)
        angle = torch.rand(E, rope // 2, generator=g) * 6
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        entries = (kv, score, ape, state_kv, state_score, plan.seq, plan.window, batch.start_pos, batch.cu_seqlens,
                   batch.state_slots, norm_weight, cos, sin)
        store = (kv, score, ape, batch.positions, batch.seq_ids, batch.state_slots, batch.end_pos)
        return batch, entries, store

    # (feeds, ratio, overlap, d, rope, slack, no_slot): decode tokens at window starts/ends
    # (position 0: the first window, no predecessor), multi-token chunks whose windows take slots
    # partly from the ring and partly from the step, a prefill from 0, a sequence without state
    # slot, speculative slack in the ring.
    CASES = [
        ([(0, 1), (3, 1), (7, 1), (10, 1), (5, 9), (0, 13), (6, 2)], 4, True, 24, 8, 0, ()),
        ([(3, 1), (9, 4), (2, 7), (15, 1)], 4, True, 72, 16, 3, (1,)),
        ([(0, 1), (7, 1), (13, 6), (0, 20), (5, 11)], 8, False, 72, 16, 0, ()),
        ([(6, 3), (22, 2)], 8, False, 24, 8, 2, ()),
        ([(127, 1), (100, 40), (0, 3)], 128, False, 24, 8, 0, ()),
        ([(254, 4), (126, 3)], 128, False, 24, 24, 2, (0,)),
    ]
""")
_ns = {}
exec(SETUP, _ns)
setup, CASES = _ns["setup"], _ns["CASES"]

PARITY_SCRIPT = SETUP + textwrap.dedent("""
    import kernels
    from kernels.sink_attention import INTERPRETED
    from kernels.compressor import (compress_entries_torch, compress_entries_triton, store_compressor_state_torch,
                                    store_compressor_state_triton)

    assert INTERPRETED, "TRITON_INTERPRET=1 did not reach triton"
    EPS = 1e-6
    worst, worst_bf16 = 0.0, 0.0

    def close(got, want, what, rtol=1e-6):
        global worst, worst_bf16
        assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype, want.shape)
        if want.numel() == 0:
            return
        assert torch.isfinite(got.float()).all(), what
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
        assert err <= rtol, (what, err)
        if want.dtype == torch.float32:
            worst = max(worst, err)
        else:
            worst_bf16 = max(worst_bf16, err)

    def check(feeds, ratio, overlap, d, rope, slack, no_slot, seed, dtype=torch.float32, rtol=1e-6):
        batch, args, store = setup(feeds, ratio, overlap, d, rope, seed, slack, no_slot, dtype)
        what = (feeds, ratio, overlap, d, rope, slack, str(dtype))
        flags = (ratio, overlap, EPS, dtype)
        close(compress_entries_triton(*args, *flags), compress_entries_torch(*args, *flags), what, rtol)
        state_kv, state_score = args[3], args[4]
        want_kv, want_score = state_kv.clone(), state_score.clone()
        store_compressor_state_torch(*store, want_kv, want_score, ratio, overlap)
        store_compressor_state_triton(*store, state_kv, state_score, ratio, overlap)
        # Rows the twin drops land on the padding row (last slot); the kernel does not write them.
        assert torch.equal(state_kv[:-1], want_kv[:-1]) and torch.equal(state_score[:-1], want_score[:-1]), what

    for seed, case in enumerate(CASES):
        check(*case, seed)
    # bf16 entries: the interpreter's fp32 -> bf16 cast is not round-to-nearest, a few ulps apart.
    check(*CASES[0], 50, dtype=torch.bfloat16, rtol=3e-2)
    check(*CASES[2], 51, dtype=torch.bfloat16, rtol=3e-2)

    # Empty: no tokens, no entries; and entries of no one from a non-empty step.
    for ratio, overlap in ((4, True), (8, False)):
        batch, args, store = setup([], ratio, overlap, 24, 8, 60)
        close(compress_entries_triton(*args, ratio, overlap, EPS, torch.float32),
              compress_entries_torch(*args, ratio, overlap, EPS, torch.float32), ("empty", ratio))
        store_compressor_state_triton(*store, args[3], args[4], ratio, overlap)
        batch, args, store = setup([(5, 3)], ratio, overlap, 24, 8, 61)
        none = list(args)
        none[5], none[6], none[11], none[12] = args[5][:0], args[6][:0], args[11][:0], args[12][:0]
        assert compress_entries_triton(*none, ratio, overlap, EPS, torch.float32).shape == (0, 24)

    # Strided (column-sliced) GEMM outputs and cos/sin views go through the launchers.
    batch, args, store = setup(*CASES[0][:1], 4, True, 24, 8, 70)
    wide = torch.randn(args[0].shape[0], 2 * args[0].shape[1])
    wide[:, ::2] = args[0]
    views = list(args)
    views[0] = wide[:, ::2]
    views[11] = args[11].t().contiguous().t()
    close(compress_entries_triton(*views, 4, True, EPS, torch.float32),
          compress_entries_torch(*args, 4, True, EPS, torch.float32), "strided")

    # Forced through the public dispatcher: the custom ops run the Triton side.
    batch, args, store = setup(*CASES[1][:1], 4, True, 72, 16, 80)
    assert kernels.backend_for(args[0]) == "triton"
    got = kernels.compress_entries(*args, ratio=4, overlap=True, eps=EPS, out_dtype=torch.float32)
    assert torch.equal(got, compress_entries_triton(*args, 4, True, EPS, torch.float32))
    want_kv, want_score = args[3].clone(), args[4].clone()
    store_compressor_state_triton(*store, want_kv, want_score, 4, True)
    kernels.store_compressor_state(*store, args[3], args[4], ratio=4, overlap=True)
    assert torch.equal(args[3], want_kv) and torch.equal(args[4], want_score)
    print(f"worst={worst:.3g} (fp32) worst_bf16={worst_bf16:.3g}")
""")



def test_triton_matches_torch_twin_under_interpreter():
    assert_interpreted_script_passes(PARITY_SCRIPT, timeout=600, DSV4_KERNELS="triton")


# ---- the reference: Compressor.forward and _StepOrState as they were before the fusion ---------
def _reference_rows(batch, seq, kv, score, state_kv, state_score, positions):
    start = batch.start_pos[seq][:, None]
    row0 = batch.cu_seqlens[seq][:, None]
    slot = batch.state_slots[seq][:, None]
    in_step = (positions >= start)[..., None]
    rows = (row0 + positions - start).clamp(0, kv.shape[0] - 1)
    ring = positions % state_kv.shape[1]
    return (torch.where(in_step, kv[rows], state_kv[slot, ring]),
            torch.where(in_step, score[rows], state_score[slot, ring]))


def _reference(batch, kv, raw_score, ape, state_kv, state_score, norm_weight, cos, sin, ratio, overlap, out_dtype):
    """Entries of the pre-fusion Compressor.forward (after its GEMMs), storing into the state."""
    m, d = ratio, norm_weight.shape[0]
    plan = batch.plans[m]
    pos = batch.positions
    score = raw_score + ape[pos % m]
    window_pos = plan.window[:, None] * m + torch.arange(m)
    cur_kv, cur_sc = _reference_rows(batch, plan.seq, kv, score, state_kv, state_score, window_pos)
    if overlap:
        prev_kv, prev_sc = _reference_rows(batch, plan.seq, kv, score, state_kv, state_score, window_pos - m)
        first = (plan.window == 0)[:, None, None]
        prev_kv = prev_kv[..., :d].masked_fill(first, 0.0)
        prev_sc = prev_sc[..., :d].masked_fill(first, float("-inf"))
        slots_kv = torch.cat([prev_kv, cur_kv[..., d:]], dim=1)
        slots_sc = torch.cat([prev_sc, cur_sc[..., d:]], dim=1)
    else:
        slots_kv, slots_sc = cur_kv, cur_sc
    pooled = (slots_kv * torch.softmax(slots_sc, dim=1)).sum(dim=1)
    entries = rms_norm(pooled.to(out_dtype), norm_weight, EPS)
    entries = apply_rope(entries, cos, sin)
    span = state_kv.shape[1]
    slack = span - (2 if overlap else 1) * m
    end = batch.end_pos if slack == 0 else (batch.end_pos - slack).clamp(min=0)
    keep_from = (end // m - (1 if overlap else 0)) * m
    slots = torch.where(pos >= keep_from[batch.seq_ids], batch.state_slots[batch.seq_ids], NO_SLOT)
    state_kv[slots, pos % span] = kv
    state_score[slots, pos % span] = score
    return entries


def _run_twins(args, store, ratio, overlap, dtype):
    entries = compress_entries_torch(*args, ratio, overlap, EPS, dtype)
    store_compressor_state_torch(*store, args[3], args[4], ratio, overlap)
    return entries


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_twins_are_bit_exact_to_the_pre_fusion_compressor(case, dtype):
    feeds, ratio, overlap, d, rope, slack, no_slot = CASES[case]
    batch, args, store = setup(feeds, ratio, overlap, d, rope, case, slack, no_slot, dtype)
    kv, score, ape, state_kv, state_score = args[:5]
    ref_kv, ref_score = state_kv.clone(), state_score.clone()
    want = _reference(batch, kv, score, ape, ref_kv, ref_score, args[10], args[11], args[12], ratio, overlap, dtype)
    got = _run_twins(args, store, ratio, overlap, dtype)
    valid = batch.plans[ratio].valid
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    # Complete windows read only their own slots: equal bit for bit. Incomplete ones are filler
    # (the reference biased clamped rows by their own position, the twin by the slot's).
    assert torch.equal(got[valid], want[valid])
    assert torch.isfinite(got.float()).all()
    assert torch.equal(state_kv, ref_kv) and torch.equal(state_score, ref_score)
    # The entry points run the twins on CPU.
    batch, args, store = setup(feeds, ratio, overlap, d, rope, case, slack, no_slot, dtype)
    via_entry = kernels.compress_entries(*args, ratio=ratio, overlap=overlap, eps=EPS, out_dtype=dtype)
    kernels.store_compressor_state(*store, args[3], args[4], ratio=ratio, overlap=overlap)
    assert torch.equal(via_entry, got)
    assert torch.equal(args[3], state_kv) and torch.equal(args[4], state_score)


def test_empty_batch_and_empty_plan():
    for ratio, overlap in ((4, True), (128, False)):
        batch, args, store = setup([], ratio, overlap, 24, 8, 0)
        before = args[3].clone()
        assert _run_twins(args, store, ratio, overlap, torch.float32).shape == (0, 24)
        assert torch.equal(args[3], before)


@pytest.mark.parametrize("ratio,overlap,slack", [(4, True, 0), (4, True, 3), (8, False, 0), (8, False, 2)])
def test_chunked_feeding_pools_the_same_entries_as_one_prefill(ratio, overlap, slack):
    """The ring carries exactly what later steps pool: feeding a sequence in chunks (decode tokens,
    verify-sized chunks) gives every completed entry bit for bit as one prefill does."""
    d, rope, n = 24, 8, 29
    g = torch.Generator().manual_seed(ratio + slack)
    coff = 2 if overlap else 1
    kv_all = torch.randn(n, coff * d, generator=g)
    score_all = torch.randn(n, coff * d, generator=g)
    ape = torch.randn(ratio, coff * d, generator=g)
    weight = torch.randn(d, generator=g)
    angles = torch.rand(n // ratio + 1, rope // 2, generator=g)

    def feed(chunks):
        state = CompressorState(1, ratio, overlap, coff * d, "cpu", slack)
        got, start = {}, 0
        for size in chunks:
            seq = SeqView(0, size, start, 0, 0)
            batch = ForwardBatch.build([[0] * size], [seq], [])
            plan = CompressPlan.of([start], [start + size], batch.start_pos, batch.end_pos, ratio)
            rows = slice(start, start + size)
            cos, sin = angles[plan.window].cos(), angles[plan.window].sin()
            entries = kernels.compress_entries(
                kv_all[rows], score_all[rows], ape, state.kv, state.score, plan.seq, plan.window, batch.start_pos,
                batch.cu_seqlens, batch.state_slots, weight, cos, sin, ratio=ratio, overlap=overlap, eps=EPS,
                out_dtype=torch.float32)
            kernels.store_compressor_state(kv_all[rows], score_all[rows], ape, batch.positions, batch.seq_ids,
                                           batch.state_slots, batch.end_pos, state.kv, state.score, ratio=ratio,
                                           overlap=overlap)
            for w, ok, e in zip(plan.window.tolist(), plan.valid.tolist(), entries):
                if ok:
                    got[w] = e
            start += size
        return got

    whole = feed([n])
    for chunks in ([1] * n, [3, 1, 1, 5, 2, 1, 7, 1, 8], [ratio - 1, 1 + slack, 2, n]):
        chunks = list(chunks)
        total, kept = 0, []
        for c in chunks:  # trim to n tokens
            kept.append(min(c, n - total))
            total += kept[-1]
            if total == n:
                break
        pieces = feed(kept)
        assert pieces.keys() == whole.keys() and len(whole) == n // ratio
        assert all(torch.equal(pieces[w], whole[w]) for w in whole)


@pytest.mark.parametrize("ratio,overlap", [(4, True), (128, False)])
def test_engine_compressor_runs_the_entry_points(ratio, overlap):
    """Compressor.forward (its GEMMs, cos/sin at window * ratio, then the entry points) equals the
    pre-fusion math on the same GEMM outputs."""
    d, in_dim, slack = 24, 16, 2
    feeds = [(0, 5), (ratio - 1, 1), (2 * ratio - 3, 4)]
    comp = Compressor(in_dim, d, ratio, overlap, EPS)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    rotary = Rotary(8, 10000.0, None)
    seqs, row = [], 0
    for i, (start, n) in enumerate(feeds):
        seqs.append(SeqView(row, n, start, i, i))
        row += n
    batch = ForwardBatch.build([[0] * n for _, n in feeds], seqs, [])
    x = torch.randn(row, in_dim, generator=g)
    state = CompressorState(len(feeds), ratio, overlap, comp.ape.shape[1], "cpu", slack)
    state.kv.normal_(generator=g), state.score.normal_(generator=g)
    ref_kv, ref_score = state.kv.clone(), state.score.clone()
    plan = batch.plans[ratio]
    cos, sin = rotary.cos_sin(plan.window * ratio, torch.bfloat16)
    want = _reference(batch, comp.wkv(x), comp.wgate(x), comp.ape, ref_kv, ref_score, comp.norm.weight, cos, sin,
                      ratio, overlap, torch.bfloat16)
    got, got_plan = comp(x, batch, state, (cos, sin), torch.bfloat16)
    assert got_plan is plan
    assert torch.equal(got[plan.valid], want[plan.valid])
    assert torch.equal(state.kv, ref_kv) and torch.equal(state.score, ref_score)


def test_ops_pass_opcheck():
    for case in (0, 2, 4):
        feeds, ratio, overlap, d, rope, slack, no_slot = CASES[case]
        batch, args, store = setup(feeds, ratio, overlap, d, rope, case, slack, no_slot)
        torch.library.opcheck(torch.ops.dsv4.compress_entries.default,
                              (*args, ratio, overlap, EPS, torch.bfloat16))
        torch.library.opcheck(torch.ops.dsv4.store_compressor_state.default,
                              (*store, args[3].clone(), args[4].clone(), ratio, overlap))


def _step(args, store, state_kv, state_score):
    """A compressor's use of the entry points: pool (reading the ring), then store into it."""
    entries = kernels.compress_entries(*args[:3], state_kv, state_score, *args[5:], ratio=4, overlap=True, eps=EPS,
                                       out_dtype=torch.float32)
    kernels.store_compressor_state(*store, state_kv, state_score, ratio=4, overlap=True)
    return entries * 2


def test_fullgraph_compile_of_the_ops_equals_eager():
    feeds, ratio, overlap, d, rope, slack, no_slot = CASES[1]
    batch, args, store = setup(feeds, ratio, overlap, d, rope, 9, slack, no_slot)

    def via_ops(args, store, state_kv, state_score):
        entries = torch.ops.dsv4.compress_entries(*args[:3], state_kv, state_score, *args[5:], 4, True, EPS,
                                                  torch.float32)
        torch.ops.dsv4.store_compressor_state(*store, state_kv, state_score, 4, True)
        return entries * 2

    eager_kv, eager_score = args[3].clone(), args[4].clone()
    eager = _step(args, store, eager_kv, eager_score)
    for fn in (_step, via_ops):
        torch._dynamo.reset()
        kv_, score_ = args[3].clone(), args[4].clone()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(args, store, kv_, score_)
        assert torch.equal(compiled, eager)
        assert torch.equal(kv_, eager_kv) and torch.equal(score_, eager_score)


def _named_args(case=0):
    feeds, ratio, overlap, d, rope, slack, no_slot = CASES[case]
    batch, args, store = setup(feeds, ratio, overlap, d, rope, 0, slack, no_slot)
    names = ("kv", "score", "ape", "state_kv", "state_score", "seq", "window", "start_pos", "cu_seqlens",
             "state_slots", "norm_weight", "cos", "sin")
    return dict(zip(names, args)), store


@pytest.mark.parametrize("param, make", [
    ("kv", lambda T, E: torch.zeros(T, 48, dtype=torch.bfloat16)),
    ("kv", lambda T, E: torch.zeros(T, 24)),
    ("score", lambda T, E: torch.zeros(T + 1, 48)),
    ("ape", lambda T, E: torch.zeros(3, 48)),
    ("state_kv", lambda T, E: torch.zeros(8, 7, 48)),
    ("state_score", lambda T, E: torch.zeros(8, 9, 48)),
    ("seq", lambda T, E: torch.zeros(E, dtype=torch.int32)),
    ("window", lambda T, E: torch.zeros(E + 1, dtype=torch.long)),
    ("cu_seqlens", lambda T, E: torch.zeros(3, dtype=torch.long)),
    ("state_slots", lambda T, E: torch.zeros(2, dtype=torch.long)),
    ("norm_weight", lambda T, E: torch.zeros(23)),
    ("cos", lambda T, E: torch.zeros(E + 1, 4)),
    ("sin", lambda T, E: torch.zeros(E, 3)),
])
def test_compress_entries_bad_arguments_raise_value_error_naming_the_parameter(param, make):
    kw, _ = _named_args()  # CASES[0]: 7 sequences, d 24 with overlap (48 channels), ratio 4
    kw[param] = make(kw["kv"].shape[0], kw["seq"].shape[0])
    with pytest.raises(ValueError, match=rf"^{'cos' if param == 'sin' else param}\b"):
        kernels.compress_entries(**kw, ratio=4, overlap=True, eps=EPS, out_dtype=torch.float32)


def test_store_bad_arguments_raise_value_error_naming_the_parameter():
    kw, store = _named_args()
    kv, score, ape, positions, seq_ids, state_slots, end_pos = store
    for bad, param in (((kv, score, ape, positions[:-1], seq_ids, state_slots, end_pos), "positions"),
                       ((kv, score, ape, positions, seq_ids.int(), state_slots, end_pos), "seq_ids"),
                       ((kv, score, ape, positions, seq_ids, state_slots, end_pos[:-1]), "end_pos"),
                       ((kv, score[:, :-1], ape, positions, seq_ids, state_slots, end_pos), "score")):
        with pytest.raises(ValueError, match=rf"^{param}\b"):
            kernels.store_compressor_state(*bad, kw["state_kv"], kw["state_score"], ratio=4, overlap=True)
    with pytest.raises(ValueError, match=r"^state_kv\b"):
        kernels.store_compressor_state(*store, kw["state_kv"][:, :7], kw["state_score"], ratio=4, overlap=True)
