"""SparseMixer routing (``routing/sparsemixer.py``, TopKRouting(scoring="sparsemixer")) against
transformers' own ``sparsemixer`` at inference: the same experts, weights (fp32, 1e-6) and
gradients of the logits (1e-5), with logits drawn so that many tokens have experts within the
threshold of their best; and what the routing refuses."""

import pytest
import torch

from kernel_moe.routing.sparsemixer import sparsemixer_route
from kernel_moe.routing.topk import TopKRouting, route, routing_weights

phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")


def _logits(T: int, E: int, seed: int) -> torch.Tensor:
    """Logits with near ties: a base value per token plus small spreads, some tokens wide apart."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(T, 1, generator=g) * 3
    spread = torch.randn(T, E, generator=g) * torch.rand(T, 1, generator=g)
    return base + spread


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.2, 1.0])
@pytest.mark.parametrize("T, E", [(1, 4), (64, 8), (33, 16)])
def test_matches_transformers_sparsemixer_in_eval(eps, T, E):
    a = _logits(T, E, seed=T + E).requires_grad_()
    b = a.detach().clone().requires_grad_()
    w, ids = sparsemixer_route(a, 2, eps)
    ref_w, ref_ids = phimoe.sparsemixer(b, jitter_eps=eps, training=False, top_k=2)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-6)
    cot = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    (w * cot).sum().backward()
    (ref_w * cot).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_the_threshold_shows_on_these_logits():
    """Weights at eps 0.2 differ from those at 0.01 (so the tests above see the threshold)."""
    x = _logits(64, 8, seed=3)
    assert not torch.allclose(sparsemixer_route(x, 2, 0.2)[0], sparsemixer_route(x, 2, 0.01)[0])


def test_route_with_scaling_and_more_rounds():
    x = _logits(20, 8, seed=5)
    spec = TopKRouting(8, 3, scoring="sparsemixer", mixer_eps=0.1, scaling=2.0)
    w, ids = route(x, spec)
    w3, ids3 = sparsemixer_route(x, 3, 0.1)
    assert torch.equal(ids, ids3) and torch.equal(w, 2.0 * w3)
    assert (ids.sort(dim=-1).values.diff(dim=-1) != 0).all()  # k distinct experts
    assert spec.describe() == "sparsemixer(eps=0.1)>top3>x2"


@pytest.mark.parametrize("bad", [dict(renormalize=True), dict(num_groups=2), dict(mixer_eps=-1.0),
                                 dict(order="topk_then_score")])
def test_refuses_what_it_does_not_define(bad):
    with pytest.raises(ValueError, match="sparsemixer|topk_then_score"):
        TopKRouting(8, 2, scoring="sparsemixer", **bad)


def test_no_selection_bias_nor_weights_of_a_given_choice():
    spec = TopKRouting(8, 2, scoring="sparsemixer", mixer_eps=0.01)
    x = _logits(4, 8, seed=0)
    with pytest.raises(ValueError, match="selection bias"):
        route(x, spec, torch.zeros(8))
    with pytest.raises(ValueError, match="sparsemixer"):
        routing_weights(x, torch.zeros(4, 2, dtype=torch.long), spec)
