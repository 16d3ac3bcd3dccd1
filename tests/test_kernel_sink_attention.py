"""Sink attention: the Triton kernel (interpreted on CPU) against its torch twin, and the dispatch policy.

The interpreter is chosen when ``@triton.jit`` runs, i.e. when ``kernels`` is imported, so every
Triton run happens in a fresh subprocess with TRITON_INTERPRET=1: nothing leaks into other tests.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernels
from tests_util import assert_interpreted_script_passes
from kernels.sink_attention import sink_attention_torch

REPO = Path(__file__).resolve().parents[1]

# Each case: B, H, D, K, how the mask is drawn, sink scale. K=37 and 130 are not multiples of the
# 32-key block; H=3 is not a multiple of the 16-head block; D=24 is not a power of two.
PARITY_SCRIPT = textwrap.dedent("""
    import torch
    import kernels
    from kernels.sink_attention import INTERPRETED, sink_attention_torch, sink_attention_triton

    assert INTERPRETED, "TRITON_INTERPRET=1 did not reach triton"
    g = torch.Generator().manual_seed(0)
    cases = [
        (1, 2, 16, 1, "all", 1.0),
        (2, 3, 32, 37, "holes", 3.0),
        (3, 4, 64, 130, "holes", 1.0),
        (3, 2, 24, 37, "row_masked", 30.0),
        (2, 4, 16, 130, "holes", -30.0),
        (2, 2, 16, 37, "none", 1.0),
    ]
    worst = 0.0
    for B, H, D, K, kind, sink_scale in cases:
        q = torch.randn(B, H, D, generator=g)
        keys = torch.randn(B, K, D, generator=g) * 2
        mask = torch.rand(B, K, generator=g) > 0.3
        if kind == "all":
            mask[:] = True
        elif kind == "row_masked":
            mask[1] = False  # only the sink is left: the output row must be zero
        elif kind == "none":
            mask[:] = False
        sinks = torch.randn(H, generator=g) * sink_scale
        scale = D ** -0.5
        got = sink_attention_triton(q, keys, mask, sinks, scale)
        want = sink_attention_torch(q, keys, mask, sinks, scale)
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype)
        diff = (got - want).abs().max().item()
        assert diff <= 1e-5, (B, H, D, K, kind, sink_scale, diff)
        if kind == "row_masked":
            assert torch.count_nonzero(got[1]) == 0
        worst = max(worst, diff)

    # Strided (non-contiguous) inputs take the same path through the kernel's strides.
    q = torch.randn(4, 5, 32, generator=g).transpose(0, 1)[:, :3]  # [5, 3, 32] view
    keys = torch.randn(40, 5, 32, generator=g).transpose(0, 1)     # [5, 40, 32] view
    mask = (torch.rand(40, 5, generator=g) > 0.5).t()
    sinks = torch.randn(3, generator=g)
    diff = (sink_attention_triton(q, keys, mask, sinks, 0.2)
            - sink_attention_torch(q, keys, mask, sinks, 0.2)).abs().max().item()
    assert diff <= 1e-5, ("strided", diff)

    # Forced through the public dispatcher: the Triton side runs (its rounding differs from the twin's).
    kq, kk, km, ks = torch.randn(1, 2, 16), torch.randn(1, 33, 16), torch.ones(1, 33, dtype=torch.bool), torch.zeros(2)
    assert kernels.backend_for(kq) == "triton"
    via_dispatch = kernels.sink_attention(kq, kk, km, ks, 0.25)
    assert torch.equal(via_dispatch, sink_attention_triton(kq, kk, km, ks, 0.25))
    print(f"worst={worst:.3g}")
""")


def test_triton_matches_torch_twin_under_interpreter():
    assert_interpreted_script_passes(PARITY_SCRIPT, timeout=120, DSV4_KERNELS="triton")


def test_twin_matches_direct_softmax_with_sink_column():
    """The twin against an independent per-(b, h) loop written from the formula."""
    g = torch.Generator().manual_seed(1)
    B, H, D, K = 2, 3, 8, 11
    q, keys = torch.randn(B, H, D, generator=g), torch.randn(B, K, D, generator=g)
    mask = torch.rand(B, K, generator=g) > 0.4
    mask[1] = False
    sinks = torch.randn(H, generator=g)
    out = sink_attention_torch(q, keys, mask, sinks, 0.3)
    for b in range(B):
        vis = keys[b][mask[b]]
        for h in range(H):
            e = torch.exp(torch.cat([vis @ q[b, h] * 0.3, sinks[h:h + 1]]))
            want = (e[:-1, None] * vis).sum(0) / e.sum()
            torch.testing.assert_close(out[b, h], want, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(out[1]) == 0


def test_dispatch_defaults_to_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    x = torch.zeros(1)
    assert kernels.backend_for(x) == "torch"
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    assert kernels.backend_for(x) == "triton"
    monkeypatch.setenv(kernels.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=kernels.BACKEND_ENV):
        kernels.backend_for(x)


def test_dispatch_default_on_cpu_is_the_twin_bit_for_bit(monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    g = torch.Generator().manual_seed(2)
    q, keys = torch.randn(2, 4, 16, generator=g).bfloat16(), torch.randn(2, 9, 16, generator=g).bfloat16()
    mask, sinks = torch.rand(2, 9, generator=g) > 0.5, torch.randn(4, generator=g)
    assert torch.equal(kernels.sink_attention(q, keys, mask, sinks, 0.25),
                       sink_attention_torch(q, keys, mask, sinks, 0.25))


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error():
    script = textwrap.dedent("""
        import torch
        import kernels
        q, keys = torch.randn(1, 2, 16), torch.randn(1, 3, 16)
        try:
            kernels.sink_attention(q, keys, torch.ones(1, 3, dtype=torch.bool), torch.zeros(2), 1.0)
        except RuntimeError as e:
            assert "TRITON_INTERPRET" in str(e), e
            print("clear error")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "0", kernels.BACKEND_ENV: "triton"})
    assert proc.returncode == 0 and "clear error" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("bad, param", [
    (dict(q=torch.zeros(2, 16)), "q"),
    (dict(keys=torch.zeros(1, 5, 8)), "keys"),
    (dict(keys=torch.zeros(1, 5, 16, dtype=torch.float64)), "keys"),
    (dict(mask=torch.ones(1, 4, dtype=torch.bool)), "mask"),
    (dict(mask=torch.ones(1, 5)), "mask"),
    (dict(sinks=torch.zeros(3)), "sinks"),
])
def test_bad_arguments_raise_value_error_naming_the_parameter(bad, param):
    args = dict(q=torch.zeros(1, 2, 16), keys=torch.zeros(1, 5, 16),
                mask=torch.ones(1, 5, dtype=torch.bool), sinks=torch.zeros(2))
    args.update(bad)
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        kernels.sink_attention(args["q"], args["keys"], args["mask"], args["sinks"], 1.0)
