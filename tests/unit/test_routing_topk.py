"""route() against a per-token Python reference for every routing variant, and TopKRouting validation."""

import math

import pytest
import torch

from kernel_moe.routing.topk import TopKRouting, route


def _reference(logits_TE, spec: TopKRouting, bias_E=None):
    """Token by token, in float64, written from the definitions."""
    T, E = logits_TE.shape
    weights, ids = [], []
    for t in range(T):
        row = [float(v) for v in logits_TE[t]]
        if spec.order == "topk_then_score":
            chosen = sorted(range(E), key=lambda e: -(row[e] + (float(bias_E[e]) if bias_E is not None else 0)))
            chosen = chosen[: spec.top_k]
            z = [math.exp(row[e] - max(row[c] for c in chosen)) for e in chosen]
            w = [v / sum(z) for v in z]
        else:
            if spec.scoring == "softmax":
                m = max(row)
                ex = [math.exp(v - m) for v in row]
                scores = [v / sum(ex) for v in ex]
            else:
                scores = [1 / (1 + math.exp(-v)) for v in row]
            choice = [s + (float(bias_E[e]) if bias_E is not None else 0) for e, s in enumerate(scores)]
            allowed = set(range(E))
            if spec.num_groups > 1:
                size = E // spec.num_groups
                group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2])
                               for g in range(spec.num_groups)]
                best = sorted(range(spec.num_groups), key=lambda g: -group_score[g])[: spec.topk_groups]
                allowed = {e for g in best for e in range(g * size, (g + 1) * size)}
            chosen = sorted(allowed, key=lambda e: -choice[e])[: spec.top_k]
            w = [scores[e] for e in chosen]
            if spec.renormalize:
                w = [v / sum(w) for v in w]
        weights.append([v * spec.scaling for v in w])
        ids.append(chosen)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids)


VARIANTS = {
    "softmax_topk": dict(),
    "softmax_topk_renorm": dict(renormalize=True),
    "topk_softmax": dict(order="topk_then_score"),
    "sigmoid_topk": dict(scoring="sigmoid"),
    "sigmoid_topk_renorm_scaled": dict(scoring="sigmoid", renormalize=True, scaling=2.5),
    "sigmoid_grouped": dict(scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2),
    "softmax_grouped_scaled": dict(num_groups=2, topk_groups=1, scaling=0.5),
}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_per_token_reference(name, k, with_bias):
    E, T = 8, 13
    spec = TopKRouting(num_experts=E, top_k=k, **VARIANTS[name])
    g = torch.Generator().manual_seed(k + 10 * with_bias)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64) * 2
    bias = torch.randn(E, generator=g, dtype=torch.float64) * 0.3 if with_bias else None
    w, ids = route(logits, spec, bias)
    ref_w, ref_ids = _reference(logits, spec, bias)
    assert ids.dtype == torch.int64 and ids.shape == (T, k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-6)


def test_top1_switch_and_k_equals_e():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    w, ids = route(logits, TopKRouting(4, 1))
    assert torch.equal(ids[:, 0], logits.argmax(dim=-1))
    torch.testing.assert_close(w[:, 0], logits.softmax(dim=-1).max(dim=-1).values)
    w, ids = route(logits, TopKRouting(4, 4, renormalize=True))
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(6))
    assert torch.equal(ids.sort(dim=-1).values, torch.arange(4).expand(6, 4))


def test_selection_bias_changes_choice_not_weights():
    logits = torch.tensor([[2.0, 1.9, -1.0, -2.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    w, ids = route(logits, TopKRouting(4, 1, scoring="sigmoid"), bias)
    assert ids.item() == 2
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[-1.0]])))


def test_gradient_reaches_logits_through_weights():
    logits = torch.randn(5, 6, requires_grad=True)
    w, _ = route(logits, TopKRouting(6, 2, renormalize=True))
    w.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts=0, top_k=1), "num_experts"),
    (dict(num_experts=4, top_k=0), "top_k"),
    (dict(num_experts=4, top_k=5), "top_k"),
    (dict(num_experts=4, top_k=1, scoring="relu"), "scoring"),
    (dict(num_experts=4, top_k=1, order="random"), "order"),
    (dict(num_experts=4, top_k=1, scoring="sigmoid", order="topk_then_score"), "order"),
    (dict(num_experts=6, top_k=1, num_groups=4), "num_groups"),
    (dict(num_experts=8, top_k=1, num_groups=4, topk_groups=5), "topk_groups"),
    (dict(num_experts=8, top_k=5, num_groups=4, topk_groups=2), "top_k"),
])
def test_topk_routing_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TopKRouting(**kwargs)


def test_deprecated_names_are_aliases_of_the_renamed_classes():
    from kernel_moe.layers import ExpertsModuleSpec, ExpertsOnlySpec, LinearRouter, RouterSpec
    from kernel_moe.routing.topk import RoutingSpec

    assert RoutingSpec is TopKRouting
    assert RouterSpec is LinearRouter
    assert ExpertsOnlySpec is ExpertsModuleSpec
