"""KernelConfig routing features on a swapped layer, checked against plain references:
capacity factor (drop order, zero contribution, count), expert choice, router jitter,
auxiliary / z losses, dynamic bias, and compiled training with each of them."""

import math

import pytest
import torch
from torch import nn

import kernel_moe
from kernel_moe import KernelConfig, training
from kernel_moe.demo import PlainMixtralBlock
from kernel_moe.reference.moe import naive_moe_experts
from kernel_moe.routing.losses import load_balancing_loss, router_z_loss

H, I, E, K = 24, 40, 6, 2


def _model(config: KernelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(PlainMixtralBlock(H, I, E, K))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    report = kernel_moe.optimize(model, config, return_report=True)[1]
    assert report.num_swapped == 1, report
    return model, model[0]


def _stacked(layer):
    ex = layer.spec.experts
    return ex.up.get(layer).detach(), ex.down.get(layer).detach()


def _routing(layer, x_TH):
    probs = torch.softmax(layer.router_logits(x_TH).float(), dim=-1)
    w, ids = probs.topk(K, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids, probs


@pytest.mark.parametrize("priority", ["score", "position"])
def test_capacity_drops_in_documented_order_and_counts(priority):
    cf = 0.5
    model, layer = _model(KernelConfig.for_moe(capacity_factor=cf, capacity_priority=priority))
    x = torch.randn(1, 30, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        w, ids, _ = _routing(layer, x[0])
    T = 30
    capacity = math.ceil(cf * T * K / E)
    kept = torch.zeros_like(w, dtype=torch.bool)
    for e in range(E):
        slots = [(t, j) for t in range(T) for j in range(K) if ids[t, j] == e]
        if priority == "score":
            slots.sort(key=lambda s: -float(w[s]))
        for t, j in slots[:capacity]:
            kept[t, j] = True
    w_ref = torch.where(kept, w, torch.zeros_like(w))
    up, down = _stacked(layer)
    ref = naive_moe_experts(x[0], w_ref, ids, up, down)
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)
    assert training.dropped_tokens(model) == int((~kept).sum()) > 0


def test_large_capacity_drops_nothing_and_equals_dropless():
    model, _ = _model(KernelConfig.for_moe(capacity_factor=float(E)))
    dropless, _ = _model(KernelConfig.for_moe())
    x = torch.randn(2, 9, H)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dropless(x), atol=1e-6, rtol=1e-6)
    assert training.dropped_tokens(model) == 0


def test_expert_choice_matches_loop_reference():
    model, layer = _model(KernelConfig.for_moe(routing="expert_choice", capacity_factor=1.0))
    x = torch.randn(1, 12, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x)[0]
        _, _, probs = _routing(layer, x[0])
    capacity = math.ceil(1.0 * 12 * K / E)
    up, down = _stacked(layer)
    ref = torch.zeros(12, H)
    for e in range(E):
        order = sorted(range(12), key=lambda t: (-float(probs[t, e]), t))[:capacity]
        for t in order:
            y = naive_moe_experts(x[0, t:t + 1], probs[t:t + 1, e:e + 1], torch.tensor([[e]]), up, down)
            ref[t] += y[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_router_jitter_only_in_training_and_reproducible_under_seed():
    model, _ = _model(KernelConfig.for_moe(router_jitter=0.2))
    plain, _ = _model(KernelConfig.for_moe())
    x = torch.randn(1, 16, H)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))
        model.train()
        torch.manual_seed(5)
        a = model(x)
        torch.manual_seed(5)
        b = model(x)
        torch.manual_seed(6)
        c = model(x)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_auxiliary_and_z_loss_values_and_gradients():
    model, layer = _model(KernelConfig.for_moe(load_balancing="auxiliary_loss", aux_loss_weight=0.1,
                                               z_loss_weight=0.01))
    model.train()
    x = torch.randn(1, 20, H)
    model(x)
    logits = layer.router_logits(x[0])
    _, ids, probs = _routing(layer, x[0])
    expected = 0.1 * load_balancing_loss(probs, ids, E) + 0.01 * router_z_loss(logits)
    torch.testing.assert_close(training.aux_loss(model), expected)
    training.aux_loss(model).backward()
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
    model.eval()
    layer.aux_loss = None
    model(x)
    assert layer.aux_loss is None  # losses are a training-mode quantity


def test_dynamic_bias_moves_toward_balance():
    model, layer = _model(KernelConfig.for_moe(load_balancing="dynamic", bias_update_rate=0.05))
    assert "expert_bias" in dict(layer.named_buffers()) and layer.expert_bias.abs().sum() == 0
    model.train()
    x = torch.randn(1, 64, H)
    with torch.no_grad():
        model(x)
    counts = layer.load_counts.clone()
    assert int(counts.sum()) == 64 * K
    assert training.update_expert_biases(model) == 1
    mean = counts.float().mean()
    expected = 0.05 * torch.sign(mean - counts.float())
    torch.testing.assert_close(layer.expert_bias, expected)
    assert int(layer.load_counts.sum()) == 0


@pytest.mark.parametrize("config", [
    KernelConfig.for_moe(capacity_factor=1.0),
    KernelConfig.for_moe(routing="expert_choice"),
    KernelConfig.for_moe(load_balancing="auxiliary_loss"),
    KernelConfig.for_moe(load_balancing="dynamic"),
], ids=["capacity", "expert_choice", "aux_loss", "dynamic"])
def test_compiled_training_step_has_no_graph_break(config):
    from torch._dynamo.testing import CompileCounter

    model, _ = _model(config)
    model.train()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(1, 10, H)
    loss = compiled(x).square().mean() + training.aux_loss(model)
    loss.backward()
    assert counter.frame_count == 1
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
