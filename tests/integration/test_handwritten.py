"""A zoo of hand-written MoE blocks, each swapped by optimize() and equal to the original.

The zoo varies what tutorials and research code vary: the router's attribute name and where
it lives (a Linear, a gating submodule, a noisy top-k router), the experts' attribute name
and wiring (fc1/fc2 with an activation module, w1/w2/w3 SwiGLU, gate/up/down, up/down with
a functional GELU, biases, dropout), the routing (softmax->top-k with or without renorm,
top-k->softmax, sigmoid, top-1 Switch, k == E, E == 1), the way the experts are combined
(per-expert loop, masked loop, dense) and what the block returns.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernel_moe
from helpers import GRAD_TOL, MoEHolder, assert_fp32_close
from kernel_moe import FusedMoE

H, I = 16, 24


# --- experts ---------------------------------------------------------------------------------


class FcAct(nn.Module):
    """fc1 -> activation module -> (dropout) -> fc2."""

    def __init__(self, act: nn.Module, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(H, I, bias=bias)
        self.act = act
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc2 = nn.Linear(I, H, bias=bias)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class DownFirst(nn.Module):
    """Two Linear layers registered down-projection first, tanh-GELU module."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Linear(I, H, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.up = nn.Linear(H, I, bias=False)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class W123(nn.Module):
    """Mixtral naming: w2(silu(w1 x) * w3 x), F.silu in forward."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(H, I, bias=bias)
        self.w2 = nn.Linear(I, H, bias=bias)
        self.w3 = nn.Linear(H, I, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GateUpDown(nn.Module):
    """Llama/Qwen naming: down_proj(act(gate_proj x) * up_proj x) with a functional activation."""

    def __init__(self, act=F.silu) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.fn = act

    def forward(self, x):
        return self.down_proj(self.fn(self.gate_proj(x)) * self.up_proj(x))


class UpDownGelu(nn.Module):
    """Two Linear layers and F.gelu in forward (no activation module to read)."""

    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class UnnamedGLU(nn.Module):
    """Three Linear layers with neutral names; the gate is the second one registered."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(H, I, bias=False)
        self.b = nn.Linear(H, I, bias=False)
        self.c = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.c(F.silu(self.b(x)) * self.a(x))


# --- routers ---------------------------------------------------------------------------------


class Gating(nn.Module):
    """A gating submodule holding the router Linear (with bias)."""

    def __init__(self, E: int) -> None:
        super().__init__()
        self.proj = nn.Linear(H, E)

    def forward(self, x):
        return self.proj(x)


class NoisyRouter(nn.Module):
    """Noisy top-k gating: learned noise scale from w_noise, only in training."""

    def __init__(self, E: int) -> None:
        super().__init__()
        self.w_noise = nn.Linear(H, E, bias=False)
        self.w_gate = nn.Linear(H, E, bias=False)

    def forward(self, x):
        logits = self.w_gate(x)
        if self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.w_noise(x))
        return logits


def route(logits_TE: torch.Tensor, k: int, scoring: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing variants of the zoo: (weights [T, k], ids [T, k])."""
    if scoring.startswith("softmax_topk"):
        weights, ids = torch.softmax(logits_TE.float(), dim=-1).topk(k, dim=-1)
    elif scoring.startswith("sigmoid_topk"):
        weights, ids = torch.sigmoid(logits_TE.float()).topk(k, dim=-1)
    elif scoring == "topk_softmax":
        top, ids = logits_TE.topk(k, dim=-1)
        weights = torch.softmax(top.float(), dim=-1)
    else:
        raise ValueError(scoring)
    if scoring.endswith("_renorm"):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


# --- the configurable block ---------------------------------------------------------------------


class ZooMoE(nn.Module):
    def __init__(self, E, k, expert, router="gate", experts_attr="experts", scoring="softmax_topk_renorm",
                 style="loop", k_attr="top_k", router_bias=False, returns_logits=False, flat_only=False):
        super().__init__()
        self.router_kind = router
        if router == "gating_module":
            self.gating = Gating(E)
        elif router == "noisy":
            self.noisy = NoisyRouter(E)
        else:
            setattr(self, router, nn.Linear(H, E, bias=router_bias))
        self.experts_attr = experts_attr
        setattr(self, experts_attr, nn.ModuleList(expert() for _ in range(E)))
        if k_attr:
            setattr(self, k_attr, k)
        self.selected = k
        self.scoring = scoring
        self.style = style
        self.returns_logits = returns_logits
        self.flat_only = flat_only

    def logits(self, x_TH):
        if self.router_kind == "gating_module":
            return self.gating(x_TH)
        if self.router_kind == "noisy":
            return self.noisy(x_TH)
        return getattr(self, self.router_kind)(x_TH)

    def forward(self, x):
        if self.flat_only and x.dim() != 2:
            raise ValueError("this block takes [tokens, hidden] inputs only")
        shape = x.shape
        x_TH = x.reshape(-1, shape[-1])
        logits_TE = self.logits(x_TH)
        weights_TK, ids_TK = route(logits_TE, self.selected, self.scoring)
        weights_TK = weights_TK.to(x.dtype)
        experts = getattr(self, self.experts_attr)
        out_TH = torch.zeros_like(x_TH)
        if self.style == "loop":
            for e, expert in enumerate(experts):
                tok, slot = torch.where(ids_TK == e)
                if tok.numel():
                    out_TH.index_add_(0, tok, expert(x_TH[tok]) * weights_TK[tok, slot, None])
        elif self.style == "masked":
            for e, expert in enumerate(experts):
                hit_TK = ids_TK == e
                sel_T = hit_TK.any(dim=-1)
                if sel_T.any():
                    w_M = (weights_TK * hit_TK).sum(dim=-1)[sel_T]
                    out_TH[sel_T] += w_M[:, None] * expert(x_TH[sel_T])
        elif self.style == "dense":
            dense_TE = torch.zeros(x_TH.shape[0], len(experts), dtype=x.dtype).scatter(1, ids_TK, weights_TK)
            for e, expert in enumerate(experts):
                out_TH = out_TH + dense_TE[:, e : e + 1] * expert(x_TH)
        else:
            raise ValueError(self.style)
        out = out_TH.reshape(shape)
        return (out, logits_TE) if self.returns_logits else out


@dataclass(frozen=True)
class Variant:
    E: int
    k: int
    expert: object
    kwargs: dict = field(default_factory=dict)
    expect: tuple[str, ...] = ()  # substrings of the report's details
    stochastic_training: bool = False


ZOO = {
    "gate_fc_relu_module": Variant(4, 2, lambda: FcAct(nn.ReLU()), {}, ("relu", "softmax>top2>renorm")),
    "router_expert_list_w123": Variant(
        6, 2, W123, dict(router="router", experts_attr="expert_list", scoring="softmax_topk",
                         k_attr="num_experts_per_tok"), ("silu-glu(concat)", "softmax>top2")),
    "gating_submodule_ffns_gate_up_down": Variant(
        5, 2, GateUpDown, dict(router="gating_module", experts_attr="ffns", scoring="topk_softmax", k_attr="k"),
        ("silu-glu",)),
    "gating_linear_fc_silu_sigmoid_dense": Variant(
        4, 2, lambda: FcAct(nn.SiLU()), dict(router="gating", scoring="sigmoid_topk", style="dense"),
        ("sigmoid>top2", "silu")),
    "noisy_topk_router_up_down_gelu": Variant(
        8, 2, UpDownGelu, dict(router="noisy", scoring="topk_softmax"), ("gelu",), stochastic_training=True),
    "fc_gelu_biases_masked": Variant(
        4, 2, lambda: FcAct(nn.GELU(), bias=True), dict(router_bias=True, style="masked"), ("gelu", "+bias")),
    "w123_biases_sigmoid_renorm": Variant(
        4, 2, lambda: W123(bias=True), dict(scoring="sigmoid_topk_renorm"), ("sigmoid>top2>renorm", "+bias")),
    "switch_top1": Variant(8, 1, lambda: FcAct(nn.ReLU()), dict(scoring="softmax_topk"), ("top1",)),
    "k_equals_e": Variant(4, 4, W123, dict(scoring="softmax_topk"), ("top4",)),
    "single_expert": Variant(1, 1, lambda: FcAct(nn.SiLU()), {}, ("1x[16->24]",)),
    "dropout_in_experts": Variant(
        4, 2, lambda: FcAct(nn.GELU(), dropout=0.2), {}, ("gelu",), stochastic_training=True),
    "top_k_not_an_attribute": Variant(6, 3, W123, dict(k_attr=None), ("top3",)),
    "returns_router_logits": Variant(4, 2, W123, dict(returns_logits=True), ("top2",)),
    "down_registered_first_gelu_tanh": Variant(4, 2, DownFirst, {}, ("gelu_tanh",)),
    "unnamed_glu_gate_second": Variant(4, 2, UnnamedGLU, {}, ("silu-glu",)),
    "geglu_functional": Variant(4, 2, lambda: GateUpDown(F.gelu), dict(style="masked"), ("gelu-glu",)),
    "flat_inputs_only": Variant(4, 2, W123, dict(flat_only=True), ("top2",)),
    "sequential_experts_with_biases": Variant(
        5, 2, lambda: nn.Sequential(nn.Linear(H, I), nn.GELU(), nn.Dropout(0.0), nn.Linear(I, H)), {},
        ("gelu", "+bias")),
}


def _build(name: str) -> tuple[MoEHolder, nn.Module, Variant]:
    v = ZOO[name]
    torch.manual_seed(sum(map(ord, name)))
    block = ZooMoE(v.E, v.k, v.expert, **v.kwargs).eval()
    model = MoEHolder(block)
    original = copy.deepcopy(block)
    return model, original, v


def _inputs(v: Variant) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    flat = [torch.randn(9, H, generator=g), torch.randn(1, H, generator=g), torch.randn(0, H, generator=g)]
    if v.kwargs.get("flat_only"):
        return flat
    return flat + [torch.randn(2, 5, H, generator=g)]


def _assert_same_output(out, ref) -> None:
    if isinstance(ref, tuple):
        assert isinstance(out, tuple) and len(out) == len(ref)
        for a, b in zip(out, ref):
            assert_fp32_close(a, b)
    else:
        assert_fp32_close(out, ref)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_block_is_swapped_and_equal_in_eval(name):
    model, original, v = _build(name)
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.skipped == [], report.skipped
    assert len(report.swapped) == 1
    rec = report.swapped[0]
    assert (rec.name, rec.original_class, rec.num_experts, rec.top_k) == ("moe", "ZooMoE", v.E, v.k)
    for needle in v.expect:
        assert needle in rec.details, (needle, rec.details)
    assert isinstance(model.moe, FusedMoE)
    with torch.no_grad():
        for x in _inputs(v):
            _assert_same_output(model.moe(x), original(x))


@pytest.mark.parametrize("name", [n for n, v in ZOO.items() if v.stochastic_training])
def test_stochastic_training_falls_back_to_the_original(name):
    model, original, v = _build(name)
    rec = kernel_moe.optimize(model, return_report=True)[1].swapped[0]
    assert "training runs the original" in rec.details and "stochastic" in rec.details
    assert model.moe.spec.training_fallback is not None
    model.train()
    original.train()
    x = torch.randn(3, 4, H)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        out = model(x)
        torch.manual_seed(11)
        ref = original(x)
    assert_fp32_close(out, ref)
    model.eval()
    with torch.no_grad():
        assert_fp32_close(model(x), original.eval()(x))


@pytest.mark.parametrize("name", [n for n, v in ZOO.items() if not v.stochastic_training and v.E > 1])
def test_deterministic_block_trains_through_the_fused_path_with_equal_gradients(name):
    model, original, v = _build(name)
    kernel_moe.optimize(model)
    assert model.moe.spec.training_fallback is None
    model.train()
    original.train()
    x = torch.randn(2, 6, H) if not v.kwargs.get("flat_only") else torch.randn(12, H)
    g = torch.randn_like(x)
    out, ref = model(x), original(x)
    out = out[0] if isinstance(out, tuple) else out
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert_fp32_close(out, ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    ours = dict(model.moe.named_parameters())
    for pname, p in original.named_parameters():
        if p.grad is None:  # an expert that got no token: no gradient, or a zero one
            assert ours[pname].grad is None or torch.count_nonzero(ours[pname].grad) == 0, pname
            continue
        assert ours[pname].grad is not None, pname
        torch.testing.assert_close(ours[pname].grad, p.grad, **GRAD_TOL, msg=pname)


def test_zoo_blocks_inside_one_model_are_all_swapped():
    names = ["gate_fc_relu_module", "router_expert_list_w123", "noisy_topk_router_up_down_gelu"]
    blocks = [_build(n)[0].moe for n in names]
    model = nn.Sequential(*blocks).eval()
    original = copy.deepcopy(model)
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert [r.name for r in report.swapped] == ["0", "1", "2"]
    x = torch.randn(3, 7, H)
    with torch.no_grad():
        assert_fp32_close(model(x), original(x))
