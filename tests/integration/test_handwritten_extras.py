"""Hand-written MoE blocks that return a tuple: the output, then what they compute from their
routing (an auxiliary loss, per-expert counts, the router logits, a z-loss), in any number and
order. Each extra is identified by computation (never by name) and reproduced by the fused layer:
fp32 outputs within 1e-5, gradients within 1e-4, one graph under torch.compile(fullgraph=True).
Decoys (an aux loss with the wrong P, with f squared, a loss of the expert outputs, a tuple
holding a dict) are skipped with the output that could not be matched.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernel_moe
from helpers import GRAD_TOL, MoEHolder, SwiGLUExpert, assert_fp32_close, assert_one_graph
from kernel_moe import FusedMoE

H, I, E, K = 16, 24, 6, 2


def switch_aux(probs_TE, ids_TK, coef, f_top1=False, square_f=False, per_tokens=False):
    """coef * E * sum_i f_i * P_i, f the slot (or top-1) fractions, P the mean probability."""
    chosen = ids_TK[:, :1] if f_top1 else ids_TK
    counts_E = F.one_hot(chosen, probs_TE.shape[1]).sum(dim=(0, 1)).float()
    f_E = counts_E / (chosen.shape[0] if per_tokens else chosen.numel())
    if square_f:
        f_E = f_E * f_E
    return coef * probs_TE.shape[1] * (f_E * probs_TE.mean(dim=0)).sum()


class TupleMoE(nn.Module):
    """softmax -> top-k -> renorm -> per-expert loop; returns (out, *what ``returns`` names)."""

    def __init__(self, returns, coef=0.01, z_coef=1e-3, renorm=True) -> None:
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(H, I) for _ in range(E))
        self.num_experts_per_tok = K
        self.returns, self.coef, self.z_coef, self.renorm = returns, coef, z_coef, renorm

    def extra(self, name, logits_TE, probs_TE, weights_TK, ids_TK):
        if name == "aux":
            return switch_aux(probs_TE, ids_TK, self.coef)
        if name == "aux_top1_per_tokens":
            return switch_aux(probs_TE, ids_TK, self.coef, f_top1=True, per_tokens=True)
        if name == "aux_plus_z":
            z = torch.logsumexp(logits_TE, dim=-1).square().mean()
            return switch_aux(probs_TE, ids_TK, self.coef) + self.z_coef * z
        if name == "z":
            return self.z_coef * torch.logsumexp(logits_TE, dim=-1).square().mean()
        if name == "counts":
            return torch.bincount(ids_TK.flatten(), minlength=E)
        if name == "float_counts":
            return F.one_hot(ids_TK, E).sum(dim=(0, 1)).float()
        if name == "logits":
            return logits_TE
        if name == "ids":
            return ids_TK
        if name == "decoy_wrong_p":  # P from the top-k weights only, not from every probability
            dense_TE = torch.zeros_like(probs_TE).scatter(1, ids_TK, weights_TK)
            return self.coef * E * (F.one_hot(ids_TK, E).sum(dim=(0, 1)).float() / ids_TK.numel()
                                    * dense_TE.mean(dim=0)).sum()
        if name == "decoy_square_f":
            return switch_aux(probs_TE, ids_TK, self.coef, square_f=True)
        if name == "decoy_detached_p":  # the same value, but no gradient reaches the router through it
            return switch_aux(probs_TE.detach(), ids_TK, self.coef)
        if name == "decoy_stats_dict":
            return {"counts": torch.bincount(ids_TK.flatten(), minlength=E)}
        raise ValueError(name)

    def forward(self, x):
        x_TH = x.reshape(-1, x.shape[-1])
        logits_TE = self.router(x_TH)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, ids_TK = probs_TE.topk(K, dim=-1)
        if self.renorm:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids_TK == e)
            if tok.numel():
                out_TH.index_add_(0, tok, expert(x_TH[tok]) * weights_TK[tok, slot, None])
        if self.returns == ("decoy_expert_norm",):  # a scalar of the expert outputs, not of the routing
            return out_TH.reshape(x.shape), out_TH.square().mean()
        extras = [self.extra(n, logits_TE, probs_TE, weights_TK, ids_TK) for n in self.returns]
        return (out_TH.reshape(x.shape), *extras)


SWAPPED = {
    "aux": (("aux",), ["loss 0.01*balance"]),
    "counts": (("counts",), ["counts"]),
    "logits_then_aux": (("logits", "aux"), ["logits", "loss 0.01*balance"]),
    "aux_plus_z": (("aux_plus_z",), ["loss 0.01*balance+0.001*z"]),
    "top1_fractions_per_token": (("aux_top1_per_tokens",), ["loss 0.01*balance(top1)"]),
    "float_counts_z_ids": (("float_counts", "z", "ids"), ["counts", "loss 0.001*z", "ids"]),
}
DECOYS = {
    "decoy_wrong_p": ("output 1 (shape [], float32)", "matches none"),
    "decoy_square_f": ("output 1 (shape [], float32)", "matches none"),
    "decoy_expert_norm": ("output 1 (shape [], float32)", "matches none"),
    "decoy_stats_dict": ("output 1 is dict",),
}


def _build(returns, seed=3):
    torch.manual_seed(seed)
    block = TupleMoE(returns).eval()
    return MoEHolder(block), copy.deepcopy(block)


def _inputs():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(2, 5, H, generator=g), torch.randn(9, H, generator=g), torch.randn(1, 33, H, generator=g)]


def _assert_same(out, ref, **tol):
    assert isinstance(out, tuple) and len(out) == len(ref)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        if b.is_floating_point():
            assert_fp32_close(a, b, **tol)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(SWAPPED))
def test_tuple_block_is_swapped_with_its_extras_equal_in_eval(name):
    returns, described = SWAPPED[name]
    model, original = _build(returns)
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.skipped == [] and len(report.swapped) == 1, report.skipped
    assert isinstance(model.moe, FusedMoE)
    assert [e.describe() for e in model.moe.spec.extras] == described
    assert model.moe.spec.gradient_fallback is None and model.moe.spec.training_fallback is None
    assert "returns (output, " in report.swapped[0].details
    with torch.no_grad():
        for x in _inputs():
            _assert_same(model.moe(x), original(x))


@pytest.mark.parametrize("name", list(SWAPPED))
def test_tuple_block_trains_with_equal_gradients(name):
    model, original = _build(SWAPPED[name][0])
    kernel_moe.optimize(model)
    model.train()
    original.train()
    x = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(11))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = model.moe(x_ours), original(x_ref)
    _assert_same(out, ref)
    g = torch.Generator().manual_seed(12)
    weights = [torch.randn(t.shape, generator=g) for t in ref if t.is_floating_point()]
    sum(((a * w).sum() for a, w in zip([t for t in out if t.is_floating_point()], weights))).backward()
    sum(((b * w).sum() for b, w in zip([t for t in ref if t.is_floating_point()], weights))).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **GRAD_TOL)
    ours = dict(model.moe.named_parameters())
    for pname, p in original.named_parameters():
        if p.grad is None:
            assert ours[pname].grad is None or torch.count_nonzero(ours[pname].grad) == 0, pname
            continue
        torch.testing.assert_close(ours[pname].grad, p.grad, **GRAD_TOL, msg=pname)


@pytest.mark.parametrize("name", ["aux", "logits_then_aux", "float_counts_z_ids"])
def test_tuple_block_compiles_whole(name):
    model, original = _build(SWAPPED[name][0])
    kernel_moe.optimize(model)
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        assert_one_graph(model.moe, x)
        out = torch.compile(model.moe, fullgraph=True, backend="aot_eager")(x)
        _assert_same(out, original(x))


def test_coefficient_is_read_off_the_probe_not_assumed():
    model, original = _build(("aux_plus_z",))
    model.moe.coef, model.moe.z_coef = 0.037, 2.5e-4
    original.coef, original.z_coef = 0.037, 2.5e-4
    kernel_moe.optimize(model)
    (loss,) = model.moe.spec.extras
    assert loss.balance == pytest.approx(0.037, rel=1e-5) and loss.z == pytest.approx(2.5e-4, rel=1e-4)
    x = torch.randn(4, 6, H)
    with torch.no_grad():
        _assert_same(model.moe(x), original(x))


@pytest.mark.parametrize("name", list(DECOYS))
def test_decoy_extra_is_skipped_saying_which_output(name):
    model, _ = _build((name,))
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.swapped == [] and len(report.skipped) == 1
    for needle in DECOYS[name]:
        assert needle in report.skipped[0].reason, report.skipped[0].reason
    assert not isinstance(model.moe, FusedMoE)


def test_detached_probability_in_the_aux_loss_trains_the_original():
    """Same values as a Switch aux loss, but P is detached: only the gradient proof sees it."""
    model, original = _build(("decoy_detached_p",))
    rec = kernel_moe.optimize(model, return_report=True)[1].swapped[0]
    assert "calls that need gradients run the original" in rec.details, rec.details
    x = torch.randn(2, 5, H)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = model.moe(x_ours), original(x_ref)
    _assert_same(out, ref)
    assert not out[1].requires_grad  # the original ran: its loss carries no gradient
    g = torch.randn_like(x)
    (out[0] * g).sum().backward()
    (ref[0] * g).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **GRAD_TOL)
    torch.testing.assert_close(model.moe.router.weight.grad, original.router.weight.grad, **GRAD_TOL)
