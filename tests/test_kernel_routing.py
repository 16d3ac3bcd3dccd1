"""Fused MoE routing and the indexer's fused top-k merge: the Triton kernels (interpreted on CPU,
one subprocess) against their twins, the routing twin against the model's MoE.route (bit-exact),
the merge op's twin against today's running top-k, opcheck of both ops."""
import textwrap

import pytest
import torch

import kernels
from engine.model.moe import MoE
from engine.tiny.make_tiny import tiny_config
from kernels.indexer import indexer_merge_torch, indexer_topk
from kernels.routing import SCORINGS, moe_route_torch
from tests_util import assert_interpreted_script_passes

# Indexer scores with ties: small integers (exact equal scores inside and across chunks), -0.0
# beside 0.0, -inf past each row's visible count (0, fewer than k, one entry, all).
SETUP = textwrap.dedent("""
    import torch

    def route_args(T, E, k, seed, hash_layer=False, bias=True, ties=False):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(T, E, generator=g) * 3
        if ties:  # few distinct values: exact ties in the top-k
            logits = torch.randint(-2, 3, (T, E), generator=g).float()
        b = torch.randn(E, generator=g) * 0.1 if bias and not ties else None
        tok = torch.randint(0, 11, (T,), generator=g)
        t2e = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(11)]) if hash_layer else None
        return logits, b, tok, t2e

    def merge_scores(Q, N, seed):
        g = torch.Generator().manual_seed(seed)
        s = torch.randint(-2, 3, (Q, N), generator=g).float()
        s[s == 0] = torch.tensor([0.0, -0.0]).repeat(N * Q)[: int((s == 0).sum())]
        visible = torch.tensor([N, 3, 0, 1, N - 2, 9, N])[:Q]
        return s.masked_fill(torch.arange(N) >= visible[:, None], float("-inf")), visible
""")

PARITY_SCRIPT = SETUP + textwrap.dedent("""
    import kernels
    from kernels import ops
    from kernels.indexer import indexer_merge_torch, indexer_topk
    from kernels.routing import SCORINGS, moe_route_torch
    from kernels.sink_attention import INTERPRETED

    assert INTERPRETED, "TRITON_INTERPRET=1 did not reach triton"
    worst = 0.0
    kinds = ("bias", "plain", "hash")
    cases = [(5, 37, 6, sc, kind) for sc in SCORINGS for kind in kinds]  # every scoring with every kind
    cases += [(5, E, k, SCORINGS[i % 3], kinds[i // 3 % 3])  # every size, scorings and kinds in turn
              for i, (E, k) in enumerate((E, k) for E in (8, 37, 256) for k in (1, 2, 6))]
    cases += [(T, 37, 6, "sqrtsoftplus", kind) for T in (0, 1) for kind in ("bias", "hash")]
    for T, E, k, sc, kind in cases:
        args = route_args(T, E, k, seed=E + k, hash_layer=kind == "hash", bias=kind == "bias")
        want = moe_route_torch(*args, k, sc, 1.5)
        got = kernels.moe_route(*args, top_k=k, scoring=sc, scaling=1.5)
        assert got[0].dtype == torch.long and got[1].dtype == torch.float32 and got[1].shape == (T, k)
        assert torch.equal(got[0], want[0]), (T, E, k, sc, kind)
        if T:
            diff = ((got[1] - want[1]).abs() / (1e-6 + want[1].abs())).max().item()
            assert diff <= 1e-5, (T, E, k, sc, kind, diff)
            worst = max(worst, diff)
    # Exact ties: the lower expert index first (a stable descending sort's order).
    for sc in SCORINGS:
        logits, _, tok, _ = route_args(6, 37, 6, seed=3, ties=True)
        idx, _ = kernels.moe_route(logits, None, tok, None, top_k=6, scoring=sc, scaling=1.0)
        order = logits.sort(dim=1, descending=True, stable=True).indices[:, :6]
        assert torch.equal(idx, order), sc

    # The fused merge == today's running top-k, ids and validity, with ties, -0.0, visible limits,
    # k above the chunk, several chunks, one chunk, and the TP reduce hook (masking after it).
    for Q, N, k, chunk in [(5, 37, 5, 7), (5, 37, 9, 4), (1, 37, 5, 37), (0, 37, 5, 7), (2, 300, 6, 300)]:
        s, vis = merge_scores(Q, N, seed=N + k)
        want = indexer_topk(lambda c0, c1: s[:, c0:c1], Q, vis, N, k, chunk)
        got = indexer_topk(lambda c0, c1: s[:, c0:c1], Q, vis, N, k, chunk, merge=ops.indexer_merge)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (Q, N, k, chunk)
    _, vis = merge_scores(5, 37, seed=0)
    raw = torch.randint(-1, 2, (5, 37)).float()  # finite everywhere: the reduce path masks after the sum
    red = indexer_topk(lambda c0, c1: raw[:, c0:c1], 5, vis, 37, 5, 12, reduce=lambda x: x + 0,
                       merge=ops.indexer_merge)
    ref = indexer_topk(lambda c0, c1: raw[:, c0:c1], 5, vis, 37, 5, 12, reduce=lambda x: x + 0)
    assert torch.equal(red[0], ref[0]) and torch.equal(red[1], ref[1])
    # The op's twin merge == its Triton merge step by step (scores in the final order too).
    s, vis = merge_scores(4, 37, seed=1)
    a = ops.indexer_merge(None, None, s[:, :20], vis, 0, 6)
    b = indexer_merge_torch(None, None, s[:, :20], vis, 0, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    a = ops.indexer_merge(a[0], a[1], s[:, 20:], vis, 20, 6)
    b = indexer_merge_torch(b[0], b[1], s[:, 20:], vis, 20, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))

    # Launches: the routing is one op; one chunk of the indexer is the scores and the merge.
    graphs = []
    def capture(gm, example_inputs):
        graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm
    args = route_args(5, 37, 6, seed=0)
    torch.compile(lambda *a: kernels.moe_route(*a, top_k=6, scoring="sigmoid", scaling=2.0), fullgraph=True,
                  backend=capture)(*args)
    import operator
    assert [t for t in graphs[-1] if t is not operator.getitem] == [torch.ops.dsv4.moe_route.default], graphs[-1]
    from test_kernel_indexer import SETUP as INDEX_SETUP
    ns = {}
    exec(INDEX_SETUP, ns)
    from kernels.kv_records import PLAIN
    q, w, seq, vis, tables, pool = ns["setup"](PLAIN, 3, 24, seed=2)
    f = lambda *a: kernels.indexer_topk(*a, fp4=False, num_entries=37, topk=5, workspace_elements=7 * 37)
    torch.compile(f, fullgraph=True, backend=capture)(q, w, seq, vis, tables, pool)
    ops_called = [t for t in graphs[-1] if "dsv4" in str(t)]
    assert ops_called == [torch.ops.dsv4.indexer_scores.default, torch.ops.dsv4.indexer_merge.default], graphs[-1]
    assert all(t in ops_called or t is operator.getitem for t in graphs[-1]), graphs[-1]  # nothing else
    print(f"worst={worst:.3g}")
""")


def test_triton_routing_and_merge_match_the_twins_under_interpreter():
    assert_interpreted_script_passes(PARITY_SCRIPT, timeout=300, DSV4_KERNELS="triton", PYTHONPATH="tests")


def _ns() -> dict:
    namespace = {}
    exec(SETUP, namespace)
    return namespace



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("layer", [0, 3])  # a hash layer, a routed one
def test_twin_is_bit_exact_to_the_model_route(dtype, scoring, layer):
    cfg = tiny_config(vocab_size=64, scoring_func=scoring, n_routed_experts=37, num_experts_per_tok=6)
    moe = MoE(cfg, layer, dtype)
    g = torch.Generator().manual_seed(layer)
    moe.gate_weight.copy_(torch.randn(moe.gate_weight.shape, generator=g))
    if moe.is_hash:
        moe.tid2eid.copy_(torch.stack([torch.randperm(37, generator=g)[:6] for _ in range(64)]))
    else:
        moe.gate_bias.copy_(torch.randn(37, generator=g) * 0.1)
    x = torch.randn(9, cfg.hidden_size, generator=g).to(dtype)
    tok = torch.randint(0, 64, (9,), generator=g)
    want = moe.route(x, tok)
    logits = x.float() @ moe.gate_weight.float().t()  # the gate GEMM stays outside the kernel
    got = kernels.moe_route(logits, moe.gate_bias, tok, moe.tid2eid if moe.is_hash else None, top_k=6,
                            scoring=scoring, scaling=cfg.routed_scaling_factor)
    assert moe.is_hash == (layer == 0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(moe_route_torch(logits, moe.gate_bias, tok, moe.tid2eid if moe.is_hash else None, 6,
                                       scoring, cfg.routed_scaling_factor)[1], want[1])


@pytest.mark.parametrize("Q,N,k,chunk", [(7, 37, 5, 7), (7, 37, 9, 4), (1, 37, 5, 3), (0, 37, 5, 7)])
def test_merge_op_twin_equals_the_running_topk(Q, N, k, chunk):
    s, vis = _ns()["merge_scores"](Q, N, seed=N + k)
    want = indexer_topk(lambda c0, c1: s[:, c0:c1], Q, vis, N, k, chunk)
    got = indexer_topk(lambda c0, c1: s[:, c0:c1], Q, vis, N, k, chunk, merge=indexer_merge_torch)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    order = s.sort(dim=1, descending=True, stable=True).indices[:, :k]  # the whole order at once
    assert torch.equal(want[0], order)
    if Q:  # ties really occur among the kept entries
        kept = s.gather(1, order)
        assert bool(((kept[:, 1:] == kept[:, :-1]) & kept[:, 1:].isfinite()).any())


@pytest.mark.parametrize("kind", ["bias", "plain", "hash"])
def test_moe_route_op_passes_opcheck(kind):
    args = _ns()["route_args"](5, 37, 6, seed=1, hash_layer=kind == "hash", bias=kind == "bias")
    torch.library.opcheck(torch.ops.dsv4.moe_route.default, (*args, 6, "sqrtsoftplus", 1.5))


def test_indexer_merge_op_passes_opcheck():
    s, vis = _ns()["merge_scores"](7, 37, seed=4)
    first = indexer_merge_torch(None, None, s[:, :20], vis, 0, 6)
    torch.library.opcheck(torch.ops.dsv4.indexer_merge.default, (None, None, s[:, :20], vis, 0, 6))
    torch.library.opcheck(torch.ops.dsv4.indexer_merge.default, (first[0], first[1], s[:, 20:], vis, 20, 6))


@pytest.mark.parametrize("bad, param", [
    (dict(logits=torch.zeros(5, 8, dtype=torch.float64)), "logits"),
    (dict(bias=torch.zeros(7)), "bias"),
    (dict(token_ids=torch.zeros(5, dtype=torch.int32)), "token_ids"),
    (dict(tid2eid=torch.zeros(11, 3, dtype=torch.long)), "tid2eid"),
    (dict(top_k=9), "top_k"),
    (dict(scoring="relu"), "scoring"),
])
def test_bad_routing_arguments_raise_value_error_naming_the_parameter(bad, param):
    args = dict(logits=torch.zeros(5, 8), bias=torch.zeros(8), token_ids=torch.zeros(5, dtype=torch.long),
                tid2eid=None, top_k=2, scoring="sigmoid")
    args.update(bad)
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        kernels.moe_route(args["logits"], args["bias"], args["token_ids"], args["tid2eid"], top_k=args["top_k"],
                          scoring=args["scoring"], scaling=1.0)
