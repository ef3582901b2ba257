"""Whole models on the Triton backend: optimize(KernelConfig(backend="triton")) runs the same
Triton kernels on CPU tensors through TRITON_INTERPRET=1 (set by this folder's conftest)."""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

import kernel_moe  # noqa: E402
from kernel_moe import FusedFFN, FusedMoE, KernelConfig  # noqa: E402


def _tiny_mixtral(hidden=40, inter=24):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_mixtral_logits_and_grads_on_triton_backend():
    model = _tiny_mixtral()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    report = kernel_moe.optimize(model, KernelConfig.for_moe(backend="triton"), return_report=True)[1]
    assert report.num_swapped == 1 and isinstance(model.model.layers[0].mlp, FusedMoE)
    assert model.model.layers[0].mlp.backend == "triton"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-4, rtol=1e-4)
    model.train()
    original.train()
    model(ids).logits.square().mean().backward()
    original(ids).logits.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_dense_ffn_on_triton_backend():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 36), nn.SiLU(), nn.Linear(36, 20)).eval()
    holder = nn.Sequential(nn.LayerNorm(20), net)  # a model holding an FFN, not an FFN itself
    x = torch.randn(3, 5, 20)
    ref = holder(x)
    report = kernel_moe.optimize(holder, KernelConfig.for_ffn(backend="triton"), return_report=True)[1]
    assert report.num_swapped == 1 and isinstance(holder[1], FusedFFN)
    with torch.no_grad():
        torch.testing.assert_close(holder(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_experts_on_triton_backend_equal_the_cpu_backend(fmt):
    """quantize_experts on the Triton backend: the same quantized layer as on the CPU backend,
    the same logits (both compute the dequantized weights), and input gradients through it."""
    model = _tiny_mixtral(hidden=64, inter=32)  # dimensions that int4's groups of 32 divide
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    logits = {}
    for backend in ("cpu", "triton"):
        m = copy.deepcopy(model)
        group = 32 if fmt == "int4" else None
        cfg = KernelConfig.for_moe(backend=backend, quantize_experts=fmt, quantize_group_size=group)
        kernel_moe.optimize(m, cfg)
        layer = m.model.layers[0].mlp
        assert layer.backend == backend and layer.quantization_note
        embeds = m.model.embed_tokens(ids).detach().requires_grad_(True)
        out = m(inputs_embeds=embeds).logits
        out.square().mean().backward()
        logits[backend] = (out.detach(), embeds.grad)
    torch.testing.assert_close(logits["triton"][0], logits["cpu"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits["triton"][1], logits["cpu"][1], atol=1e-4, rtol=1e-4)
