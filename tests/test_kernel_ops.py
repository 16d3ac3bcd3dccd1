"""The kernels as torch custom ops (``torch.ops.dsv4.*``): each passes ``torch.library.opcheck``
(schema, fake implementation, no aliasing), and a function calling them traces with
``torch.compile(fullgraph=True)`` and gives the eager result. CPU, so the ops run their twins;
the Triton side of each op is covered by the interpreted parity tests."""
import textwrap

import pytest
import torch

import kernels
from kernels import indexer as _idx
from kernels.kv_records import FP4_KEY, FP8_ENTRY, PLAIN
import test_kernel_indexer
import test_kernel_sparse_attention


def _namespace(setup: str) -> dict:
    namespace = {}
    exec(textwrap.dedent(setup), namespace)
    return namespace


def _sink_args(seed=0, B=3, H=5, K=9, D=24):
    g = torch.Generator().manual_seed(seed)
    q, keys = torch.randn(B, H, D, generator=g), torch.randn(B, K, D, generator=g)
    mask = torch.rand(B, K, generator=g) > 0.3
    return q, keys, mask, torch.randn(H, generator=g), D ** -0.5


def _indexer_args(fmt):
    q, w, seq, visible, tables, pool = _namespace(test_kernel_indexer.SETUP)["setup"](fmt, 3, 32, seed=5)
    return q, w, seq, visible, tables, pool, fmt


def _sparse_args(fmt, kind):
    base, comps = _namespace(test_kernel_sparse_attention.SETUP)["setup"](fmt, 3, 5, seed=11)
    return base, comps[kind]


def _sparse_op_args(base, kw):
    return (*base, kw.get("comp_pool"), kw.get("tables"), kw.get("comp_ids"), kw.get("comp_valid"),
            kw.get("ratio", 0), kw.get("num_entries"), base[6].shape[1] - 1)  # a ring with one row of slack



def test_sink_attention_op_passes_opcheck():
    torch.library.opcheck(torch.ops.dsv4.sink_attention.default, _sink_args())


@pytest.mark.parametrize("fmt", [PLAIN, FP4_KEY])
def test_indexer_scores_op_passes_opcheck(fmt):
    torch.library.opcheck(torch.ops.dsv4.indexer_scores.default, (*_indexer_args(fmt), 3, 30))


@pytest.mark.parametrize("fmt,kind", [(PLAIN, "none"), (FP8_ENTRY, "hca"), (FP8_ENTRY, "csa"), (PLAIN, "csa")])
def test_sparse_attention_op_passes_opcheck(fmt, kind):
    torch.library.opcheck(torch.ops.dsv4.sparse_attention.default, _sparse_op_args(*_sparse_args(fmt, kind)))


def _all_kernels(sink, index, sparse):
    """One function calling every public kernel entry point, as the model does."""
    q, keys, mask, sinks, scale = sink
    out = kernels.sink_attention(q, keys, mask, sinks, scale) * 2
    iq, w, seq, visible, tables, pool, fmt = index
    ids, valid = kernels.indexer_topk(iq, w, seq, visible, tables, pool, fp4=fmt == FP4_KEY, num_entries=37,
                                      topk=5, workspace_elements=7 * 7 * (3 + 32))
    base, kw = sparse
    att = kernels.sparse_attention(*base[:-1], fp8=base[-1] == FP8_ENTRY, **kw)
    return out, ids, valid, att + 1


@pytest.mark.parametrize("fmt", [PLAIN, FP8_ENTRY])
def test_fullgraph_compile_of_every_kernel_equals_eager(fmt):
    sink = _sink_args(seed=2)
    index = _indexer_args(FP4_KEY if fmt == FP8_ENTRY else PLAIN)
    for kind in ("none", "hca", "csa"):
        sparse = _sparse_args(fmt, kind)
        eager = _all_kernels(sink, index, sparse)
        torch._dynamo.reset()
        compiled = torch.compile(_all_kernels, fullgraph=True, backend="aot_eager")(sink, index, sparse)
        for e, c in zip(eager, compiled):
            assert c.shape == e.shape and c.dtype == e.dtype
            assert torch.equal(c, e), kind


def test_the_compiled_graph_holds_the_ops_not_their_insides():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    sink = _sink_args()
    # The op itself (kernels.sink_attention calls the plain twin on the torch backend, the op on Triton).
    torch.compile(lambda *a: torch.ops.dsv4.sink_attention.default(*a), fullgraph=True, backend=capture)(*sink)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.dsv4.sink_attention.default]
