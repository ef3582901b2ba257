"""Routing with shared ids (``TopKRouting.shared_ids``, Inkling): the top-k among the first E of
E + S logits, and the k chosen and S shared scores renormalised by one sum; against the formula
written out, gradients included, and what the routing refuses."""

import pytest
import torch

from kernel_moe.routing.topk import TopKRouting, route, routing_weights, shared_weights

E, S, K = 8, 2, 3


def _logits(T: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, E + S, generator=torch.Generator().manual_seed(seed)) * 2


def test_weights_against_the_formula():
    logits = _logits().requires_grad_()
    bias = torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.3
    spec = TopKRouting(E, K, scoring="sigmoid", renormalize=True, scaling=8.0, shared_ids=S)
    w, ids = route(logits, spec, bias)
    g = shared_weights(logits, ids, spec)
    ref = logits.detach().clone().requires_grad_()
    scores = ref.sigmoid()
    ref_ids = (scores[:, :E] + bias).topk(K, dim=-1).indices
    chosen, shared = scores.gather(1, ref_ids), scores[:, E:]
    denom = chosen.sum(-1, keepdim=True) + shared.sum(-1, keepdim=True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, chosen / denom * 8.0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, shared / denom * 8.0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.sum(-1) + g.sum(-1), torch.full((13,), 8.0))
    torch.testing.assert_close(routing_weights(logits, ids, spec), w)
    cot = torch.randn(13, K + S, generator=torch.Generator().manual_seed(2))
    (torch.cat([w, g], -1) * cot).sum().backward()
    (torch.cat([chosen / denom, shared / denom], -1) * 8.0 * cot).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-5)
    assert spec.describe() == "sigmoid>top3>renorm(+2 shared)>x8"


@pytest.mark.parametrize("bad", [dict(scoring="softmax"), dict(renormalize=False), dict(num_groups=2, topk_groups=2)])
def test_refuses_shared_ids_without_per_expert_renormalised_scores(bad):
    fields = dict(scoring="sigmoid", renormalize=True, shared_ids=S) | bad
    with pytest.raises(ValueError, match="shared_ids"):
        TopKRouting(E, K, **fields)
