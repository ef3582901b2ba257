"""Blocks laid out as OLMo-core lays out its dropless MoE, written here by hand (no olmo_core import,
so that CI covers the discovery path without the library): a router whose weight is stored flat
[E * H] (read as its [E, H] view), experts packed as three 2-D Parameters [E * I, H] of one module
one level down (gate, down, up: read as [E, I, H] views), a shared MLP averaged with the k routed
experts (shared / (k + 1) + routed * k / (k + 1)), and a keyword-only loss argument. Found by
structure, proven by computation (fp32 outputs 1e-5, gradients 1e-4); a router that counts its
routing in its own tensors while training keeps running the original in training; decoys that
look the same but compute something else are skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernel_moe
from helpers import GRAD_TOL, MoEHolder, assert_fp32_close, assert_one_graph
from kernel_moe import FusedMoE

H, I, E, K = 16, 24, 5, 2


class FlatRouter(nn.Module):
    """Scores [T, E] = gating(x @ W.view(E, H).T) (``as_h_e``: the decoy reading W.view(H, E)),
    top-k of the scores, no renormalisation. ``counting``: in training with gradients it adds
    the per-expert counts to a tensor held in a plain attribute (hidden from ``state_dict``)."""

    def __init__(self, gating: str, counting: bool = False, as_h_e: bool = False) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.top_k, self.gating = E, H, K, gating
        self.weight = nn.Parameter(torch.randn(E * H) / H**0.5)
        self.as_h_e = as_h_e
        self.counts = _Hidden(torch.zeros(E)) if counting else None

    def forward(self, x):
        w = self.weight.view(H, E).t() if self.as_h_e else self.weight.view(E, H)
        logits = F.linear(x.float(), w)
        scores = logits.softmax(dim=-1) if self.gating == "softmax" else torch.sigmoid(logits) + 1e-7
        weights, ids = torch.topk(scores, K, dim=-1)
        if self.counts is not None and self.training and torch.is_grad_enabled():
            self.counts.x += torch.bincount(ids.flatten(), minlength=E).float()
        return weights, ids


class _Hidden:
    """A tensor kept out of ``state_dict`` and ``named_buffers``."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x


class PackedSwiGLU(nn.Module):
    """Every expert's rows packed in one matrix each: w1 (gate), w2 (down), w3 (up), all [E*I, H].
    ``down_reinterpreted`` (decoy): w2's memory read as [E, H, I] instead of [E, I, H]."""

    def __init__(self, down_reinterpreted: bool = False) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = (nn.Parameter(torch.randn(E * I, H) / H**0.5) for _ in range(3))
        self.down_reinterpreted = down_reinterpreted

    def forward(self, x_TH, weights_TK, ids_TK):
        gate, up = self.w1.view(E, I, H), self.w3.view(E, I, H)
        down = self.w2.view(E, H, I).transpose(1, 2) if self.down_reinterpreted else self.w2.view(E, I, H)
        out = torch.zeros_like(x_TH)
        for e in range(E):
            tok, slot = torch.where(ids_TK == e)
            h = F.silu(x_TH[tok] @ gate[e].t()) * (x_TH[tok] @ up[e].t())
            out.index_add_(0, tok, (h @ down[e]) * weights_TK[tok, slot, None].to(x_TH.dtype))
        return out


class ExpertsHolder(nn.Module):
    """Holds the packed experts one level down (``experts.mlp``) and owns no parameter itself."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.mlp = PackedSwiGLU(**kwargs)

    def forward(self, x_TH, weights_TK, ids_TK):
        return self.mlp(x_TH, weights_TK, ids_TK)


class SharedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(H, 12, bias=False), nn.Linear(12, H, bias=False), nn.Linear(H, 12, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class FlatPackedMoE(nn.Module):
    """router -> packed experts (+ the shared MLP averaged in with weight ``shared_weight``, by
    default 1 / (k + 1), the routed output then weighted 1 - that)."""

    def __init__(self, gating: str = "softmax", shared: bool = False, counting: bool = False,
                 as_h_e: bool = False, down_reinterpreted: bool = False, shared_weight: float | None = None) -> None:
        super().__init__()
        self.router = FlatRouter(gating, counting, as_h_e)
        self.experts = ExpertsHolder(down_reinterpreted=down_reinterpreted)
        self.shared_mlp = SharedMLP() if shared else None
        self.shared_weight = 1 / (K + 1) if shared_weight is None else shared_weight

    def forward(self, x, *, loss_div_factor=None):
        x_TH = x.reshape(-1, H)
        weights_TK, ids_TK = self.router(x_TH)
        out = self.experts(x_TH, weights_TK, ids_TK)
        if self.shared_mlp is not None:
            out = self.shared_mlp(x_TH) * self.shared_weight + out * (1 - self.shared_weight)
        if loss_div_factor is not None:  # what a caller-given loss scale changes here: nothing it should skip
            out = out * 1.0
        return out.reshape(x.shape)


SWAPPED = {
    "softmax": dict(gating="softmax"),
    "sigmoid": dict(gating="sigmoid"),
    "softmax_shared": dict(gating="softmax", shared=True),
    "sigmoid_shared": dict(gating="sigmoid", shared=True),
}
DECOYS = {  # name: (block, what the report says)
    "router_read_as_h_e": (dict(as_h_e=True), "router FlatRouter computes a routing none of the supported"),
    "down_reinterpreted_as_e_h_i": (dict(down_reinterpreted=True), "not proven equivalent"),
    "shared_weighted_half": (dict(shared=True, shared_weight=0.5), "not proven equivalent"),
}


def _build(kwargs, seed=3):
    torch.manual_seed(seed)
    block = FlatPackedMoE(**kwargs).eval()
    return MoEHolder(block), copy.deepcopy(block)


@pytest.mark.parametrize("name", list(SWAPPED))
def test_flat_router_and_packed_experts_swap_exactly(name):
    model, original = _build(SWAPPED[name])
    keys = list(model.state_dict())
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.skipped == [] and [r.name for r in report.swapped] == ["moe"], report.skipped
    assert isinstance(model.moe, FusedMoE) and model.moe.top_k == K and model.moe.num_experts == E
    spec = model.moe.spec
    assert spec.router.flat and spec.training_fallback is None and spec.gradient_fallback is None, spec
    assert (spec.shared_expert == "shared_mlp") == ("shared" in name)
    assert list(model.state_dict()) == keys
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for x in (torch.randn(2, 7, H, generator=g), torch.randn(1, H, generator=g), torch.randn(0, H)):
            assert_fp32_close(model(x), original(x))


@pytest.mark.parametrize("name", ["softmax", "sigmoid_shared"])
def test_the_views_are_views(name):
    """The router's [E, H] and the experts' [E, I, H] / [E, H, I] are views of the Parameters the
    block owns: an update of the original Parameters is seen at once."""
    model, original = _build(SWAPPED[name])
    kernel_moe.optimize(model)
    with torch.no_grad():
        for (pname, p), q in zip(model.moe.named_parameters(), original.parameters()):
            p.mul_(0.5)
            q.mul_(0.5)
        x = torch.randn(3, 5, H, generator=torch.Generator().manual_seed(2))
        assert_fp32_close(model(x), original(x))


@pytest.mark.parametrize("name", list(SWAPPED))
def test_training_gradients_are_equal(name):
    model, original = _build(SWAPPED[name])
    kernel_moe.optimize(model)
    model.train()
    original.train()
    x = torch.randn(3, 6, H, generator=torch.Generator().manual_seed(8))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = model(x_ours), original(x_ref)
    assert_fp32_close(out, ref)
    g = torch.randn_like(x)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **GRAD_TOL)
    ours = dict(model.moe.named_parameters())
    for pname, p in original.named_parameters():
        torch.testing.assert_close(ours[pname].grad, p.grad, **GRAD_TOL, msg=pname)


def test_swapped_block_compiles_whole():
    model, original = _build(SWAPPED["sigmoid_shared"])
    kernel_moe.optimize(model)
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert_one_graph(model.moe, x)
        out = torch.compile(model.moe, fullgraph=True, backend="aot_eager")(x)
        assert_fp32_close(out, original(x))


def test_a_router_counting_its_routing_in_training_runs_the_original_in_training():
    """The counts live in a plain attribute: nothing the outputs or gradients show. Inference is
    fused; training runs the original, which keeps counting; proving it left the counts at zero."""
    model, original = _build(dict(gating="softmax", shared=True, counting=True))
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert [r.name for r in report.swapped] == ["moe"], report.skipped
    assert "router.counts.x" in model.moe.spec.training_fallback, model.moe.spec
    counts = model.moe.router.counts.x
    assert torch.count_nonzero(counts) == 0
    x = torch.randn(2, 4, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_fp32_close(model(x), original(x))
    assert torch.count_nonzero(counts) == 0
    model.train()
    original.train()
    assert_fp32_close(model(x), original(x))
    torch.testing.assert_close(counts, original.router.counts.x)
    assert counts.sum() == 2 * 4 * K


def test_a_call_giving_the_keyword_argument_runs_the_original():
    model, original = _build(SWAPPED["softmax_shared"])
    kernel_moe.optimize(model)
    assert model.moe.spec.passthrough == ("loss_div_factor",)
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_fp32_close(model.moe(x, loss_div_factor=2.0), original(x, loss_div_factor=2.0))
        with pytest.raises(TypeError):
            model.moe(x, other=1)


@pytest.mark.parametrize("name", list(DECOYS))
def test_decoy_is_skipped(name):
    kwargs, reason = DECOYS[name]
    model, _ = _build(kwargs)
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.swapped == [], [r.details for r in report.swapped]
    assert [r.name for r in report.skipped] == ["moe"], report.skipped
    assert reason in report.skipped[0].reason, report.skipped[0].reason
    assert not isinstance(model.moe, FusedMoE)


def test_a_shared_mlp_is_never_taken_for_the_router():
    """Packed experts with no router beside them but a shared MLP whose first Linear has a row count
    dividing theirs: reported with the true blocker, the shared MLP named as such."""
    model, _ = _build(SWAPPED["softmax_shared"])
    model.moe.router = None
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.swapped == [] and [r.name for r in report.skipped] == ["moe"], report
    reason = report.skipped[0].reason
    assert "the only weight that could route them, shared_mlp.w1, belongs to a dense FFN" in reason, reason
