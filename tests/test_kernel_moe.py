"""Routed experts on stored weights (kernels/moe.py): the two Triton launches (interpreted, fp32
activations) against the twin; the twin against the engine's StackedExperts.forward bit for bit
(dense, FP8 and MXFP4 stacks, expert-parallel ranges with foreign assignments, limit 0 and > 0);
the shared expert on kernels.linear; opcheck; argument errors."""
import textwrap

import pytest
import torch

import kernels
from engine.model.moe import Expert, StackedExperts
from kernels.moe import moe_experts_torch
from kernels.torch_math import swiglu
from kernels.quant import fp8_block_quantize, mxfp4_quantize
from tests_util import assert_interpreted_script_passes

SETUP = """
import torch
from kernels.quant import fp8_block_quantize, mxfp4_quantize


def stack(ws, fmt):
    if fmt == "dense":
        return ws, None
    parts = [fp8_block_quantize(w) if fmt == "fp8" else mxfp4_quantize(w) for w in ws]
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])


def case(g, fmt, T, k, E, D, I, start, dense_views=False):
    w1, w3, w2 = (torch.randn(E, *shape, generator=g) / 8 for shape in ((I, D), (I, D), (D, I)))
    if dense_views:  # the dense stacks' views: w1 = gate_up[:, :I], w3 = gate_up[:, I:]
        gate_up = torch.cat([w1, w3], dim=1)
        w1, w3 = gate_up[:, :I], gate_up[:, I:]
    (w1, s1), (w3, s3), (w2, s2) = stack(w1, fmt), stack(w3, fmt), stack(w2, fmt)
    x = torch.randn(T, D, generator=g)
    # Global ids over [0, start + E + 2): some assignments belong to other ranks.
    experts = torch.randint(0, start + E + 2, (T, k), generator=g)
    weights = torch.rand(T, k, generator=g)
    return x, experts, weights, start, w1, s1, w3, s3, w2, s2, fmt
"""

# D = 136: the FP8 row blocks of w2 straddle 128 (and its K = D of w1/w3); I = 24, k = 2 and 6.
PARITY_SCRIPT = SETUP + textwrap.dedent("""
    import kernels
    from kernels.moe import expert_tiles, expert_tiles_triton, moe_experts_torch, moe_experts_triton
    from kernels.sink_attention import INTERPRETED

    assert INTERPRETED, "TRITON_INTERPRET=1 did not reach triton"
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    cases = [
        ("dense", 1, 2, 3, 40, 24, 0, 0.0, True),
        ("dense", 3, 6, 2, 40, 24, 3, 0.5, False),
        ("fp8", 2, 2, 2, 136, 24, 1, 0.0, False),
        ("fp8", 1, 6, 3, 40, 24, 0, 0.5, False),
        ("fp4", 2, 2, 2, 64, 24, 2, 0.5, False),
        ("fp4", 0, 6, 2, 64, 24, 0, 0.0, False),
        ("fp8", 7, 6, 2, 40, 24, 1, 0.5, False),  # 42 assignments: a tile per expert holds many
    ]
    for fmt, T, k, E, D, I, start, limit, views in cases:
        args = case(g, fmt, T, k, E, D, I, start, views)
        want = moe_experts_torch(*args, limit)
        for tiled in (False, True):  # per-assignment (decode) and expert tiles (prefill)
            got = moe_experts_triton(*args, limit, tiled=tiled)
            assert got.shape == want.shape == (T, D) and got.dtype == want.dtype == torch.float32
            if T:
                diff = (got - want).abs().max().item()
                assert diff <= 1e-5 * max(1.0, want.abs().max().item()), (fmt, T, k, tiled, diff)
                worst = max(worst, diff)
    # The one-launch sort into expert tiles == the torch one, row for row (stable within an expert):
    # empty, one expert, foreign ids, several 64-assignment blocks, tiles of 4..64 rows.
    for T, k, start, E, tile in [(0, 2, 0, 4, 4), (1, 1, 0, 1, 64), (5, 2, 0, 8, 4), (37, 3, 2, 5, 8),
                                 (200, 2, 0, 8, 64), (64, 6, 3, 16, 16), (300, 1, 0, 1, 64)]:
        ex = torch.randint(0, start + E + 2, (T, k), generator=g)
        local = (ex - start).flatten()
        want = expert_tiles(torch.where((local >= 0) & (local < E), local, E).long(), E + 1, tile)
        got = expert_tiles_triton(ex, start, E, tile)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (T, k, start, E, tile)
    # Only foreign assignments: zeros; and the public entry point takes the Triton side.
    args = list(case(g, "fp8", 2, 2, 2, 40, 24, 0))
    args[1] = torch.full((2, 2), 5)
    assert torch.count_nonzero(kernels.moe_experts(*args, 0.0)) == 0
    assert kernels.backend_for(args[0]) == "triton"
    print(f"worst={worst:.3g}")
""")


def test_triton_matches_twin_under_interpreter():
    assert_interpreted_script_passes(PARITY_SCRIPT, timeout=180, DSV4_KERNELS="triton")



def _quantize(w, fmt):
    return fp8_block_quantize(w) if fmt == "fp8" else mxfp4_quantize(w)


def _engine_experts(g, fmt, dtype, start, E, D, I, limit):
    """An engine StackedExperts of experts [start, start + E) and the matching kernel arguments."""
    mod = StackedExperts(range(start, start + E), D, I, dtype, limit)
    dense = {part: torch.randn(E, *mod.part_shape(part), generator=g) / 8 for part in mod.PARTS}
    stored = {}
    for part, ws in dense.items():
        for e in range(E):
            if fmt == "dense":
                mod.set_dense(part, e, ws[e])
            else:
                mod.set_quantized(part, e, *_quantize(ws[e], fmt), fmt)
    for part in mod.PARTS:
        stored[part] = ((mod.dense_part(part), None) if fmt == "dense" else
                        (getattr(mod, f"{part}_qweight"), getattr(mod, f"{part}_qscale")))
    return mod, (*stored["w1"], *stored["w3"], *stored["w2"])


@pytest.mark.parametrize("fmt", ["dense", "fp8", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_is_bit_exact_to_engine_stacked_experts(fmt, dtype):
    g = torch.Generator().manual_seed(1)
    D, I = 160, 24  # D > 128, not a multiple: FP8 blocks straddle in w1/w3 columns and w2 rows
    for start, E, limit in ((0, 4, 0.0), (2, 3, 0.75)):
        mod, weights_args = _engine_experts(g, fmt, dtype, start, E, D, I, limit)
        for T, k in ((0, 2), (1, 6), (5, 2), (9, 6)):
            x = torch.randn(T, D, generator=g).to(dtype)
            experts = torch.randint(0, start + E + 2, (T, k), generator=g)  # some foreign
            weights = torch.rand(T, k, generator=g)
            want = mod(x, experts, weights)
            got = kernels.moe_experts(x, experts, weights, start, *weights_args, fmt, limit)
            assert got.dtype == torch.float32 and torch.equal(got, want), (fmt, dtype, start, T, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_expert_equals_its_swiglu_on_stored_fp8_linears(dtype):
    # The shared expert runs as a one-expert stack on the routed kernel; its gate/up GEMM is one
    # matmul over the concatenated weights, which may sum in another order than two linears (fp32
    # ulps); in bf16 the rounding of each GEMM output hides that.
    g = torch.Generator().manual_seed(2)
    D, I = 160, 136
    shared = Expert(D, I, dtype, limit=0.5)
    stored = {}
    for name in ("w1", "w2", "w3"):
        layer = getattr(shared, name)
        w, s = fp8_block_quantize(torch.randn(layer.out_features, layer.in_features, generator=g) / 8)
        layer.set_quantized(w, s, "fp8", keep_dense=False)
        stored[name] = (w, s)
    x = torch.randn(3, D, generator=g).to(dtype)
    h = swiglu(kernels.linear(x, *stored["w1"], "fp8").float(), kernels.linear(x, *stored["w3"], "fp8").float(), 0.5)
    want = kernels.linear(h.to(dtype), *stored["w2"], "fp8").float()
    got = shared(x)
    assert got.dtype == torch.float32
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _op_args(fmt):
    ns = {}
    exec(SETUP, ns)
    g = torch.Generator().manual_seed(3)
    return (*ns["case"](g, fmt, 3, 2, 2, 40, 24, 1, dense_views=fmt == "dense"), 0.5)


@pytest.mark.parametrize("fmt", ["dense", "fp8", "fp4"])
def test_moe_experts_op_passes_opcheck(fmt):
    # opcheck's schema test does arithmetic on every input, which CPU torch lacks for float8 dtypes.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.dsv4.moe_experts.default, _op_args(fmt),
                          test_utils=utils if fmt != "dense" else ("test_schema", *utils))


def test_fullgraph_compile_of_the_op_equals_eager():
    args = _op_args("fp4")

    def f(*a):
        return torch.ops.dsv4.moe_experts.default(*a) + 1

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(*args), moe_experts_torch(*args) + 1)


@pytest.mark.parametrize("index, value, param", [
    (0, torch.zeros(3, 41), "x"),
    (6, torch.zeros(2, 24, 41), "w3"),
    (1, torch.zeros(3, 2), "experts"),
    (2, torch.zeros(3, 2, dtype=torch.float64), "weights"),
    (3, -1, "expert_start"),
    (5, None, "s1"),
    (8, torch.zeros(2, 40, 26, dtype=torch.float8_e4m3fn), "w2"),
    (10, "mxfp4", "fmt"),
])
def test_bad_arguments_raise_value_error_naming_the_parameter(index, value, param):
    args = list(_op_args("fp8"))
    args[index] = value
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        kernels.moe_experts(*args)
