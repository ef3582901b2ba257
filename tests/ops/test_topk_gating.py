"""kernel_moe::topk_gating on the PyTorch backend: values equal route(), gradients equal
autograd through route() for every variant it supports, opcheck passes."""

import pytest
import torch

from kernel_moe.ops import topk_gating  # noqa: F401  (registers the op)
from kernel_moe.routing.topk import RoutingSpec, route

VARIANTS = [
    ("softmax", "score_then_topk", False, 1.0),
    ("softmax", "score_then_topk", True, 1.0),
    ("softmax", "topk_then_score", False, 1.0),
    ("sigmoid", "score_then_topk", False, 2.5),
    ("sigmoid", "score_then_topk", True, 2.5),
]


@pytest.mark.parametrize("scoring, order, renorm, scaling", VARIANTS)
@pytest.mark.parametrize("k", [1, 3])
def test_values_and_gradients_match_route(scoring, order, renorm, scaling, k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(11, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w, ids = torch.ops.kernel_moe.topk_gating(logits, k, scoring, order, renorm, scaling, "torch")
    ref_w, ref_ids = route(logits, RoutingSpec(7, k, scoring, order, renorm, scaling, score_dtype="input"))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w.float(), atol=1e-6, rtol=1e-6)
    upstream = torch.randn(11, k, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((w.double() * upstream).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref_w * upstream).sum(), logits)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_opcheck():
    logits = torch.randn(9, 6, requires_grad=True)
    result = torch.library.opcheck(torch.ops.kernel_moe.topk_gating.default,
                                   (logits, 2, "softmax", "score_then_topk", True, 1.0, "cpu"))
    assert result and all(v == "SUCCESS" for v in result.values()), result


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="top_k"):
        torch.ops.kernel_moe.topk_gating(torch.randn(3, 4), 5, "softmax", "score_then_topk", False, 1.0, "cpu")
