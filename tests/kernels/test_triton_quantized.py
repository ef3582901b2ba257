"""Quantized expert weights (int8, fp8, int4; row or group scales) in the Triton kernels
(interpreter on CPU): the kernels dequantize in the K-loop and compute exactly what the
dequantized weights compute, forward and backward (input, routing-weight and bias gradients;
the weights are frozen), on the prefill and the decode tiles; the fp8 bit decoding."""

import math

import pytest
import torch

pytest.importorskip("triton")

from kernel_moe.kernels.contract import Activation, StackedExperts  # noqa: E402
from kernel_moe.kernels.quantization import dequantize, quantize  # noqa: E402
from kernel_moe.kernels.triton.backward import fused_experts_backward_triton  # noqa: E402
from kernel_moe.kernels.triton.forward import fused_experts_triton  # noqa: E402
from kernel_moe.reference.moe import naive_moe_experts  # noqa: E402

H, I = 64, 32
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)
FORMATS = [("int8", None), ("int8", 32), ("fp8", None), ("fp8", 32), ("int4", 32)]
IDS = [f"{f}-{g or 'row'}" for f, g in FORMATS]


def _quantized(inputs: dict, fmt: str, group: int | None, activation: Activation) -> tuple[StackedExperts, dict]:
    """(the quantized experts of ``make_moe`` inputs, the reference's inputs with the dequantized
    fp32 weights)."""
    up, down = quantize(inputs["w_up_ENH"], fmt, group), quantize(inputs["w_down_EHI"], fmt, group)
    experts = StackedExperts(up.data, down.data, inputs["b_up_EN"], inputs["b_down_EH"], activation, fmt,
                             w_up_scale=up.scale, w_down_scale=down.scale)
    deq = dict(inputs, w_up_ENH=dequantize(up.data, up.scale, fmt), w_down_EHI=dequantize(down.data, down.scale, fmt))
    return experts, deq


@pytest.mark.parametrize("fmt,group", FORMATS, ids=IDS)
@pytest.mark.parametrize("T", [1, 7, 70])
def test_forward_equals_the_dequantized_weights(kt, fmt, group, T):
    inputs = kt.make_moe(T, H, I, 6, 2, bias=True, seed=T)
    experts, deq = _quantized(inputs, fmt, group, Activation())
    out = fused_experts_triton(inputs["x_TH"], inputs["topk_weights_TK"], inputs["topk_ids_TK"], experts)
    torch.testing.assert_close(out, naive_moe_experts(**deq), **FP32_TOL)


@pytest.mark.parametrize("fmt,group", FORMATS, ids=IDS)
def test_backward_gives_input_routing_and_bias_gradients(kt, fmt, group):
    T = 19
    inputs = kt.make_moe(T, H, I, 5, 2, bias=True, seed=50)
    inputs["topk_ids_TK"][::4, 1] = -1  # dropped slots add nothing and get no gradient
    activation = Activation("gpt_oss", "interleaved", 1.702, 7.0)
    experts, deq = _quantized(inputs, fmt, group, activation)
    g = torch.randn(T, H, generator=torch.Generator().manual_seed(51))
    grads = fused_experts_backward_triton(g, inputs["x_TH"], inputs["topk_weights_TK"], inputs["topk_ids_TK"], experts)
    assert grads.w_up is None and grads.w_down is None

    leaves = {k: deq[k].clone().requires_grad_(True) for k in ("x_TH", "topk_weights_TK", "b_up_EN", "b_down_EH")}
    ref = naive_moe_experts(**dict(deq, **leaves), activation=activation)
    (ref * g).sum().backward()
    got = dict(x_TH=grads.x, topk_weights_TK=grads.topk_weights, b_up_EN=grads.b_up, b_down_EH=grads.b_down)
    for name, leaf in leaves.items():
        torch.testing.assert_close(got[name], leaf.grad, **GRAD_TOL, msg=name)


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32)], ids=["int8-row", "int4-32"])
def test_bf16_activations_and_ungated_experts(kt, fmt, group):
    inputs = kt.make_moe(33, H, I, 4, 2, glu="none", dtype=torch.bfloat16, seed=52)
    experts, deq = _quantized(inputs, fmt, group, Activation("gelu", "none"))
    out = fused_experts_triton(inputs["x_TH"], inputs["topk_weights_TK"], inputs["topk_ids_TK"], experts)
    assert out.dtype == torch.bfloat16
    ref = naive_moe_experts(**kt.as_fp32(deq), activation=Activation("gelu", "none"))
    assert kt.sqnr_db(out, ref) > 40


def test_fp8_bits_decode_to_torch_float8_values():
    """Every e4m3fn byte but NaN: the kernel's decoding equals torch's (the values quantize() can store)."""
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes.view(torch.float8_e4m3fn).float().isfinite()
    data = codes[finite].reshape(1, 1, -1)  # [E=1, N=1, K=254]
    K = data.shape[-1]
    w_down = torch.ones(1, K, 1).to(torch.float8_e4m3fn)  # [E, H, I]: every hidden output reads the one unit
    experts = StackedExperts(data.view(torch.float8_e4m3fn), w_down, activation=Activation("relu", "none"),
                             weight_format="fp8", w_up_scale=torch.ones(1, 1), w_down_scale=torch.ones(1, K))
    # x = e_k picks input feature k of w_up's one row: out[k, h] = relu(w_up[0, 0, k]) * 1
    x = torch.eye(K)
    out = fused_experts_triton(x, torch.ones(K, 1), torch.zeros(K, 1, dtype=torch.long), experts)
    want = data.view(torch.float8_e4m3fn).float().reshape(-1).clamp(min=0)
    torch.testing.assert_close(out[:, 0], want, rtol=0, atol=0)
    assert math.isclose(float(want.max()), 448.0)
