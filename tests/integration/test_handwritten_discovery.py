"""Hand-written MoE blocks whose parts sit where the simple layout does not put them: a router
that is a raw Parameter of the block ([E, H] read as F.linear(x, W), [H, E] read as x @ W),
a router Linear inside a sibling gating module, experts nested two levels down or held in a
ModuleDict. Each is found by structure and proven by computation (fp32 outputs 1e-5, gradients
1e-4, one graph under torch.compile); decoys that look the same but compute something else
(a raw router plus another term, a temperature, experts used in another order) are skipped.
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

H, I, E, K = 16, 24, 5, 2


class Gating(nn.Module):
    """A gating module beside the experts: a Linear router (or a raw [H, E] weight) and k."""

    def __init__(self, raw: bool = False) -> None:
        super().__init__()
        self.top_k = K
        if raw:
            self.weight = nn.Parameter(torch.randn(H, E) / H**0.5)
        else:
            self.proj = nn.Linear(H, E)

    def forward(self, x_TH):
        return x_TH @ self.weight if hasattr(self, "weight") else self.proj(x_TH)


class Inner(nn.Module):
    """Holds the experts one level down (``block.moe.experts``), as a list or a dict."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        experts = [SwiGLUExpert(H, I) for _ in range(E)]
        self.experts = nn.ModuleDict({f"expert_{e}": m for e, m in enumerate(experts)}) if as_dict else (
            nn.ModuleList(experts))


class DiscoveryMoE(nn.Module):
    """softmax -> top-k -> renorm over experts found by ``layout``; the router given by ``router``."""

    def __init__(self, router: str, layout: str = "list", order_shift: int = 0) -> None:
        super().__init__()
        if router == "raw_eh":
            self.w_gate = nn.Parameter(torch.randn(E, H) / H**0.5)
        elif router in ("raw_he", "decoy_raw_plus", "decoy_temperature"):
            self.router_weight = nn.Parameter(torch.randn(H, E) / H**0.5)
        elif router in ("gating", "gating_raw"):
            self.gating = Gating(raw=router == "gating_raw")
        else:
            raise ValueError(router)
        self.router_kind = router
        if layout == "nested":
            self.moe = Inner()
        elif layout == "nested_dict":
            self.moe = Inner(as_dict=True)
        elif layout == "dict":
            self.experts = nn.ModuleDict({str(e): SwiGLUExpert(H, I) for e in range(E)})
        else:
            self.experts = nn.ModuleList(SwiGLUExpert(H, I) for _ in range(E))
        self.layout = layout
        self.order_shift = order_shift
        if router != "gating":
            self.k = K

    def logits(self, x_TH):
        kind = self.router_kind
        if kind == "raw_eh":
            return F.linear(x_TH, self.w_gate)
        if kind == "raw_he":
            return x_TH @ self.router_weight
        if kind == "decoy_raw_plus":  # x @ W plus a term of the input: not a linear router
            return x_TH @ self.router_weight + torch.tanh(x_TH[:, :E])
        if kind == "decoy_temperature":
            return (x_TH @ self.router_weight) / 0.7
        return self.gating(x_TH)

    def expert(self, e: int) -> nn.Module:
        e = (e + self.order_shift) % E
        if self.layout in ("nested", "nested_dict"):
            experts = self.moe.experts
        else:
            experts = self.experts
        if isinstance(experts, nn.ModuleDict):
            return list(experts.values())[e]
        return experts[e]

    def forward(self, x):
        x_TH = x.reshape(-1, x.shape[-1])
        probs_TE = torch.softmax(self.logits(x_TH), dim=-1)
        weights_TK, ids_TK = probs_TE.topk(K, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        out_TH = torch.zeros_like(x_TH)
        for e in range(E):
            tok, slot = torch.where(ids_TK == e)
            if tok.numel():
                out_TH.index_add_(0, tok, self.expert(e)(x_TH[tok]) * weights_TK[tok, slot, None])
        return out_TH.reshape(x.shape)


SWAPPED = {
    "raw_parameter_e_h": dict(router="raw_eh"),
    "raw_parameter_h_e": dict(router="raw_he"),
    "sibling_gating_linear": dict(router="gating"),
    "sibling_gating_raw_parameter_nested_dict": dict(router="gating_raw", layout="nested_dict"),
    "nested_experts_two_levels_down": dict(router="raw_eh", layout="nested"),
    "module_dict_experts": dict(router="gating", layout="dict"),
}
DECOYS = {
    "raw_parameter_plus_another_term": dict(router="decoy_raw_plus"),
    "raw_parameter_with_a_temperature": dict(router="decoy_temperature"),
    "dict_experts_used_in_another_order": dict(router="gating", layout="dict", order_shift=1),
    "nested_experts_used_in_another_order": dict(router="raw_eh", layout="nested", order_shift=2),
}


def _build(kwargs, seed=4):
    torch.manual_seed(seed)
    block = DiscoveryMoE(**kwargs).eval()
    return MoEHolder(block), copy.deepcopy(block)


@pytest.mark.parametrize("name", list(SWAPPED))
def test_block_is_found_swapped_and_equal(name):
    model, original = _build(SWAPPED[name])
    keys = list(model.state_dict())
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.skipped == [] and [r.name for r in report.swapped] == ["moe"], report.skipped
    assert isinstance(model.moe, FusedMoE) and model.moe.top_k == K and model.moe.num_experts == E
    assert model.moe.spec.gradient_fallback is None and model.moe.spec.training_fallback is None
    assert list(model.state_dict()) == keys
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for x in (torch.randn(2, 7, H, generator=g), torch.randn(1, H, generator=g), torch.randn(0, H)):
            assert_fp32_close(model(x), original(x))


@pytest.mark.parametrize("name", list(SWAPPED))
def test_block_trains_with_equal_gradients(name):
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
        if p.grad is None:
            assert ours[pname].grad is None or torch.count_nonzero(ours[pname].grad) == 0, pname
            continue
        torch.testing.assert_close(ours[pname].grad, p.grad, **GRAD_TOL, msg=pname)


@pytest.mark.parametrize("name", ["raw_parameter_h_e", "sibling_gating_raw_parameter_nested_dict"])
def test_block_compiles_whole(name):
    model, original = _build(SWAPPED[name])
    kernel_moe.optimize(model)
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert_one_graph(model.moe, x)
        out = torch.compile(model.moe, fullgraph=True, backend="aot_eager")(x)
        assert_fp32_close(out, original(x))


@pytest.mark.parametrize("name", list(DECOYS))
def test_decoy_is_skipped(name):
    model, _ = _build(DECOYS[name])
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.swapped == [], [r.details for r in report.swapped]
    # a nested experts holder is then visited on its own: it holds no router, and says so
    assert [r.name for r in report.skipped] in (["moe"], ["moe", "moe.moe"])
    assert "not proven equivalent" in report.skipped[0].reason, report.skipped[0].reason
    assert not isinstance(model.moe, FusedMoE)


def test_a_wrapper_of_a_whole_block_is_not_taken_for_the_block():
    """The router and the nested experts in the same child: that child is the block."""
    torch.manual_seed(5)
    model = MoEHolder(MoEHolder(DiscoveryMoE(router="raw_he"))).eval()
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert [r.name for r in report.swapped] == ["moe.moe"] and report.skipped == []


def test_a_block_declaring_an_expert_capacity_is_not_proposed():
    """A capacity drops tokens only on inputs longer than the probe: such a block is skipped."""
    model, _ = _build(dict(router="gating", layout="dict"))
    model.moe.gating.expert_capacity = 4
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.swapped == [] and [r.name for r in report.skipped] == ["moe"]
    assert "gating.expert_capacity=4" in report.skipped[0].reason, report.skipped[0].reason
