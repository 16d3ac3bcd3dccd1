"""mHC kernels: the Triton kernels (interpreted on CPU, in one subprocess) against their torch
twins, the twins against the engine's HyperConnection / HyperHead + RMSNorm bit for bit, the
custom ops' opcheck and a fullgraph torch.compile of the entry points."""
import textwrap

import pytest
import torch

import kernels
from engine.model.layers import RMSNorm
from engine.model.mhc import HyperConnection, HyperHead
from kernels.mhc import hc_head_torch, hc_post_torch, hc_pre_torch
from kernels.torch_math import rms_norm, sinkhorn
from tests_util import assert_interpreted_script_passes

EPS = 1e-6

# Shared by the in-process tests and the interpreted script: random streams and parameters.
SETUP = textwrap.dedent("""
    import torch

    def setup(T, hc, D, seed, dtype=torch.float32, head=False):
        g = torch.Generator().manual_seed(seed)
        n = hc if head else (2 + hc) * hc
        streams = (torch.randn(T, hc, D, generator=g) * 3).to(dtype)
        fn = torch.randn(n, hc * D, generator=g) * (hc * D) ** -0.5 * 2
        base = torch.randn(n, generator=g)
        scale = torch.rand(1 if head else 3, generator=g) * 2 + 0.2
        norm_weight = torch.randn(D, generator=g)
        return streams, fn, base, scale, norm_weight

    def post_args(T, hc, D, seed, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        out = torch.randn(T, D, generator=g).to(dtype)
        streams = torch.randn(T, hc, D, generator=g).to(dtype)
        post = torch.rand(T, hc, generator=g) * 2
        comb = torch.rand(T, hc, hc, generator=g)
        return out, streams, post, comb
""")
_ns = {}
exec(SETUP, _ns)
setup, post_args = _ns["setup"], _ns["post_args"]

# hc 4 and 3 (padded to a 4-wide tile); D = 24, 100 (not powers of two), 128, 300 (several
# 256-channel blocks); hc * D from 72 to 1200 crosses the 256-column blocks of the projection.
PARITY_SCRIPT = SETUP + textwrap.dedent("""
    import kernels
    from kernels.sink_attention import INTERPRETED
    from kernels.mhc import (hc_head_torch, hc_head_triton, hc_post_torch, hc_post_triton, hc_pre_torch,
                             hc_pre_triton)

    assert INTERPRETED, "TRITON_INTERPRET=1 did not reach triton"
    EPS = 1e-6
    worst = 0.0

    def close(got, want, what, rtol=1e-5):
        global worst
        assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype, want.shape)
        if want.numel() == 0:
            return
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
        assert err <= rtol, (what, err)
        worst = max(worst, err)

    seed = 0
    for hc in (4, 3):
        for D in (24, 100, 128, 300):
            for T in (0, 1, 5):
                seed += 1
                args = setup(T, hc, D, seed)
                for iters in (20, 1):
                    got = hc_pre_triton(*args, iters, EPS, EPS)
                    want = hc_pre_torch(*args, iters, EPS, EPS)
                    for name, g_, w_ in zip(("x", "post", "comb"), got, want):
                        close(g_, w_, (name, hc, D, T, iters))
                    if T and iters == 20:  # columns normalised last; rows near 1 (random logits converge slowly)
                        ones = torch.ones(T, hc)
                        assert torch.allclose(got[2].sum(-1), ones, atol=0.1), got[2].sum(-1)
                        assert torch.allclose(got[2].sum(-2), ones, atol=1e-4), got[2].sum(-2)
                hargs = setup(T, hc, D, seed, head=True)
                close(hc_head_triton(*hargs, EPS, EPS), hc_head_torch(*hargs, EPS, EPS), ("head", hc, D, T))
                pargs = post_args(T, hc, D, seed)
                close(hc_post_triton(*pargs), hc_post_torch(*pargs), ("post", hc, D, T))

    # Strided views go through the kernels' strides.
    s, fn, base, scale, w = setup(5, 4, 100, 99)
    s_view = torch.randn(100, 5, 4, dtype=torch.float32).permute(1, 2, 0)
    s_view.copy_(s)
    fn_view = fn.t().contiguous().t()
    for got, want in zip(hc_pre_triton(s_view, fn_view, base, scale, w, 20, EPS, EPS),
                         hc_pre_torch(s, fn, base, scale, w, 20, EPS, EPS)):
        close(got, want, "strided pre")
    out, ps, post, comb = post_args(5, 4, 100, 98)
    close(hc_post_triton(out.t().contiguous().t(), s_view, post.t().contiguous().t(), comb.transpose(1, 2)),
          hc_post_torch(out, s, post, comb.transpose(1, 2)), "strided post")

    # bf16 streams: the kernels mirror the twin's rounding points (streams-dtype collapse; post's
    # casts and sums); the interpreter's fp32 -> bf16 cast is not round-to-nearest (it is off by up
    # to one ulp at each rounding point), so allow a few bf16 ulps here.
    args = setup(5, 4, 128, 7, dtype=torch.bfloat16)
    for got, want in zip(hc_pre_triton(*args, 20, EPS, EPS), hc_pre_torch(*args, 20, EPS, EPS)):
        close(got, want, "bf16 pre", rtol=3e-2)
    hargs = setup(5, 4, 128, 7, dtype=torch.bfloat16, head=True)
    close(hc_head_triton(*hargs, EPS, EPS), hc_head_torch(*hargs, EPS, EPS), "bf16 head", rtol=3e-2)
    pargs = post_args(5, 4, 128, 7, dtype=torch.bfloat16)
    close(hc_post_triton(*pargs), hc_post_torch(*pargs), "bf16 post", rtol=3e-2)

    # Forced through the public dispatcher: the custom ops run the Triton side.
    args = setup(3, 4, 24, 5)
    assert kernels.backend_for(args[0]) == "triton"
    assert all(torch.equal(a, b) for a, b in zip(kernels.hc_pre(*args, iters=20, hc_eps=EPS, norm_eps=EPS),
                                                 hc_pre_triton(*args, 20, EPS, EPS)))
    pargs = post_args(3, 4, 24, 5)
    assert torch.equal(kernels.hc_post(*pargs), hc_post_triton(*pargs))
    hargs = setup(3, 4, 24, 5, head=True)
    assert torch.equal(kernels.hc_head(*hargs, hc_eps=EPS, norm_eps=EPS), hc_head_triton(*hargs, EPS, EPS))
    print(f"worst={worst:.3g}")
""")



def test_triton_matches_torch_twin_under_interpreter():
    assert_interpreted_script_passes(PARITY_SCRIPT, timeout=240, DSV4_KERNELS="triton")


def _engine_hc(args, iters):
    streams, fn, base, scale, norm_weight = args
    hc, D = streams.shape[1:]
    mod = HyperConnection(hc, D, iters, EPS, EPS)
    norm = RMSNorm(D, EPS)
    with torch.no_grad():
        mod.fn.copy_(fn), mod.base.copy_(base), mod.scale.copy_(scale), norm.weight.copy_(norm_weight)
    return mod, norm


def _reference_pre(streams, fn, base, scale, norm_weight, iters):
    """The unfused math (spec §3.2, the engine's before fusion): what the twin must equal bit for bit."""
    hc = streams.shape[1]
    flat = rms_norm(streams.flatten(1).float(), None, EPS)
    pre_w, post_w, comb_w = (flat @ fn.float().t()).split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.float().split([hc, hc, hc * hc])
    s_pre, s_post, s_comb = scale.float().unbind(0)
    pre = torch.sigmoid(pre_w * s_pre + pre_b) + EPS
    post = 2 * torch.sigmoid(post_w * s_post + post_b)
    comb = sinkhorn((comb_w * s_comb + comb_b).view(-1, hc, hc), iters, EPS)
    collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
    return rms_norm(collapsed, norm_weight, EPS), post, comb


def _reference_post(out, streams, post, comb):
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


def _reference_head(streams, fn, base, scale, norm_weight):
    flat = rms_norm(streams.flatten(1).float(), None, EPS)
    pre = torch.sigmoid((flat @ fn.float().t()) * scale.float() + base.float()) + EPS
    return rms_norm((pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype), norm_weight, EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hc,D,T,iters", [(4, 24, 5, 20), (3, 100, 1, 20), (4, 128, 0, 1)])
def test_twins_are_bit_exact_to_the_unfused_math(dtype, hc, D, T, iters):
    args = setup(T, hc, D, seed=hc * D + T + iters, dtype=dtype)
    want = _reference_pre(*args, iters)
    got = hc_pre_torch(*args, iters, EPS, EPS)
    for g_, w_ in zip(got, want):
        assert g_.dtype == w_.dtype and torch.equal(g_, w_)
    via_entry = kernels.hc_pre(*args, iters=iters, hc_eps=EPS, norm_eps=EPS)  # CPU default: the twin
    assert all(torch.equal(a, b) for a, b in zip(via_entry, want))
    # The engine's modules run the entry points.
    mod, norm = _engine_hc(args, iters)
    assert all(torch.equal(a, b) for a, b in zip(mod.pre(args[0], norm), want))

    post, comb = want[1], want[2]
    y = torch.randn(T, D).to(dtype)
    want_post = _reference_post(y, args[0], post, comb)
    assert torch.equal(hc_post_torch(y, args[0], post, comb), want_post)
    assert torch.equal(HyperConnection.post(y, args[0], post, comb), want_post)

    streams, fn, base, scale, norm_weight = setup(T, hc, D, seed=7, dtype=dtype, head=True)
    want_head = _reference_head(streams, fn, base, scale, norm_weight)
    assert torch.equal(hc_head_torch(streams, fn, base, scale, norm_weight, EPS, EPS), want_head)
    head = HyperHead(hc, D, EPS, EPS)
    with torch.no_grad():
        head.fn.copy_(fn), head.base.copy_(base), head.scale.copy_(scale), norm.weight.copy_(norm_weight)
    assert torch.equal(head(streams, norm), want_head)


def test_twin_post_sums_over_combs_first_index():
    """An independent per-stream loop written from ``X'_k = post_k f + sum_j comb[j, k] X_j``."""
    out, streams, post, comb = post_args(2, 3, 5, seed=3)
    got = hc_post_torch(out, streams, post, comb)
    for k in range(3):
        want = post[:, k, None] * out + sum(comb[:, j, k, None] * streams[:, j] for j in range(3))
        torch.testing.assert_close(got[:, k], want, rtol=1e-6, atol=1e-6)


def test_ops_pass_opcheck():
    torch.library.opcheck(torch.ops.dsv4.hc_pre.default, (*setup(5, 3, 24, seed=1), 20, EPS, EPS))
    torch.library.opcheck(torch.ops.dsv4.hc_pre.default, (*setup(1, 4, 100, seed=2), 1, EPS, EPS))
    torch.library.opcheck(torch.ops.dsv4.hc_head.default, (*setup(5, 4, 24, seed=3, head=True), EPS, EPS))
    torch.library.opcheck(torch.ops.dsv4.hc_post.default, post_args(5, 3, 24, seed=4))
    torch.library.opcheck(torch.ops.dsv4.hc_post.default, post_args(0, 4, 24, seed=5))


def _block(args, hargs, y):
    """A block's use of the entry points: pre → sublayer → post, then the head."""
    x, post, comb = kernels.hc_pre(*args, iters=20, hc_eps=EPS, norm_eps=EPS)
    streams = kernels.hc_post(x * 0.5 + y, args[0], post, comb)
    return streams, kernels.hc_head(streams, *hargs[1:], hc_eps=EPS, norm_eps=EPS)


def test_fullgraph_compile_of_the_ops_equals_eager():
    args, hargs = setup(5, 4, 24, seed=8), setup(5, 4, 24, seed=9, head=True)
    y = torch.randn(5, 24)

    def via_ops(args, hargs, y):
        x, post, comb = torch.ops.dsv4.hc_pre(*args, 20, EPS, EPS)
        streams = torch.ops.dsv4.hc_post(x * 0.5 + y, args[0], post, comb)
        return streams, torch.ops.dsv4.hc_head(streams, *hargs[1:], EPS, EPS)

    eager = _block(args, hargs, y)
    for fn in (_block, via_ops):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(args, hargs, y)
        for e, c in zip(eager, compiled):
            assert c.shape == e.shape and c.dtype == e.dtype and torch.equal(c, e)


@pytest.mark.parametrize("bad, param", [
    (dict(streams=torch.zeros(2, 96)), "streams"),
    (dict(fn=torch.zeros(24, 95)), "fn"),
    (dict(base=torch.zeros(23)), "base"),
    (dict(scale=torch.zeros(1)), "scale"),
    (dict(norm_weight=torch.zeros(25)), "norm_weight"),
    (dict(iters=0), "iters"),
])
def test_pre_bad_arguments_raise_value_error_naming_the_parameter(bad, param):
    streams, fn, base, scale, norm_weight = setup(2, 4, 24, seed=0)
    kw = dict(streams=streams, fn=fn, base=base, scale=scale, norm_weight=norm_weight, iters=20)
    kw.update(bad)
    iters = kw.pop("iters")
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        kernels.hc_pre(*kw.values(), iters=iters, hc_eps=EPS, norm_eps=EPS)


@pytest.mark.parametrize("bad, param", [
    (dict(out=torch.zeros(2, 23)), "out"),
    (dict(out=torch.zeros(2, 24, dtype=torch.bfloat16)), "out"),
    (dict(post=torch.zeros(2, 3)), "post"),
    (dict(comb=torch.zeros(2, 4, 3)), "comb"),
])
def test_post_bad_arguments_raise_value_error_naming_the_parameter(bad, param):
    kw = dict(zip(("out", "streams", "post", "comb"), post_args(2, 4, 24, seed=0)))
    kw.update(bad)
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        kernels.hc_post(**kw)


def test_head_checks_its_own_shapes():
    streams, fn, base, scale, norm_weight = setup(2, 4, 24, seed=0)  # pre-shaped fn: wrong for the head
    with pytest.raises(ValueError, match=r"^fn\b"):
        kernels.hc_head(streams, fn, base, scale, norm_weight, hc_eps=EPS, norm_eps=EPS)
