"""Sparse sink attention over the paged pools: the Triton kernel (interpreted on CPU) against its
torch twin, the twin against the model's gathered-key path, and argument checks.

Triton runs happen in a fresh subprocess with TRITON_INTERPRET=1 (see test_kernel_sink_attention).
"""
import textwrap

import pytest
import torch

import kernels
from tests_util import assert_interpreted_script_passes
from kernels.kv_records import PLAIN


# A varlen batch of four sequences: a chunk after a cached prefix whose window reaches back into
# the ring (and wraps it), a prompt from position 0, a single decode token deep in its context and
# a chunk whose first tokens see no compressed entry yet. Head dim 24 (16 nope: a partial FP8
# scale block; 8 rope), H=3 and 17 (not multiples of the 16-head block), W=5 and 40 (not
# multiples of the 32-key block), 4 entries per page with scrambled, -1-padded block tables.
SETUP = textwrap.dedent("""
    import torch
    from engine.worker.kv_cache import Fp8EntryCodec
    from kernels.kv_records import FP8_ENTRY, PLAIN

    def setup(fmt, H, W, seed, D=24, rope=8):
        g = torch.Generator().manual_seed(seed)
        codec = Fp8EntryCodec(D, rope)
        enc = (lambda x: codec.encode(x)) if fmt == FP8_ENTRY else (lambda x: x)
        lens, start = [3, 6, 1, 4], [9, 0, 57, 2]
        seq = torch.cat([torch.full((n,), b) for b, n in enumerate(lens)])
        pos = torch.cat([torch.arange(s, s + n) for s, n in zip(start, lens)])
        T = int(seq.shape[0])
        q = torch.randn(T, H, D, generator=g)
        kv = torch.randn(T, D, generator=g)
        if fmt == FP8_ENTRY:
            kv = codec.round_trip(kv)
        window = enc(torch.randn(5, W, D, generator=g) * 2)
        window_slots = torch.tensor([3, 0, 1, 4])
        comp = enc(torch.randn(12, 4, D, generator=g) * 2)
        tables = torch.full((4, 5), -1, dtype=torch.long)
        tables[0, :3] = torch.tensor([7, 2, 10])
        tables[2, :5] = torch.tensor([1, 9, 4, 0, 8])
        tables[3, :1] = torch.tensor([5])
        ids = torch.randint(0, 16, (T, 6), generator=g)
        valid = (torch.rand(T, 6, generator=g) > 0.3) & (ids < ((pos + 1) // 4)[:, None])
        rd = rope // 2
        ang = pos[:, None].float() * torch.rand(rd, generator=g)
        base = (q, kv, seq, pos, torch.tensor(start), window_slots, window, torch.randn(H, generator=g) * 2,
                D ** -0.5, ang.cos(), ang.sin(), fmt)
        return base, dict(none={}, hca=dict(comp_pool=comp, tables=tables, ratio=4, num_entries=20),
                          csa=dict(comp_pool=comp, tables=tables, comp_ids=ids, comp_valid=valid))
""")

PARITY_SCRIPT = SETUP + textwrap.dedent("""
    import kernels
    from kernels.sink_attention import INTERPRETED
    from kernels.sparse_attention import sparse_attention_torch, sparse_attention_triton

    assert INTERPRETED, "TRITON_INTERPRET=1 did not reach triton"
    worst = 0.0
    for fmt, H, W in [(PLAIN, 3, 5), (FP8_ENTRY, 3, 5), (FP8_ENTRY, 17, 40), (PLAIN, 2, 40)]:
        base, comps = setup(fmt, H, W, seed=H * W)
        # window=None: the ring's rows; W - 2: a ring with speculative slack (reads W - 2 of W rows).
        for (name, kw), window in [(c, w) for c in comps.items() for w in (None, W - 2)]:
            want = sparse_attention_torch(*base, **kw, window=window)
            got = sparse_attention_triton(*base, **kw, window=window)
            assert got.shape == want.shape and got.dtype == want.dtype
            diff = (got - want).abs().max().item()
            assert diff <= 2e-5, (fmt, H, W, name, window, diff)
            worst = max(worst, diff)
    # Empty and single-token batches through the public op (forced to Triton).
    base, comps = setup(FP8_ENTRY, 3, 5, seed=7)
    for rows in (slice(0, 0), slice(9, 10)):
        cut = tuple(t[rows] if i in (0, 1, 2, 3, 9, 10) else t for i, t in enumerate(base))
        kw = dict(comps["csa"], comp_ids=comps["csa"]["comp_ids"][rows], comp_valid=comps["csa"]["comp_valid"][rows])
        got = kernels.sparse_attention(*cut[:-1], fp8=True, **kw)
        want = sparse_attention_torch(*cut, **kw)
        assert got.shape == want.shape and (got - want).abs().max().item() <= 2e-5 if got.numel() else True
    print(f"worst={worst:.3g}")
""")


def test_triton_matches_torch_twin_under_interpreter():
    assert_interpreted_script_passes(PARITY_SCRIPT, timeout=300, DSV4_KERNELS="triton")


def _setup(fmt, H, W, seed):
    namespace = {}
    exec(SETUP, namespace)
    return namespace["setup"](fmt, H, W, seed)


@pytest.mark.parametrize("slack", [0, 2])
def test_twin_equals_gathered_keys_by_hand(slack):
    """The twin against keys gathered by an independent per-query loop and the sink softmax;
    ``slack``: the ring has that many rows more than the window reads (speculative decoding)."""
    base, comps = _setup(PLAIN, 3, 5 + slack, seed=1)
    q, kv, seq, pos, start, slots, window, sinks, scale, cos, sin, _ = base
    kw = comps["csa"]
    out = kernels.sparse_attention(*base[:-1], **kw, window=5)
    ring_w = window.shape[1]
    for t in range(q.shape[0]):
        b, p = int(seq[t]), int(pos[t])
        keys = []
        for j in range(5):
            if p - j < 0:
                continue
            keys.append(kv[t - j] if p - j >= int(start[b]) else window[int(slots[b]), (p - j) % ring_w])
        for e, ok in zip(kw["comp_ids"][t].tolist(), kw["comp_valid"][t].tolist()):
            if ok:
                keys.append(kw["comp_pool"][int(kw["tables"][b, e // 4]), e % 4])
        keys = torch.stack(keys)
        for h in range(q.shape[1]):
            e = torch.exp(torch.cat([keys @ q[t, h] * scale, sinks[h:h + 1]]))
            o = (e[:-1, None] * keys).sum(0) / e.sum()
            a, c = o[16::2].clone(), o[17::2].clone()  # inverse RoPE of the 4 rope pairs
            o[16::2], o[17::2] = a * cos[t] + c * sin[t], c * cos[t] - a * sin[t]
            torch.testing.assert_close(out[t, h], o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, param", [
    (dict(q=torch.zeros(2, 16)), "q"),
    (dict(q=torch.zeros(2, 3, 15)), "q"),
    (dict(kv=torch.zeros(2, 8)), "kv"),
    (dict(seq=torch.zeros(2, dtype=torch.int32)), "seq"),
    (dict(sinks=torch.zeros(4)), "sinks"),
    (dict(cos=torch.zeros(2, 9)), "cos"),
    (dict(window_pool=torch.zeros(2, 5, 8)), "window_pool"),
])
def test_bad_arguments_raise_value_error_naming_the_parameter(bad, param):
    args = dict(q=torch.zeros(2, 3, 16), kv=torch.zeros(2, 16), seq=torch.zeros(2, dtype=torch.long),
                positions=torch.zeros(2, dtype=torch.long), start_pos=torch.zeros(1, dtype=torch.long),
                window_slots=torch.zeros(1, dtype=torch.long), window_pool=torch.zeros(2, 5, 16),
                sinks=torch.zeros(3), scale=1.0, cos=torch.zeros(2, 4), sin=torch.zeros(2, 4))
    args.update(bad)
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        kernels.sparse_attention(**args)
