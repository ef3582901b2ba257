"""The proof by computation covers gradients: blocks whose forward values are ordinary sparse
top-k but whose backward differs (a custom autograd Function, a detached router, a stop-gradient
on the routing weights) must train exactly as the original does.

Each decoy is swapped (its forward is proven), but calls that autograd records run the original
module, with the reason in the report; inference still runs the fused path.
"""

from __future__ import annotations

import copy

import pytest
import torch

import kernel_moe
from kernel_moe import FusedMoE
from tests.helpers import TopKMoE, assert_fp32_close

H, I, E, K = 16, 24, 4, 2


class DenseStraightThrough(torch.autograd.Function):
    """Forward: the sparse top-k weights. Backward: the gradient of every expert's probability,
    as if the top-k mask were not there (a dense straight-through estimator for the router)."""

    @staticmethod
    def forward(ctx, probs_TE, ids_TK):
        ctx.save_for_backward(ids_TK)
        ctx.num_experts = probs_TE.shape[1]
        return probs_TE.gather(1, ids_TK)

    @staticmethod
    def backward(ctx, grad_TK):
        (ids_TK,) = ctx.saved_tensors
        dense_TE = grad_TK.mean(dim=-1, keepdim=True).expand(-1, ctx.num_experts).clone()
        return dense_TE.scatter_(1, ids_TK, grad_TK), None


class StraightThroughMoE(TopKMoE):
    def forward(self, x):
        x_TH = x.reshape(-1, x.shape[-1])
        probs_TE = torch.softmax(self.gate(x_TH), dim=-1)
        ids_TK = probs_TE.topk(self.top_k, dim=-1).indices
        weights_TK = DenseStraightThrough.apply(probs_TE, ids_TK)
        return self._combine(x_TH, weights_TK, ids_TK).reshape(x.shape)

    def _combine(self, x_TH, weights_TK, ids_TK):
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids_TK == e)
            if tok.numel():
                out_TH.index_add_(0, tok, expert(x_TH[tok]) * weights_TK[tok, slot, None])
        return out_TH


class DetachedRouterMoE(StraightThroughMoE):
    """The router sees a detached copy of the tokens: no gradient reaches x through it."""

    def forward(self, x):
        x_TH = x.reshape(-1, x.shape[-1])
        probs_TE = torch.softmax(self.gate(x_TH.detach()), dim=-1)
        weights_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
        return self._combine(x_TH, weights_TK, ids_TK).reshape(x.shape)


class StopGradWeightsMoE(StraightThroughMoE):
    """The routing weights are detached: the router gets no gradient at all."""

    def forward(self, x):
        x_TH = x.reshape(-1, x.shape[-1])
        probs_TE = torch.softmax(self.gate(x_TH), dim=-1)
        weights_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
        return self._combine(x_TH, weights_TK.detach(), ids_TK).reshape(x.shape)


class PlainMoE(StraightThroughMoE):
    def forward(self, x):
        x_TH = x.reshape(-1, x.shape[-1])
        probs_TE = torch.softmax(self.gate(x_TH), dim=-1)
        weights_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
        return self._combine(x_TH, weights_TK, ids_TK).reshape(x.shape)


class Wrapper(torch.nn.Module):
    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(H, H)
        self.moe = block

    def forward(self, x):
        return self.moe(self.proj(x))


DECOYS = {"straight_through": StraightThroughMoE, "detached_router": DetachedRouterMoE,
          "stop_grad_weights": StopGradWeightsMoE}


def _build(cls):
    torch.manual_seed(3)
    model = Wrapper(cls(H, I, E, K, renormalize=False))
    return model, copy.deepcopy(model)


def _grads(model, x, g):
    model.zero_grad(set_to_none=True)
    (model(x) * g).sum().backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(DECOYS))
def test_custom_backward_trains_through_the_original(name):
    model, original = _build(DECOYS[name])
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert [r.name for r in report.swapped] == ["moe"]
    layer = model.moe
    assert isinstance(layer, FusedMoE)
    assert layer.spec.gradient_fallback is not None and "gradient" in layer.spec.gradient_fallback
    assert "calls that need gradients run the original" in report.swapped[0].details
    x, g = torch.randn(5, 3, H), torch.randn(5, 3, H)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(original, mode)()
        ours, ref = _grads(model, x, g), _grads(original, x, g)
        assert ours.keys() == ref.keys()
        for key in ref:
            assert_fp32_close(ours[key], ref[key])


def test_the_straight_through_decoy_really_differs_from_the_sparse_gradient():
    """Without the gradient proof the fused backward would be used: it gives other gradients."""
    model, original = _build(StraightThroughMoE)
    layer = kernel_moe.UnifiedManager(kernel_moe.KernelConfig.for_moe()).convert(original.moe)
    layer.spec = type(layer.spec)(**{**layer.spec.__dict__, "gradient_fallback": None})
    model.moe = layer
    x, g = torch.randn(6, H), torch.randn(6, H)
    ours, ref = _grads(model, x, g), _grads(original, x, g)
    diff = (ours["moe.gate.weight"] - ref["moe.gate.weight"]).abs().max()
    assert diff > 1e-3 * ref["moe.gate.weight"].abs().max()


@pytest.mark.parametrize("name", sorted(DECOYS))
def test_inference_still_runs_the_fused_path(name, monkeypatch):
    model, original = _build(DECOYS[name])
    kernel_moe.optimize(model)
    calls = []
    forward = DECOYS[name].forward
    monkeypatch.setattr(DECOYS[name], "forward", lambda self, x: calls.append(1) or forward(self, x))
    x = torch.randn(4, H)
    with torch.no_grad():
        out = model(x)
    assert calls == []
    with torch.no_grad():
        assert_fp32_close(out, original(x))
    calls.clear()
    for p in model.parameters():
        p.requires_grad_(False)
    model(x)  # grad mode on, but nothing requires grad: nothing for autograd to record
    assert calls == []


def test_plain_block_keeps_the_fused_backward():
    model, original = _build(PlainMoE)
    kernel_moe.optimize(model)
    assert model.moe.spec.gradient_fallback is None and model.moe.spec.training_fallback is None
    model.train()
    original.train()
    x, g = torch.randn(7, H), torch.randn(7, H)
    ours, ref = _grads(model, x, g), _grads(original, x, g)
    for key in ref:
        assert_fp32_close(ours[key], ref[key])


def test_frozen_block_is_checked_on_input_gradients():
    """Parameters frozen (adapters trained elsewhere): the input gradient still decides."""
    model, original = _build(DetachedRouterMoE)
    for m in (model, original):
        for p in m.moe.parameters():
            p.requires_grad_(False)
    kernel_moe.optimize(model)
    assert "input 0" in model.moe.spec.gradient_fallback
    x, g = torch.randn(5, H), torch.randn(5, H)
    ours, ref = _grads(model, x, g), _grads(original, x, g)
    for key in ref:
        assert_fp32_close(ours[key], ref[key])
