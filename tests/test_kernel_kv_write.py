"""The Q/KV path kernels (kernels/kv_write.py): fused RMSNorm + partial RoPE (+ the cache's FP8 /
FP4 rounding) and the paged record writes.

- Under the Triton interpreter (a subprocess, TRITON_INTERPRET=1), the kernels against their torch
  twins: records byte for byte, rounded vectors exactly, plain vectors within the RMSNorm's
  summation-order ulps; the kernels skip NO_SLOT rows (the padding row stays untouched).
- In process, the twins against the engine's code bit for bit: ``rms_norm`` / ``RMSNorm`` /
  ``apply_rope`` / ``Rotary`` as ``Attention.forward`` and ``Indexer.queries`` chain them, the
  codecs' ``round_trip`` and ``encode``, and ``KVCache.store_window`` / ``store_entries``.
- The custom ops pass opcheck, the entry points trace with ``torch.compile(fullgraph=True)``, and
  bad arguments raise ValueError naming the parameter.
"""
import textwrap

import pytest
import torch

import kernels
from engine.model.layers import RMSNorm, Rotary, apply_rope, rms_norm
from engine.tiny.make_tiny import tiny_config
from engine.worker.input_batch import NO_SLOT
from engine.worker.kv_cache import CacheShape, Fp4IndexKeyCodec, Fp8EntryCodec, KVCache
from kernels.kv_records import FP4_KEY, FP8_ENTRY, PLAIN
from kernels.kv_write import encode_records, fp4_key_bytes, fp8_entry_bytes, norm_rope_torch, round_records
from tests_util import assert_interpreted_script_passes

EPS = 1e-6

# Shared by the in-process tests and the interpreted script.
SETUP = textwrap.dedent("""
    import torch
    from kernels.kv_records import FP4_KEY, FP8_ENTRY, PLAIN
    from kernels.quant import hadamard_rotate

    def qkv_args(T, H, D, R, seed, dtype=torch.float32, weighted=True):
        # x [T, D] when H == 0, else [T, H, D]; cos/sin [T, R/2] in x's dtype (None for R == 0).
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(T, *((H,) if H else ()), D, generator=g) * 3).to(dtype)
        weight = torch.randn(D, generator=g) * 0.5 + 1 if weighted else None
        cos = sin = None
        if R:
            angle = torch.rand(T, R // 2, generator=g) * 20
            cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        return x, weight, cos, sin

    def record_values(T, D, seed, dtype=torch.float32, fmt=FP8_ENTRY):
        # Rows at many magnitudes plus edge rows: all zero (the FP8 amax floor / the FP4 zero scale),
        # an amax exactly at a scale boundary, e4m3 subnormals, -0.0, and (FP4, D a power of 4, so
        # the rotation is exact) keys whose rotation holds the e2m1 ties and 6 * 2^k.
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(T, D, generator=g) * torch.logspace(-3, 2, max(T, 1))[:T, None]
        if T > 3:
            v[0] = 0.0
            v[1, :min(D, 64)].clamp_(-56.0, 56.0)
            v[1, 0] = 448.0 / 8
            v[2] *= 1e-6
            v[3, ::3] = -0.0
        if fmt == FP4_KEY and T > 5 and D in (16, 64):
            ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -2.5, -5.0, 0.5, 3.0, -1.0,
                                 4.0]) * 2.0 ** -3
            target = ties.repeat(D // 16).view(1, D)
            v[4:6] = hadamard_rotate(target)  # rotated again: back to target exactly
        return v.to(dtype)

    def unique_rows(T, S, R, seed):
        # Distinct (slot, row) destinations in a pool of S real slots of R rows; every third NO_SLOT.
        g = torch.Generator().manual_seed(seed)
        flat = torch.randperm(S * R, generator=g)[:T]
        slots, rows = flat // R, flat % R
        slots[::3] = -1
        return slots, rows

    def entry_args(T, blocks, E, seed):
        # Three sequences with disjoint blocks (some table columns NO_SLOT), T rows at distinct
        # (sequence, entry) pairs crossing block boundaries, about a quarter invalid.
        g = torch.Generator().manual_seed(seed)
        nb = 3
        assert T <= 3 * nb * E, "not enough distinct entries"
        ids = torch.randperm(blocks, generator=g)[:3 * nb].view(3, nb)
        ids[2, 2] = -1
        pairs = torch.randperm(3 * nb * E, generator=g)[:T]
        seq, entries = pairs // (nb * E), pairs % (nb * E)
        valid = torch.rand(T, generator=g) > 0.25
        return ids[seq], entries, valid

    def make_pool(fmt, S, R, D, rope, seed, dtype=torch.float32):
        # Random contents (so untouched bytes show), one extra slot at the end: the padding row.
        g = torch.Generator().manual_seed(seed)
        if fmt == PLAIN:
            return torch.randn(S + 1, R, D, generator=g).to(dtype)
        nbytes = fp8_bytes(D, rope) if fmt == FP8_ENTRY else D // 2 + -(-D // 32)
        return torch.randint(0, 256, (S + 1, R, nbytes), generator=g, dtype=torch.uint8)

    def fp8_bytes(D, rope):
        nope = D - rope
        return -(-(nope + 2 * rope + -(-nope // 64)) // 8) * 8
""")
_ns = {}
exec(SETUP, _ns)
qkv_args, record_values, unique_rows, entry_args, make_pool = (
    _ns["qkv_args"], _ns["record_values"], _ns["unique_rows"], _ns["entry_args"], _ns["make_pool"])

# (D, R, weighted, norm, fmt): the kv path (64 nope + 16 rope, FP8), odd sizes (72/8; 100 with a
# partial second scale block; 100 unweighted, no RoPE), q_norm (weighted, no RoPE), the per-head
# query norm (unweighted + RoPE) and the indexer query (RoPE, no norm, FP4) at 64 and 16 dims.
NORM_ROPE_CASES = [
    (80, 16, True, True, FP8_ENTRY), (80, 16, True, True, PLAIN), (72, 8, True, True, FP8_ENTRY),
    (100, 10, False, True, FP8_ENTRY), (100, 0, False, True, PLAIN), (96, 0, True, True, PLAIN),
    (80, 16, False, True, PLAIN), (64, 16, False, False, FP4_KEY), (16, 8, False, False, FP4_KEY),
    (64, 16, True, True, FP4_KEY),
]
# (fmt, D, rope, pool dtype for PLAIN)
STORE_CASES = [(FP8_ENTRY, 80, 16, None), (FP8_ENTRY, 100, 10, None), (FP8_ENTRY, 72, 8, None),
               (FP8_ENTRY, 64, 0, None), (FP4_KEY, 64, 0, None), (FP4_KEY, 16, 0, None),
               (PLAIN, 100, 0, torch.bfloat16), (PLAIN, 72, 0, torch.float32)]

PARITY_SCRIPT = SETUP + f"NORM_ROPE_CASES = {NORM_ROPE_CASES!r}\n" + f"STORE_CASES = {STORE_CASES!r}\n" + \
    textwrap.dedent("""
    import kernels
    from kernels.sink_attention import INTERPRETED
    from kernels.kv_write import (encode_records, norm_rope_torch, norm_rope_triton, round_records,
                                  store_entries_torch, store_entries_triton, store_records_torch,
                                  store_records_triton)

    assert INTERPRETED, "TRITON_INTERPRET=1 did not reach triton"
    EPS = 1e-6
    worst = 0.0

    def rel_err(got, want):
        if want.numel() == 0:
            return 0.0
        return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()

    seed = 0
    for D, R, weighted, norm, fmt in NORM_ROPE_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            for T, H in ((0, 3), (1, 0), (5, 3), (37, 1)):
                seed += 1
                x, w, cos, sin = qkv_args(T, H, D, R, seed, dtype, weighted)
                what = (D, R, weighted, norm, fmt, dtype, T, H)
                got = norm_rope_triton(x, w, cos, sin, EPS, fmt, norm)
                want = norm_rope_torch(x, w, cos, sin, EPS, fmt, norm)
                assert got.shape == want.shape and got.dtype == want.dtype, what
                plain = norm_rope_triton(x, w, cos, sin, EPS, PLAIN, norm)
                # The rounding is the codecs' exactly: the kernel's result is the round trip of its
                # own unrounded result.
                assert torch.equal(got, round_records(plain, fmt, R)), what
                err = rel_err(plain, norm_rope_torch(x, w, cos, sin, EPS, PLAIN, norm))
                # Only the RMSNorm's sum of squares is summed in another order: a few fp32 ulps,
                # at most one bf16 ulp after its rounding; without the norm, every bit agrees.
                assert err <= (1e-6 if dtype == torch.float32 else 8e-3), (what, err)
                if not norm:
                    assert torch.equal(got, want), what
                if dtype == torch.float32:
                    worst = max(worst, err)
                # Rounded results may step to a neighbouring code where the unrounded ones differ by
                # an ulp across a rounding boundary: rare.
                if fmt != PLAIN and want.numel():
                    assert (got != want).float().mean().item() <= 0.02, what

    # float16 activations (their casts go through Triton's own fp16 conversion).
    for D, R, weighted, norm, fmt in ((80, 16, True, True, FP8_ENTRY), (64, 16, False, False, FP4_KEY),
                                      (100, 0, True, True, PLAIN)):
        x, w, cos, sin = qkv_args(5, 3, D, R, 55, torch.float16, weighted)
        got = norm_rope_triton(x, w, cos, sin, EPS, fmt, norm)
        assert got.dtype == torch.float16
        assert rel_err(got, norm_rope_torch(x, w, cos, sin, EPS, fmt, norm)) <= 1e-3, (D, fmt)
        assert torch.equal(got, round_records(norm_rope_triton(x, w, cos, sin, EPS, PLAIN, norm), fmt, R))
    values = record_values(9, 80, 56, torch.float16)
    for fmt, pool in ((FP8_ENTRY, make_pool(FP8_ENTRY, 8, 6, 80, 16, 56)),
                      (PLAIN, make_pool(PLAIN, 8, 6, 80, 0, 56, torch.float16))):
        slots, rows = unique_rows(9, 8, 6, 56)
        got, want = pool.clone(), pool.clone()
        store_records_triton(got, slots, rows, values, fmt, 16)
        store_records_torch(want, slots, rows, values, fmt, 16)
        assert torch.equal(got[:-1], want[:-1]), ("fp16", fmt)

    # Strided x and cos/sin, 3-D heads.
    x, w, cos, sin = qkv_args(5, 3, 80, 16, 77)
    xs = x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    cs, ss = cos.t().contiguous().t(), sin.t().contiguous().t()
    assert torch.equal(norm_rope_triton(xs, w, cs, ss, EPS, FP8_ENTRY, True),
                       norm_rope_triton(x, w, cos, sin, EPS, FP8_ENTRY, True))

    seed = 100
    for fmt, D, rope, pool_dtype in STORE_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            for T in (0, 1, 5, 37):
                seed += 1
                what = (fmt, D, rope, pool_dtype, dtype, T)
                values = record_values(T, D, seed, dtype, fmt)
                if T == 5:  # strided values
                    values = values.t().contiguous().t()
                # Window-ring form.
                pool = make_pool(fmt, 8, 6, D, rope, seed, pool_dtype)
                slots, rows = unique_rows(T, 8, 6, seed)
                got, want = pool.clone(), pool.clone()
                store_records_triton(got, slots, rows, values, fmt, rope)
                store_records_torch(want, slots, rows, values, fmt, rope)
                assert torch.equal(got[:-1], want[:-1]), what
                assert torch.equal(got[-1], pool[-1]), what  # NO_SLOT rows skipped
                live = slots >= 0
                assert torch.equal(got[slots[live], rows[live]],
                                   encode_records(values[live], fmt, rope, pool.dtype)), what
                # Block-table form.
                pool = make_pool(fmt, 10, 8, D, rope, seed, pool_dtype)
                tables, entries, valid = entry_args(T, 10, 8, seed)
                got, want = pool.clone(), pool.clone()
                store_entries_triton(got, tables, entries, valid, values, fmt, rope)
                store_entries_torch(want, tables, entries, valid, values, fmt, rope)
                assert torch.equal(got[:-1], want[:-1]), what
                assert torch.equal(got[-1], pool[-1]), what

    # Forced through the public dispatcher: the custom ops run the Triton side.
    x, w, cos, sin = qkv_args(5, 3, 80, 16, 9)
    assert kernels.backend_for(x) == "triton"
    assert torch.equal(kernels.norm_rope(x, w, cos, sin, eps=EPS, fmt=FP8_ENTRY),
                       norm_rope_triton(x, w, cos, sin, EPS, FP8_ENTRY, True))
    values = record_values(7, 80, 3)
    pool = make_pool(FP8_ENTRY, 8, 6, 80, 16, 3)
    slots, rows = unique_rows(7, 8, 6, 3)
    got, want = pool.clone(), pool.clone()
    kernels.store_records(got, slots, rows, values, FP8_ENTRY, rope_dim=16)
    store_records_triton(want, slots, rows, values, FP8_ENTRY, 16)
    assert torch.equal(got, want)
    tables, entries, valid = entry_args(7, 10, 4, 3)
    pool = make_pool(FP4_KEY, 10, 4, 64, 0, 3)
    got, want = pool.clone(), pool.clone()
    kernels.store_entries(got, tables, entries, valid, record_values(7, 64, 3), FP4_KEY)
    store_entries_triton(want, tables, entries, valid, record_values(7, 64, 3), FP4_KEY, 0)
    assert torch.equal(got, want)
    print(f"worst={worst:.3g}")
""")



def test_triton_matches_torch_twin_under_interpreter():
    assert_interpreted_script_passes(PARITY_SCRIPT, timeout=600, DSV4_KERNELS="triton")


# ---- twins == the engine's code ------------------------------------------------------------

def _rotary_cos_sin(T, R, dtype, seed):
    rotary = Rotary(R, 10000.0, None)
    positions = torch.randint(0, 70000, (T,), generator=torch.Generator().manual_seed(seed))
    return rotary.cos_sin(positions, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [0, 1, 5, 37])
def test_norm_rope_twin_is_the_engines_q_kv_path_bit_for_bit(dtype, T):
    g = torch.Generator().manual_seed(T)
    # kv = cache.round_kv(apply_rope(self.kv_norm(self.wkv(x)), cos, sin)), odd sizes included.
    for D, R in ((80, 16), (72, 8), (100, 10)):
        kv_norm = RMSNorm(D, EPS)
        with torch.no_grad():
            kv_norm.weight.copy_(torch.randn(D, generator=g))
        cos, sin = _rotary_cos_sin(T, R, dtype, seed=D)
        x = (torch.randn(T, D, generator=g) * 3).to(dtype)
        rope_kv = apply_rope(kv_norm(x), cos, sin)
        assert torch.equal(norm_rope_torch(x, kv_norm.weight, cos, sin, EPS, PLAIN, True), rope_kv)
        want = Fp8EntryCodec(D, R).round_trip(rope_kv)
        for got in (norm_rope_torch(x, kv_norm.weight, cos, sin, EPS, FP8_ENTRY, True),
                    kernels.norm_rope(x, kv_norm.weight, cos, sin, eps=EPS, fmt=FP8_ENTRY)):
            assert got.dtype == dtype and torch.equal(got, want)
    # q_lat = self.q_norm(self.wq_a(x)): weighted, no RoPE.
    q_norm = RMSNorm(96, EPS)
    with torch.no_grad():
        q_norm.weight.copy_(torch.randn(96, generator=g))
    x = torch.randn(T, 96, generator=g).to(dtype)
    assert torch.equal(kernels.norm_rope(x, q_norm.weight, None, None, eps=EPS, fmt=PLAIN), q_norm(x))
    # q = apply_rope(rms_norm(q.view(T, H, d), None, eps), cos, sin): per head, unweighted.
    cos, sin = _rotary_cos_sin(T, 16, dtype, seed=1)
    q = torch.randn(T, 3, 80, generator=g).to(dtype)
    assert torch.equal(kernels.norm_rope(q, None, cos, sin, eps=EPS, fmt=PLAIN),
                       apply_rope(rms_norm(q, None, EPS), cos, sin))
    # Indexer: cache.round_index_query(apply_rope(wq_b(q_lat).view(T, Hi, di), cos, sin)).
    for di in (64, 128):
        iq = torch.randn(T, 3, di, generator=g).to(dtype)
        want = Fp4IndexKeyCodec(di).round_trip(apply_rope(iq, cos, sin))
        got = kernels.norm_rope(iq, None, cos, sin, eps=EPS, fmt=FP4_KEY, norm=False)
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoders_are_the_engine_codecs_byte_for_byte(dtype):
    for D, R in ((80, 16), (72, 8), (100, 10), (64, 0), (512, 64)):
        codec = Fp8EntryCodec(D, R)
        assert fp8_entry_bytes(D, R) == codec.nbytes
        v = record_values(9, D, seed=D, dtype=dtype)
        assert torch.equal(encode_records(v, FP8_ENTRY, R, torch.uint8), codec.encode(v))
        assert torch.equal(round_records(v, FP8_ENTRY, R), codec.round_trip(v))
    for D in (16, 64, 128):
        codec = Fp4IndexKeyCodec(D)
        assert fp4_key_bytes(D) == codec.nbytes
        v = record_values(9, D, seed=D, dtype=dtype, fmt=FP4_KEY)
        assert torch.equal(encode_records(v, FP4_KEY, 0, torch.uint8), codec.encode(v))
        assert torch.equal(round_records(v, FP4_KEY, 0), codec.round_trip(v))


def _cache(kv_cache_dtype, dtype):
    cfg = tiny_config(vocab_size=64, head_dim=80, rope_dim=16, index_head_dim=64)
    shape = CacheShape(num_window_slots=3, num_state_slots=2, num_c4_blocks=10, num_c128_blocks=2,
                       c4_block_tokens=32, c128_block_tokens=256, ring_slack=2)
    return KVCache(cfg, shape, dtype, "cpu", kv_cache_dtype=kv_cache_dtype)


@pytest.mark.parametrize("kv_cache_dtype,dtype", [("fp8", torch.bfloat16), ("fp8", torch.float32),
                                                  ("auto", torch.bfloat16)])
@pytest.mark.parametrize("T", [0, 1, 5, 37])
def test_store_twins_are_the_engines_cache_writes(kv_cache_dtype, dtype, T):
    """``KVCache.store_window`` / ``store_entries`` (which write through the entry points) against
    the indexed writes of the engine's codecs they replaced, on copies of the same pools: every byte
    equal, NO_SLOT rows' padding-row writes included (the twin mirrors them)."""
    fmt_kv, fmt_idx = (FP8_ENTRY, FP4_KEY) if kv_cache_dtype == "fp8" else (PLAIN, PLAIN)
    cache = _cache(kv_cache_dtype, dtype)
    g = torch.Generator().manual_seed(T)
    for ring in cache.window:  # random contents: untouched rows show
        ring.copy_(torch.randint(0, 256, ring.shape, generator=g).to(ring.dtype) if ring.dtype == torch.uint8
                   else torch.randn(ring.shape, generator=g).to(ring.dtype))
    W = cache.window_rows
    kv = record_values(T, 80, seed=T + 1, dtype=dtype)
    positions = torch.randperm(3 * W, generator=g)[:T]  # distinct (slot, row) pairs below
    slots, positions = positions // W, positions % W + W * torch.randint(0, 50, (T,), generator=g)
    slots[1::4] = NO_SLOT
    ring = cache.window[1].clone()
    cache.store_window(1, slots, positions % W, kv)
    ring[slots, positions % W] = encode(cache, ring, kv)
    assert torch.equal(ring, cache.window[1])

    tables, entries, valid = entry_args(T, 10, cache.shape.c4_entries, seed=T)
    for pool, fmt, D in ((cache.c4_kv[1], fmt_kv, 80), (cache.c4_idx[1], fmt_idx, 64)):
        values = record_values(T, D, seed=T + 2, dtype=dtype, fmt=fmt)
        copy = pool.clone()
        cache.store_entries(pool, tables, entries, valid, values)
        E = pool.shape[1]
        col = (entries // E).clamp(max=tables.shape[1] - 1)[:, None]
        blocks = torch.where(valid, tables.gather(1, col).squeeze(1), -1)
        copy[blocks, entries % E] = encode(cache, pool, values)
        assert torch.equal(copy, pool)


def encode(cache, pool, values):
    """What the engine's codecs store for ``values`` in ``pool`` (the model dtype under auto)."""
    codec = cache._codec_for(pool)
    return codec.encode(values) if codec is not None else values.to(pool.dtype)


# ---- custom ops, compile, argument checks ----------------------------------------------------

def test_ops_pass_opcheck():
    x, w, cos, sin = qkv_args(5, 3, 80, 16, seed=1)
    torch.library.opcheck(torch.ops.dsv4.norm_rope.default, (x, w, cos, sin, EPS, FP8_ENTRY, True))
    x, _, cos, sin = qkv_args(4, 0, 64, 16, seed=2)
    torch.library.opcheck(torch.ops.dsv4.norm_rope.default, (x, None, cos, sin, EPS, FP4_KEY, False))
    torch.library.opcheck(torch.ops.dsv4.norm_rope.default, (x[:0], None, None, None, EPS, PLAIN, True))
    values = record_values(7, 80, seed=3)
    slots, rows = unique_rows(7, 8, 6, seed=3)
    torch.library.opcheck(torch.ops.dsv4.store_records.default,
                          (make_pool(FP8_ENTRY, 8, 6, 80, 16, seed=3), slots, rows, values, FP8_ENTRY, 16))
    tables, entries, valid = entry_args(7, 10, 4, seed=4)
    torch.library.opcheck(torch.ops.dsv4.store_entries.default,
                          (make_pool(PLAIN, 10, 4, 80, 0, seed=4), tables, entries, valid, values, PLAIN, 0))


def _q_kv_step(x, w, cos, sin, ring, slots, rows, pool, tables, entries, valid):
    """The attention's use: the kv vector rounded as stored, written to the ring and the pool."""
    kv = kernels.norm_rope(x, w, cos, sin, eps=EPS, fmt=FP8_ENTRY)
    kernels.store_records(ring, slots, rows, kv, FP8_ENTRY, rope_dim=16)
    kernels.store_entries(pool, tables, entries, valid, kv * 2, FP8_ENTRY, rope_dim=16)
    return kv + 1


def _q_kv_step_via_ops(x, w, cos, sin, ring, slots, rows, pool, tables, entries, valid):
    kv = torch.ops.dsv4.norm_rope(x, w, cos, sin, EPS, FP8_ENTRY, True)
    torch.ops.dsv4.store_records(ring, slots, rows, kv, FP8_ENTRY, 16)
    torch.ops.dsv4.store_entries(pool, tables, entries, valid, kv * 2, FP8_ENTRY, 16)
    return kv + 1


def test_fullgraph_compile_of_the_entry_points_equals_eager():
    x, w, cos, sin = qkv_args(7, 0, 80, 16, seed=5)
    slots, rows = unique_rows(7, 8, 6, seed=5)
    tables, entries, valid = entry_args(7, 10, 4, seed=5)
    ring, pool = make_pool(FP8_ENTRY, 8, 6, 80, 16, seed=5), make_pool(FP8_ENTRY, 10, 4, 80, 16, seed=6)
    eager_ring, eager_pool = ring.clone(), pool.clone()
    eager = _q_kv_step(x, w, cos, sin, eager_ring, slots, rows, eager_pool, tables, entries, valid)
    for fn in (_q_kv_step, _q_kv_step_via_ops):
        got_ring, got_pool = ring.clone(), pool.clone()
        torch._dynamo.reset()
        step = torch.compile(fn, fullgraph=True, backend="aot_eager")
        compiled = step(x, w, cos, sin, got_ring, slots, rows, got_pool, tables, entries, valid)
        assert torch.equal(compiled, eager) and torch.equal(got_ring, eager_ring) and torch.equal(got_pool, eager_pool)


@pytest.mark.parametrize("bad, param", [
    (dict(x=torch.zeros(5, 80, dtype=torch.float64)), "x"),
    (dict(x=torch.zeros(5)), "x"),
    (dict(weight=torch.zeros(79)), "weight"),
    (dict(norm=False), "weight"),
    (dict(cos=torch.zeros(4, 8)), "cos"),
    (dict(cos=torch.zeros(5, 41)), "cos"),
    (dict(sin=torch.zeros(5, 4)), "sin"),
    (dict(sin=None), "cos"),
    (dict(fmt=3), "fmt"),
    (dict(fmt=FP4_KEY), "x"),  # 80 is not a power of two
])
def test_norm_rope_bad_arguments_raise_value_error_naming_the_parameter(bad, param):
    x, w, cos, sin = qkv_args(5, 0, 80, 16, seed=0)
    kw = dict(x=x, weight=w, cos=cos, sin=sin, fmt=FP8_ENTRY, norm=True)
    kw.update(bad)
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        kernels.norm_rope(kw.pop("x"), kw.pop("weight"), kw.pop("cos"), kw.pop("sin"), eps=EPS, **kw)


@pytest.mark.parametrize("bad, param", [
    (dict(pool=torch.zeros(9, 6, 103, dtype=torch.uint8)), "pool"),
    (dict(pool=torch.zeros(9, 6, 80)), "pool"),
    (dict(rope_dim=8), "pool"),  # the record width belongs to another rope split
    (dict(rope_dim=80), "values"),
    (dict(slots=torch.zeros(6, dtype=torch.long)), "slots"),
    (dict(rows=torch.zeros(7)), "rows"),
    (dict(values=torch.zeros(7, 80, dtype=torch.int32)), "values"),
    (dict(fmt=-1), "fmt"),
])
def test_store_records_bad_arguments_raise_value_error_naming_the_parameter(bad, param):
    slots, rows = unique_rows(7, 8, 6, seed=0)
    kw = dict(pool=make_pool(FP8_ENTRY, 8, 6, 80, 16, seed=0), slots=slots, rows=rows,
              values=record_values(7, 80, seed=0), fmt=FP8_ENTRY, rope_dim=16)
    kw.update(bad)
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        kernels.store_records(**kw)


@pytest.mark.parametrize("bad, param", [
    (dict(tables=torch.zeros(7, 0, dtype=torch.long)), "tables"),
    (dict(tables=torch.zeros(6, 3, dtype=torch.long)), "tables"),
    (dict(entries=torch.zeros(7, 1, dtype=torch.long)), "entries"),
    (dict(valid=torch.ones(7, dtype=torch.long)), "valid"),
    (dict(pool=torch.zeros(11, 4, 64, dtype=torch.uint8), fmt=FP4_KEY, values=torch.zeros(7, 64)), "pool"),
    (dict(values=torch.zeros(7, 60), fmt=FP4_KEY, pool=torch.zeros(11, 4, 32, dtype=torch.uint8)), "values"),
])
def test_store_entries_bad_arguments_raise_value_error_naming_the_parameter(bad, param):
    tables, entries, valid = entry_args(7, 10, 4, seed=0)
    kw = dict(pool=make_pool(PLAIN, 10, 4, 80, 0, seed=0), tables=tables, entries=entries, valid=valid,
              values=record_values(7, 80, seed=0), fmt=PLAIN)
    kw.update(bad)
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        kernels.store_entries(**kw)
