"""Grouped MoE over stacked experts equals the per-expert reference loop, for every batch shape."""
import pytest
import torch

from engine.model.moe import StackedExperts
from kernels.moe import expert_tiles
from kernels.torch_math import swiglu


def _reference(stack: StackedExperts, x, experts, weights):
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for e, w in zip(experts[t].tolist(), weights[t].tolist()):
            if e not in stack.expert_ids:
                continue
            local = stack.expert_ids.index(e)
            h = x[t] @ stack.gate_up[local].t()
            a = swiglu(h[:stack.inter], h[stack.inter:], stack.limit) * w
            out[t] += a @ stack.down[local].t()
    return out


@pytest.mark.parametrize("tokens", [1, 3, 17, 200])
@pytest.mark.parametrize("expert_ids", [range(0, 8), range(4, 8)], ids=["all", "ep_rank1"])
def test_grouped_equals_loop(tokens, expert_ids):
    g = torch.Generator().manual_seed(tokens)
    stack = StackedExperts(expert_ids, dim=24, inter=12, dtype=torch.float32, limit=3.0)
    with torch.no_grad():
        stack.gate_up_dense.copy_(torch.randn(stack.gate_up_dense.shape, generator=g))
        stack.down_dense.copy_(torch.randn(stack.down_dense.shape, generator=g))
    x = torch.randn(tokens, 24, generator=g)
    experts = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3, generator=g)
    torch.testing.assert_close(stack(x, experts, weights), _reference(stack, x, experts, weights),
                               rtol=1e-5, atol=1e-5)


def test_tiles_hold_each_assignment_once_under_one_expert():
    assignments = torch.tensor([3, 0, 3, 3, 1, 0, 3])
    rows, tile_expert = expert_tiles(assignments, n_experts=4, tile=2)
    tiles = rows.view(-1, 2)
    seen = sorted(r for r in rows.tolist() if r < len(assignments))
    assert seen == list(range(len(assignments)))
    for tile, e in zip(tiles.tolist(), tile_expert.tolist()):
        assert all(assignments[r] == e for r in tile if r < len(assignments))
