"""FusedMoE against the module it replaces: shapes, token counts, expert counts, top-k,
non-contiguous and NaN inputs, bf16, routing counts, and training (gradients and optimizer
steps through per-expert Parameters re-pointed into stacked storage)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import (
    GRAD_TOL,
    TopKMoE,
    assert_bf16_matches_fp32_reference,
    assert_fp32_close,
    param_ids,
)
from kernel_moe import FusedMoE, KernelConfig, UnifiedManager

H = 16


def _block(E: int = 4, k: int = 2, seed: int = 0, bias: bool = False, inter: int = 24) -> TopKMoE:
    torch.manual_seed(seed)
    return TopKMoE(hidden=H, inter=inter, num_experts=E, top_k=k, bias=bias).eval()


def _convert(block: nn.Module, **cfg) -> FusedMoE:
    layer = UnifiedManager(KernelConfig.for_moe(**cfg)).convert(block)
    assert isinstance(layer, FusedMoE)
    return layer


def _x(*shape: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_layer_adopts_children_parameters_and_state():
    block = _block()
    layer = _convert(block)
    assert layer.original is block
    for name, child in block.named_children():
        assert getattr(layer, name) is child
    assert param_ids(layer) == param_ids(block)
    assert list(layer.state_dict().keys()) == list(block.state_dict().keys())
    assert "routing_counts" not in layer.state_dict()
    assert (layer.num_experts, layer.top_k, layer.hidden_size) == (4, 2, H)
    assert "backend=auto" in repr(layer) and "top2" in repr(layer)


@pytest.mark.parametrize("shape", [(0, H), (1, 0, H), (1, H), (7, H), (2, 3, H), (2, 2, 3, H)])
def test_input_shapes(shape):
    block = _block()
    layer = _convert(block)
    x = _x(*shape)
    with torch.no_grad():
        out = layer(x)
        ref = block(x)
    assert out.shape == x.shape
    assert_fp32_close(out, ref)


@pytest.mark.parametrize(
    "E,k",
    [(1, 1), (3, 1), (3, 2), (3, 3), (8, 1), (8, 2), (8, 8), (16, 1), (16, 2), (16, 16)],
)
def test_token_counts_experts_and_top_k(E, k):
    """T in {0, 1, 7, 128, 1000}: with T=1 and E=16 most experts receive no token."""
    block = _block(E, k, seed=E * 10 + k, inter=8)
    layer = _convert(block)
    assert (layer.num_experts, layer.top_k) == (E, k)
    with torch.no_grad():
        for T in (0, 1, 7, 128, 1000):
            x = _x(T, H, seed=T)
            assert_fp32_close(layer(x), block(x))


@pytest.mark.parametrize("view", ["transposed", "strided", "sliced_hidden", "expanded"])
def test_non_contiguous_input(view):
    block = _block()
    layer = _convert(block)
    if view == "transposed":
        x = _x(5, 3, H).transpose(0, 1)
    elif view == "strided":
        x = _x(2, 12, H)[:, ::3]
    elif view == "sliced_hidden":
        x = _x(2, 6, 2 * H)[..., 3 : 3 + H]
    else:
        x = _x(1, 1, H).expand(2, 4, H)
    assert not x.is_contiguous()
    with torch.no_grad():
        assert_fp32_close(layer(x), block(x))


def test_nan_in_input_propagates_to_its_token_only():
    block = _block()
    layer = _convert(block)
    x = _x(9, H)
    x[4, 3] = float("nan")
    with torch.no_grad():
        out = layer(x)
        ref = block(x)
    assert torch.isnan(ref[4]).all()
    assert torch.isnan(out[4]).all()
    keep = torch.arange(9) != 4
    assert_fp32_close(out[keep], ref[keep])


@pytest.mark.parametrize("k", [1, 2])
def test_all_tokens_to_one_expert_and_routing_counts(k):
    E, T = 4, 40
    block = _block(E, k)
    layer = _convert(block)
    # Positive tokens and a gate whose row 0 is +1 and the others about -1: expert 0 wins
    # for every token. The gate Parameter is shared, so the layer sees the change at once.
    with torch.no_grad():
        block.gate.weight.copy_(-1.0 + 0.1 * torch.randn(E, H))
        block.gate.weight[0] = 1.0
    x = _x(T, H).abs() + 0.5
    layer.track_routing()
    with torch.no_grad():
        assert_fp32_close(layer(x), block(x))
    counts = layer.routing_counts.clone()
    assert counts[0] == T and counts.sum() == T * k
    layer.reset_routing_counts()
    assert layer.routing_counts.sum() == 0


def test_routing_counts_match_the_original_routing():
    E, k, T = 8, 2, 64
    block = _block(E, k)
    layer = _convert(block)
    x = _x(T, H)
    layer.track_routing()
    with torch.no_grad():
        layer(x)
        layer(x[:10])
        ids = torch.softmax(block.gate(torch.cat([x, x[:10]])).float(), dim=-1).topk(k, dim=-1).indices
    assert torch.equal(layer.routing_counts, torch.bincount(ids.reshape(-1), minlength=E))
    layer.track_routing(False)
    with torch.no_grad():
        layer(x)
    assert layer.routing_counts.sum() == (T + 10) * k


def test_bf16_layer_matches_fp32_reference():
    block = _block(8, 2)
    reference = copy.deepcopy(block).to(torch.bfloat16).float()  # bf16-rounded weights in fp32
    layer = _convert(block).to(torch.bfloat16)
    x = _x(3, 40, H).bfloat16()
    assert_bf16_matches_fp32_reference(layer, reference, x)


def test_inference_mode_and_grad_enabled_eval_agree():
    block = _block()
    layer = _convert(block)
    x = _x(2, 5, H)
    with torch.inference_mode():
        a = layer(x)
    b = layer(x)  # grad enabled: the differentiable weight path
    assert b.requires_grad
    assert_fp32_close(a, b.detach())


# --- training -------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Linear(H, H)
        self.moe = block

    def forward(self, x):
        return self.moe(torch.tanh(self.pre(x)))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bias", [False, True])
def test_training_gradients_equal_the_original(bias):
    torch.manual_seed(3)
    net = _Net(TopKMoE(H, 24, 4, 2, bias=bias)).train()
    ref = copy.deepcopy(net)
    manager = UnifiedManager()
    manager.optimize(net)
    report = manager.report
    assert report.num_swapped == 1
    assert net.moe.spec.training_fallback is None  # the fused path runs in training
    x = _x(3, 11, H)
    g = _x(3, 11, H, seed=9)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    (net(xa) * g).sum().backward()
    (ref(xb) * g).sum().backward()
    ga, gb = _grads(net), _grads(ref)
    assert set(ga) == {n for n, _ in ref.named_parameters()}
    assert set(ga) == set(gb)
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], **GRAD_TOL, msg=name)
    torch.testing.assert_close(xa.grad, xb.grad, **GRAD_TOL)


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw_foreach"])
def test_optimizer_steps_update_the_stacked_weights(optimizer):
    torch.manual_seed(4)
    net = _Net(TopKMoE(H, 24, 4, 2)).train()
    ref = copy.deepcopy(net)
    UnifiedManager().optimize(net)

    def make(params):
        if optimizer == "sgd_momentum":
            return torch.optim.SGD(params, lr=0.5, momentum=0.9)
        return torch.optim.AdamW(params, lr=0.05, foreach=True)

    opt, opt_ref = make(net.parameters()), make(ref.parameters())
    for step in range(3):
        x = _x(4, 6, H, seed=step)
        for model, o in ((net, opt), (ref, opt_ref)):
            o.zero_grad()
            model(x).pow(2).mean().backward()
            o.step()
    for (na, pa), (nb, pb) in zip(net.named_parameters(), ref.named_parameters()):
        assert na == nb
        torch.testing.assert_close(pa, pb, **GRAD_TOL, msg=na)
    net.eval()
    ref.eval()
    x = _x(2, 9, H, seed=11)
    with torch.no_grad():
        assert_fp32_close(net(x), ref(x), atol=1e-4, rtol=1e-4)


def test_replacing_one_expert_parameter_after_optimize_is_seen():
    """Weights are looked up by attribute path: a Parameter swapped in for one expert counts."""
    block = _block()
    layer = _convert(block)
    x = _x(20, H)
    with torch.no_grad():
        layer(x)
        block.experts[2].w2.weight = nn.Parameter(torch.randn_like(block.experts[2].w2.weight))
        assert_fp32_close(layer(x), block(x))


def test_load_state_dict_after_optimize_is_seen_without_grad():
    block = _block(seed=1)
    other = _block(seed=2)
    layer = _convert(block)
    x = _x(12, H)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        assert_fp32_close(layer(x), other(x))


def test_frozen_experts_still_pass_input_gradients():
    torch.manual_seed(6)
    net = _Net(TopKMoE(H, 24, 4, 2)).train()
    ref = copy.deepcopy(net)
    UnifiedManager().optimize(net)
    for model in (net, ref):
        for p in model.moe.parameters():
            p.requires_grad_(False)
    x = _x(2, 7, H)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    net(xa).pow(2).sum().backward()
    ref(xb).pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **GRAD_TOL)
    torch.testing.assert_close(net.pre.weight.grad, ref.pre.weight.grad, **GRAD_TOL)
    assert all(p.grad is None for p in net.moe.parameters())


def test_deepcopy_of_an_optimized_model_is_independent():
    block = _block()
    layer = _convert(block)
    twin = copy.deepcopy(layer)
    x = _x(10, H)
    with torch.no_grad():
        ref = block(x)
        assert_fp32_close(twin(x), ref)
        for p in twin.parameters():
            p.add_(1.0)
        assert_fp32_close(layer(x), ref)
        assert_fp32_close(twin(x), twin.original(x))
        assert not torch.allclose(twin(x), ref)


def test_deepcopy_and_pickle_after_a_training_forward_with_aux_loss():
    """The aux loss of the last training forward holds an autograd graph; copying or pickling the
    layer (MoEBenchmark deep-copies the model it measures) must not try to copy it."""
    import pickle

    layer = _convert(_block(), load_balancing="auxiliary_loss").train()
    layer(_x(10, H)).sum().backward()
    assert layer.aux_loss is not None and layer.aux_loss.grad_fn is not None
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin.aux_loss is None
        assert layer.aux_loss is not None  # the original keeps its loss
        with torch.no_grad():
            assert_fp32_close(twin.eval()(_x(6, H)), layer.eval()(_x(6, H)))
        layer.train()
