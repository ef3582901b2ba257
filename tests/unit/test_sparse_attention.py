"""SparseExpertAttention equals the naive loop over experts and heads (kernel_moe.reference.attention):
outputs (fp32 1e-5) and gradients of the input and every parameter (1e-4), for T in {1, 7, 128}, causal
or not, with and without a padding mask, both variants; plus its options and errors."""

from __future__ import annotations

import pytest
import torch

from kernel_moe import KernelConfig, SparseExpertAttention
from kernel_moe.reference.attention import naive_moa, naive_switchhead

D, E, H, K = 32, 5, 2, 2


def _params(layer: SparseExpertAttention) -> dict:
    if layer.variant == "moa":
        return {"router": layer.router.weight, "w_q": layer.w_q, "w_o": layer.w_o, "w_kv": layer.kv_proj.weight,
                "bias": layer.bias}
    return {"w_q": layer.q_proj.weight, "w_k": layer.k_proj.weight, "source": layer.source_router.weight,
            "destination": layer.destination_router.weight, "w_v": layer.w_v, "w_o": layer.w_o, "bias": layer.bias}


def _reference(layer: SparseExpertAttention, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    fn = naive_moa if layer.variant == "moa" else naive_switchhead
    return fn(x, _params(layer), layer.top_k, layer.num_heads, layer.causal, keep)


def _layer(variant: str, causal: bool, seed: int = 0, **options) -> SparseExpertAttention:
    torch.manual_seed(seed)
    layer = SparseExpertAttention(D, E, H, top_k=K, variant=variant, causal=causal, **options)
    if layer.bias is not None:
        torch.nn.init.normal_(layer.bias)  # a non-zero bias, so that its gradient is checked too
    return layer


def _padding(B: int, T: int) -> torch.Tensor:
    keep = torch.ones(B, T, dtype=torch.long)
    keep[0, : T // 2] = 0  # left padding in the first sequence
    if T > 2:
        keep[1, -2:] = 0  # right padding in the second
    return keep


@pytest.mark.parametrize("variant", ["moa", "switchhead"])
@pytest.mark.parametrize("T", [1, 7, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_outputs_and_gradients_equal_the_reference(variant, T, causal, padded):
    layer = _layer(variant, causal)
    B = 2
    x = torch.randn(B, T, D, requires_grad=True)
    keep = _padding(B, T) if padded else None
    ours = layer(x, keep)
    ref = _reference(layer, x, keep)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    params = [p for p in layer.parameters()]
    cot = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, [x, *params], cot)
    g_ref = torch.autograd.grad(ref, [x, *params], cot, allow_unused=True)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, g_ours, g_ref):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"gradient of {n}: {m}")


@pytest.mark.parametrize("variant", ["moa", "switchhead"])
def test_rotary_position_embeddings_equal_the_reference(variant):
    layer = _layer(variant, True)
    B, T = 2, 7
    x = torch.randn(B, T, D)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * torch.rand(layer.head_dim // 2)
    emb = torch.cat((angles, angles), dim=-1).expand(B, T, layer.head_dim)
    cos, sin = emb.cos(), emb.sin()
    params = {**_params(layer), "cos": cos, "sin": sin}
    fn = naive_moa if variant == "moa" else naive_switchhead
    torch.testing.assert_close(layer(x, None, (cos, sin)), fn(x, params, K, H, True), atol=1e-5, rtol=1e-5)


def test_capacity_drops_slots_over_it_and_a_large_one_drops_none():
    x = torch.randn(2, 7, D)
    dropless = _layer("moa", True)
    roomy = _layer("moa", True, expert_capacity=14)
    torch.testing.assert_close(roomy(x), dropless(x), atol=1e-5, rtol=1e-5)
    assert int(roomy.dropped_tokens) == 0
    tight = _layer("moa", True, expert_capacity=1)
    out = tight(x)
    ids = torch.softmax(tight.router(x.reshape(14, D)), -1).topk(K).indices
    assert int(tight.dropped_tokens) == 14 * K - len(set(ids.reshape(-1).tolist()))
    assert torch.isfinite(out).all()
    cfg = KernelConfig.for_moe(capacity_factor=0.5)
    by_factor = _layer("switchhead", True, config=cfg)
    by_factor(x)
    assert int(by_factor.dropped_tokens) > 0


@pytest.mark.parametrize("variant", ["moa", "switchhead"])
def test_auxiliary_loss_reaches_the_routers(variant):
    layer = _layer(variant, True, config=KernelConfig.for_moe(load_balancing="auxiliary_loss", z_loss_weight=1e-3))
    layer.train()
    out = layer(torch.randn(2, 7, D))
    from kernel_moe import training

    loss = training.aux_loss(torch.nn.Sequential(layer))
    assert loss.ndim == 0 and loss.item() > 0
    (out.sum() + loss).backward()
    routers = [layer.router] if variant == "moa" else [layer.source_router, layer.destination_router]
    assert all(r.weight.grad.abs().sum() > 0 for r in routers)
    layer.eval()
    layer(torch.randn(2, 7, D))
    assert layer.aux_loss is None


def test_dynamic_balancing_moves_the_expert_bias():
    from kernel_moe import training

    layer = _layer("moa", True, config=KernelConfig.for_moe(load_balancing="dynamic"))
    layer.train()
    layer(torch.randn(2, 7, D))
    assert int(layer.load_counts.sum()) == 14 * K
    assert training.update_expert_biases(torch.nn.Sequential(layer)) == 1
    assert layer.expert_bias.abs().sum() > 0
    assert "expert_bias" in layer.state_dict()


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    layer = _layer("moa", True)
    x, target = torch.randn(4, 9, D), torch.randn(4, 9, D)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="mixture"), "variant"),
    (dict(top_k=E + 1), "top_k"),
    (dict(expert_capacity=0), "expert_capacity"),
    (dict(head_size=8), "options"),
    (dict(variant="switchhead", config=KernelConfig.for_moe(load_balancing="dynamic")), "dynamic"),
    (dict(config=KernelConfig.for_moe(routing="expert_choice")), "routing"),
])
def test_misuse_raises_naming_the_field(kwargs, match):
    args = dict(top_k=K)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SparseExpertAttention(D, E, H, **args)


def test_input_errors_name_the_input():
    layer = _layer("moa", True)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(7, D))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(2, 7, D), torch.ones(2, 6))


@pytest.mark.parametrize("variant", ["moa", "switchhead"])
def test_empty_sequence_and_bf16(variant):
    layer = _layer(variant, True)
    x = torch.randn(2, 0, D, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 0, D)
    out.sum().backward()
    x = torch.randn(2, 7, D)
    ref = _reference(layer, x, None)
    low = layer.to(torch.bfloat16)
    out = low(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
