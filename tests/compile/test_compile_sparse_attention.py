"""torch.compile(fullgraph=True) of SparseExpertAttention: one graph and no break (the expert
projections stay in it as kernel_moe::expert_projection), inductor equals eager forward and
backward, both variants, with a padding mask."""

from __future__ import annotations

import pytest
import torch

from kernel_moe import SparseExpertAttention

D = 32


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _layer(variant: str) -> SparseExpertAttention:
    torch.manual_seed(0)
    return SparseExpertAttention(D, 4, 2, top_k=2, variant=variant)


@pytest.mark.parametrize("variant", ["moa", "switchhead"])
@pytest.mark.parametrize("padded", [False, True])
def test_explain_one_graph_no_breaks(variant, padded):
    layer = _layer(variant)
    x = torch.randn(2, 9, D, requires_grad=True)
    keep = torch.ones(2, 9, dtype=torch.long)
    keep[0, :3] = 0
    explained = torch._dynamo.explain(layer)(x, keep if padded else None)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("expert_projection" in op for op in ops) == 2, ops


@pytest.mark.parametrize("variant", ["moa", "switchhead"])
def test_inductor_forward_and_backward_equal_eager(variant):
    layer = _layer(variant)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 9, D)
    keep = torch.ones(2, 9, dtype=torch.long)
    keep[1, -2:] = 0
    outs, grads = [], []
    for fn in (layer, compiled):
        xi = x.clone().requires_grad_()
        out = fn(xi, keep)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in layer.parameters()])
        layer.zero_grad(set_to_none=True)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
