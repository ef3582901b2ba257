"""The plan's (004) API as written, and 003's random routing and collapse monitoring.

004's snippets run here with only the import names changed (``kernel_pytorch`` -> ``kernel_moe``,
``KernelPyTorchConfig`` -> ``KernelConfig``)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernel_moe
from helpers import assert_fp32_close
from kernel_moe import FusedFFN, FusedMoE, KernelConfig, UnifiedManager
from kernel_moe.moe import AuxLossFreeMoE, OptimizedTopKGating
from kernel_moe.routing.random_routing import random_routing
from kernel_moe.routing.topk import TopKRouting, route
from kernel_moe.training import RoutingMonitor, randomly_routed, update_expert_biases

H, I, E, K = 32, 48, 8, 2


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False), nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(H, I), nn.GELU(), nn.Linear(I, H)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _loop(gating, experts, x):
    """The definition: gating, then each routed expert on its tokens, weighted."""
    ids, weights = gating(x)
    x_TH, ids, weights = x.reshape(-1, H), ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, ids.shape[-1])
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for j in range(ids.shape[1]):
            if ids[t, j] >= 0:
                out[t] += weights[t, j] * experts[int(ids[t, j])](x_TH[t])
    return out.reshape(x.shape)


def test_004_gating_snippet_runs_as_written():
    torch.manual_seed(0)
    hidden_states = torch.randn(2, 5, H)
    gating = OptimizedTopKGating(
        num_experts=8,
        top_k=2,
        capacity_factor=1.25,  # Extra capacity for load balancing
        jitter_noise=0.1,       # Noise for exploration during training
    )
    expert_indices, expert_weights = gating(hidden_states)
    assert expert_indices.shape == (2, 5, 2) and expert_weights.shape == (2, 5, 2)
    assert expert_indices.dtype == torch.int64
    kept = expert_indices >= 0
    assert kept.any() and torch.equal(expert_weights[~kept], torch.zeros_like(expert_weights[~kept]))
    counts = torch.bincount(expert_indices[kept].flatten(), minlength=8)
    assert int(counts.max()) <= 4  # ceil(1.25 * 10 * 2 / 8) = 4 slots per expert


def test_gating_without_capacity_is_softmax_top_k_renormalized():
    gating = OptimizedTopKGating(num_experts=E, top_k=K, hidden_size=H).eval()
    x = torch.randn(7, H)
    ids, weights = gating(x)
    probs = torch.softmax(gating.router(x).float(), dim=-1)
    want_w, want_ids = probs.topk(K, dim=-1)
    assert torch.equal(ids, want_ids)
    assert_fp32_close(weights, want_w / want_w.sum(-1, keepdim=True))


@pytest.mark.parametrize("bad,match", [
    (dict(num_experts=0), "num_experts=0"), (dict(top_k=9), "top_k=9"), (dict(capacity_factor=0), "capacity_factor"),
    (dict(jitter_noise=1.5), "jitter_noise=1.5"), (dict(scoring="tanh"), "scoring='tanh'"),
])
def test_gating_rejects_bad_arguments_naming_them(bad, match):
    with pytest.raises(ValueError, match=match):
        OptimizedTopKGating(**{"num_experts": E, "top_k": K, **bad})


@pytest.mark.parametrize("expert_cls", [SwiGLU, GeluMLP])
@pytest.mark.parametrize("load_balancing", ["dynamic", "auxiliary_loss", "none"])
def test_004_aux_loss_free_moe_equals_its_definition_and_trains(expert_cls, load_balancing):
    torch.manual_seed(1)
    experts = nn.ModuleList(expert_cls() for _ in range(E))
    gating = OptimizedTopKGating(num_experts=E, top_k=K)
    moe_layer = AuxLossFreeMoE(
        experts=experts,
        gating=gating,
        load_balancing=load_balancing,  # vs "auxiliary_loss", "none"
    )
    assert isinstance(moe_layer, FusedMoE)
    x = torch.randn(3, 6, H)
    with torch.no_grad():
        assert_fp32_close(moe_layer.eval()(x), _loop(gating, experts, x))
    reference = copy.deepcopy(moe_layer)
    moe_layer.train()
    out = moe_layer(x)
    (out.square().mean() + kernel_moe.training.aux_loss(moe_layer)).backward()
    assert all(p.grad is not None for p in moe_layer.parameters())
    assert moe_layer.gating.router.weight.grad.abs().sum() > 0
    if load_balancing == "dynamic":
        assert update_expert_biases(moe_layer) == 1
        assert moe_layer.expert_bias.abs().sum() > 0  # the bias moved against the load
    if load_balancing == "auxiliary_loss":
        assert moe_layer.aux_loss is not None and moe_layer.aux_loss > 0
    ref_out = reference.train()(x)
    ref_out.square().mean().backward()


def test_aux_loss_free_moe_compiles_whole():
    torch.manual_seed(2)
    layer = AuxLossFreeMoE(experts=[SwiGLU() for _ in range(E)], gating=OptimizedTopKGating(E, K)).eval()
    x = torch.randn(9, H)
    with torch.no_grad():
        ref = layer(x)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0
    with torch.no_grad():
        assert_fp32_close(torch.compile(layer, fullgraph=True)(x), ref)
    torch._dynamo.reset()


def test_aux_loss_free_moe_rejects_mismatches():
    with pytest.raises(ValueError, match="has 3 experts but the gating routes to num_experts=8"):
        AuxLossFreeMoE(experts=[SwiGLU() for _ in range(3)], gating=OptimizedTopKGating(E, K))
    with pytest.raises(ValueError, match="holds no nn.Linear"):
        AuxLossFreeMoE(experts=[nn.ReLU() for _ in range(E)], gating=OptimizedTopKGating(E, K))
    with pytest.raises(ValueError, match="gating=Linear"):
        AuxLossFreeMoE(experts=[SwiGLU() for _ in range(E)], gating=nn.Linear(H, E))  # type: ignore[arg-type]


def test_004_config_snippet_accepts_its_arguments():
    config = KernelConfig.for_moe(
        num_experts=8,
        top_k=2,
        capacity_factor=1.25,
        load_balancing="dynamic",
    )
    assert (config.num_experts, config.top_k, config.capacity_factor, config.load_balancing) == (8, 2, 1.25,
                                                                                                "dynamic")


def test_004_manager_snippet_returns_the_optimized_model():
    from helpers import TopKMoE

    moe_model = TopKMoE(hidden=H, inter=I, num_experts=E, top_k=K).eval()
    manager = UnifiedManager(KernelConfig.for_moe(num_experts=8, top_k=2))
    optimized_moe_model = manager.optimize(moe_model)
    assert isinstance(optimized_moe_model, FusedMoE) and manager.report.num_swapped == 1
    x = torch.randn(4, H)
    with torch.no_grad():
        assert_fp32_close(optimized_moe_model(x), moe_model(x))


def test_a_swapped_root_is_counted_once_and_nothing_inside_it_is_visited():
    net = nn.Sequential(nn.Linear(H, I), nn.SiLU(), nn.Linear(I, H)).eval()
    wrapper = nn.Sequential(net)  # computes what net computes, so the root itself is the dense FFN
    manager = UnifiedManager(KernelConfig.for_ffn())
    out = manager.optimize(wrapper)
    assert [r.name for r in manager.report.swapped] == ["<root>"]
    assert wrapper[0] is net and isinstance(out, FusedFFN)
    x = torch.randn(3, H)
    with torch.no_grad():
        assert_fp32_close(out(x), net(x))


# --- random routing (003) -------------------------------------------------------------------


@pytest.mark.parametrize("spec", [TopKRouting(E, K, renormalize=True), TopKRouting(E, K, "sigmoid"),
                                  TopKRouting(E, K, order="topk_then_score")], ids=["softmax-renorm", "sigmoid",
                                                                                    "topk-then-softmax"])
def test_random_routing_sends_the_last_slot_to_an_unchosen_expert(spec):
    torch.manual_seed(3)
    logits = torch.randn(400, E, requires_grad=True)
    weights, ids = route(logits, spec)
    new_w, new_ids, count = random_routing(logits, weights, ids, spec, 0.3)
    changed = new_ids[:, -1] != ids[:, -1]
    assert int(count) == int(changed.sum()) and 60 < int(count) < 180  # about 30% of 400
    assert torch.equal(new_ids[:, :-1], ids[:, :-1])
    assert (new_ids[changed, -1:] != ids[changed, :-1]).all()  # never an expert the token already has
    assert torch.equal(new_w[~changed], weights[~changed])
    _, want = route(logits.detach(), spec)
    assert torch.equal(want, ids)
    from kernel_moe.routing.topk import routing_weights

    assert_fp32_close(new_w[changed], routing_weights(logits, new_ids, spec)[changed])
    new_w.sum().backward()
    assert logits.grad.abs().sum() > 0
    torch.manual_seed(5)
    a = random_routing(logits, weights, ids, spec, 0.3)[1]
    torch.manual_seed(5)
    assert torch.equal(a, random_routing(logits, weights, ids, spec, 0.3)[1])  # seeded by torch.manual_seed


def test_random_routing_in_the_layer_trains_only_and_is_counted():
    from helpers import TwoBlockModel

    torch.manual_seed(4)
    model = TwoBlockModel(hidden=H, inter=I, num_experts=E, top_k=K)
    reference = copy.deepcopy(model).eval()
    kernel_moe.optimize(model, KernelConfig.for_moe(random_routing=0.5))
    x = torch.randn(64, H)
    with torch.no_grad():
        assert_fp32_close(model.eval()(x), reference(x))  # inference: the proven routing, untouched
        model.train()
        out = model(x)
    assert randomly_routed(model) > 20  # two layers, 64 tokens each, p = 0.5
    assert not torch.allclose(out, reference(x), atol=1e-3)
    with pytest.raises(ValueError, match="random_routing=1.0"):
        KernelConfig.for_moe(random_routing=1.0)


# --- routing health -------------------------------------------------------------------------


def test_routing_monitor_reports_and_warns_on_collapse(caplog):
    from helpers import TwoBlockModel

    torch.manual_seed(6)
    model = TwoBlockModel(hidden=H, inter=I, num_experts=E, top_k=K)
    kernel_moe.optimize(model)
    monitor = RoutingMonitor(model, window=3, collapse_share=0.6, dead_after=2)
    with torch.no_grad():
        model(torch.randn(32, H))
    health = monitor.step()
    assert [h.layer for h in health] == ["blocks.0", "blocks.1"]
    assert all(sum(h.tokens_per_expert) == 64 and not h.collapsed for h in health)  # real forwards counted
    block = model.blocks[0]
    collapsed = torch.tensor([50, 14, 0, 0, 0, 0, 0, 0])
    with caplog.at_level(logging.WARNING, logger="kernel_moe"):
        for _ in range(3):  # three steps in which block 0 routes only to experts 0 and 1
            block.routing_counts.copy_(collapsed)
            model.blocks[1].routing_counts.fill_(8)
            health = monitor.step()
    first = health[0]
    assert first.steps == 3 and first.collapsed and first.largest_expert == 0
    assert first.dead_experts == tuple(range(2, E)) and first.largest_share == pytest.approx(150 / 192)
    assert first.tokens_per_expert == (150, 42, 0, 0, 0, 0, 0, 0)  # the window: the last three steps
    assert not health[1].collapsed and health[1].dead_experts == ()
    warnings = [r for r in caplog.records if "collapsing" in r.getMessage()]
    assert len(warnings) == 1 and "blocks.0" in warnings[0].getMessage()  # warned once per episode
    block.routing_counts.fill_(8)
    for _ in range(3):
        block.routing_counts.fill_(8)
        health = monitor.step()
    assert not health[0].collapsed  # recovered


def test_routing_monitor_rejects_bad_settings():
    with pytest.raises(ValueError, match="window=0"):
        RoutingMonitor(nn.Linear(2, 2), window=0)
    with pytest.raises(ValueError, match="collapse_share=1.5"):
        RoutingMonitor(nn.Linear(2, 2), collapse_share=1.5)
