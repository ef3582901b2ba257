"""Quantized expert weights (int8, fp8, int4) through kernel_moe::fused_experts: the op computes
exactly what the dequantized weights compute (the quantization error is the format's, not the
kernel's), on every CPU path, forward and backward (input and routing-weight gradients; the
weights are frozen); the formats' sizes and accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import as_fp32, assert_fp32_close, assert_low_precision_close, op_inputs, run_op, run_reference, sqnr_db
from kernel_moe import UnsupportedInputError
from kernel_moe.kernels.cpu import extension as cpu_extension
from kernel_moe.kernels.quantization import dequantize, quantize
from kernel_moe.reference.moe import naive_moe_experts

H, I = 128, 64
FORMATS = [("int8", None), ("int8", 32), ("fp8", None), ("int4", 32), ("int4", 64)]
IDS = [f"{f}-{g or 'row'}" for f, g in FORMATS]


@pytest.fixture(autouse=True, params=["auto", "off"], ids=["native", "torch"])
def cpu_extension_setting(request, monkeypatch):
    monkeypatch.setenv(cpu_extension.ENV, request.param)
    return request.param


def _quantized(inputs: dict, fmt: str, group: int | None) -> tuple[dict, dict]:
    """(inputs with quantized weights, the same with the dequantized fp32 weights)."""
    up, down = quantize(inputs["w_up"], fmt, group), quantize(inputs["w_down"], fmt, group)
    q = dict(inputs, w_up=up.data, w_down=down.data, w_up_scale=up.scale, w_down_scale=down.scale, weight_format=fmt)
    deq = dict(inputs, w_up=dequantize(up.data, up.scale, fmt).to(inputs["x"].dtype),
               w_down=dequantize(down.data, down.scale, fmt).to(inputs["x"].dtype))
    return q, deq


@pytest.mark.parametrize("fmt,group", FORMATS, ids=IDS)
@pytest.mark.parametrize("T", [0, 1, 7, 130])
def test_quantized_op_computes_the_dequantized_weights(fmt, group, T):
    q, deq = _quantized(op_inputs(T, H, I, 8, 2, bias=True, seed=T), fmt, group)
    out = run_op(q)
    assert out.shape == (T, H) and out.dtype == torch.float32
    assert_fp32_close(out, run_reference(deq))


@pytest.mark.parametrize("fmt,group", FORMATS, ids=IDS)
def test_quantized_bf16_activations_and_dropped_slots(fmt, group):
    inputs = op_inputs(40, H, I, 6, 2, bias=True, dtype=torch.bfloat16, seed=3)
    inputs["topk_ids"][::5, 1] = -1
    q, deq = _quantized(inputs, fmt, group)
    out = run_op(q)
    assert out.dtype == torch.bfloat16
    assert_low_precision_close(out, run_reference(as_fp32(deq)))


@pytest.mark.parametrize("fmt,group", FORMATS, ids=IDS)
@pytest.mark.parametrize("activation,glu", [("gelu", "none"), ("gpt_oss", "interleaved")])
def test_quantized_other_activations(fmt, group, activation, glu):
    q, deq = _quantized(op_inputs(23, H, I, 4, 2, glu=glu, bias=True, seed=4), fmt, group)
    limit = 7.0 if glu != "none" else math.inf
    assert_fp32_close(run_op(q, activation, glu, 1.702, limit), run_reference(deq, activation, glu, 1.702, limit))


@pytest.mark.parametrize("fmt,group", FORMATS, ids=IDS)
def test_quantized_backward_gives_input_and_routing_gradients(fmt, group):
    """LoRA-style training on top: the frozen quantized experts pass gradients to x and the router."""
    q, deq = _quantized(op_inputs(17, H, I, 5, 2, bias=True, seed=5), fmt, group)
    g = torch.randn(17, H)
    grads = []
    for inputs, fn in ((q, run_op), (deq, run_reference)):
        x = inputs["x"].clone().requires_grad_(True)
        w = inputs["topk_weights"].clone().requires_grad_(True)
        (fn(dict(inputs, x=x, topk_weights=w)) * g).sum().backward()
        grads.append((x.grad, w.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_opcheck_of_a_quantized_call():
    q, _ = _quantized(op_inputs(9, H, I, 4, 2, bias=True, seed=6), "int4", 32)
    args = (q["x"], q["topk_weights"], q["topk_ids"], q["w_up"], q["w_down"], q["b_up"], q["b_down"], None,
            q["w_up_scale"], q["w_down_scale"], "silu", "concat", 1.702, math.inf, math.inf, math.inf, False, "int4",
            "cpu")
    result = torch.library.opcheck(torch.ops.kernel_moe.fused_experts.default, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("change,match", [
    (lambda q: dict(q, w_up=q["w_up"].to(torch.int16)), "must be torch.int8"),
    (lambda q: dict(q, w_up_scale=q["w_up_scale"][:, :-1]), "w_up_scale of weight_format='int8' must be"),
    (lambda q: dict(q, w_down_scale=None), "needs w_down_scale as float32"),
    (lambda q: dict(q, weight_format="int3"), "weight_format='int3' is not supported"),
    (lambda q: dict(q, weight_format="full"), "w_up dtype torch.int8 is not supported"),
])
def test_invalid_quantized_inputs_name_what_is_wrong(change, match):
    q, _ = _quantized(op_inputs(5, H, I, 4, 2, seed=7), "int8", None)
    with pytest.raises(UnsupportedInputError, match=match):
        run_op(change(q))


def test_format_sizes_against_bf16():
    """Expert weight bytes with scales, relative to bf16: int8 and fp8 <= 0.52x, int4 (group 128) <= 0.28x."""
    w = torch.randn(4, 512, 1024)
    bf16 = w.numel() * 2
    assert quantize(w, "int8").nbytes() / bf16 <= 0.52
    assert quantize(w, "fp8").nbytes() / bf16 <= 0.52
    assert quantize(w, "int4", 128).nbytes() / bf16 <= 0.28


def test_output_accuracy_on_random_normal_weights():
    """A SwiGLU layer with random normal weights against its full-precision output (the gated
    product adds the gate's and the up projection's errors: about 4.5 dB below the weights')."""
    torch.manual_seed(0)
    E, h, i, T = 8, 512, 256, 64
    w_up, w_down = torch.randn(E, 2 * i, h) / math.sqrt(h), torch.randn(E, h, i) / math.sqrt(i)
    x = torch.randn(T, h)
    weights, ids = torch.softmax(torch.randn(T, E), dim=-1).topk(2, dim=-1)
    full = naive_moe_experts(x, weights, ids, w_up, w_down)
    floors = {("int8", 128): 38.0, ("int8", None): 36.0, ("fp8", None): 25.0, ("int4", 128): 14.0,
              ("int4", 32): 15.5}
    for (fmt, group), floor in floors.items():
        up, down = quantize(w_up, fmt, group), quantize(w_down, fmt, group)
        out = naive_moe_experts(x, weights, ids, dequantize(up.data, up.scale, fmt), dequantize(down.data, down.scale,
                                                                                                 fmt))
        assert sqnr_db(out, full) >= floor, (fmt, group, sqnr_db(out, full))


def test_int4_packing_and_group_scales_round_trip():
    w = torch.randn(2, 3, 64)
    q = quantize(w, "int4", 32)
    assert q.data.dtype == torch.uint8 and q.data.shape == (2, 3, 32) and q.scale.shape == (2, 3, 2)
    grid = dequantize(q.data, q.scale, "int4") / q.scale.repeat_interleave(32, dim=-1)
    assert torch.equal(grid, grid.round()) and grid.min() >= -8 and grid.max() <= 7
    low, high = grid[..., 0::2], grid[..., 1::2]  # element 2j in the low nibble, 2j + 1 in the high one
    assert torch.equal((low + 8).to(torch.uint8) | ((high + 8).to(torch.uint8) << 4), q.data)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize(w, "int4", 48)
    with pytest.raises(ValueError, match="multiple of group_size=128"):
        quantize(w, "int4", 128)


@pytest.mark.parametrize("fmt,group", FORMATS, ids=IDS)
def test_decode_runs_the_native_quantized_kernel(fmt, group, monkeypatch, cpu_extension_setting):
    module = cpu_extension.cpu_extension()
    if module is None:
        pytest.skip("the native kernels are switched off in this parametrization")
    calls = []
    real = module.matvec_experts
    monkeypatch.setattr(module, "matvec_experts", lambda *a: calls.append(a[-1]) or real(*a))
    q, deq = _quantized(op_inputs(3, H, I, 8, 2, bias=True, seed=8), fmt, group)
    assert_fp32_close(run_op(q), run_reference(deq))
    assert calls == [{"int8": 1, "fp8": 2, "int4": 3}[fmt]]  # one decode call, on the quantized bytes


@pytest.mark.parametrize("fmt,group,K", [("int4", 32, 256), ("int4", 64, 384), ("int4", 128, 256), ("int4", 32, 1024),
                                         ("int4", 32, 96), ("int8", None, 96), ("fp8", 32, 128)])
def test_native_quantized_kernel_takes_bf16_rows(fmt, group, K, cpu_extension_setting):
    """The native kernel with bf16 x rows: int4 with K a multiple of 128 runs on the bf16 dot products
    (four weight rows at once for an expert's single x row, one at a time for more), everything else
    converts x to fp32. 0-6 rows per expert, N not a multiple of four; the dequantized weights in fp64."""
    module = cpu_extension.cpu_extension()
    if module is None:
        pytest.skip("the native kernels are switched off in this parametrization")
    g = torch.Generator().manual_seed(K)
    E, N, counts = 9, 70, [1, 0, 2, 3, 4, 5, 1, 1, 6]
    q = quantize(torch.randn(E, N, K, generator=g), fmt, group)
    x = torch.randn(sum(counts), K, generator=g).bfloat16()
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    ref = torch.einsum("snk,sk->sn", dequantize(q.data, q.scale, fmt).double()[expert], x.double())
    code = {"int8": 1, "fp8": 2, "int4": 3}[fmt]
    got = module.grouped_matvec_quantized(x, q.data.view(torch.uint8), q.scale, counts, code)
    assert_fp32_close(got, ref.float())
    assert torch.equal(got, module.grouped_matvec_quantized(x, q.data.view(torch.uint8), q.scale, counts, code))


@pytest.mark.parametrize("fmt,group", FORMATS, ids=IDS)
def test_one_expert_dequantized_natively_equals_the_reference(fmt, group, cpu_extension_setting):
    """The large-batch path's transient: one expert's weights in fp32 / bf16 / fp16, converted by the
    native kernel (extension on) or PyTorch (off), bit-identical to dequantize(...).to(dtype)."""
    from kernel_moe.kernels.cpu.mlp import _dequantized

    q = quantize(torch.randn(2, 48, H, generator=torch.Generator().manual_seed(8)) * 3, fmt, group)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = _dequantized(q.data[1], q.scale[1], fmt, dtype)
        assert got.dtype == dtype and torch.equal(got, dequantize(q.data[1], q.scale[1], fmt).to(dtype)), dtype


@pytest.mark.parametrize("fmt,group", FORMATS, ids=IDS)
def test_large_batches_run_the_native_fused_forward_tile_by_tile(fmt, group, monkeypatch, cpu_extension_setting):
    """Prefill of quantized experts: the native fused forward, dequantizing 256 weight rows at a time
    (I = 320: the up projection's 640 rows in three tiles, the last one partial), with biases, a
    dropped slot and bf16 activations; the dequantized weights' result in the same dtype."""
    module = cpu_extension.cpu_extension()
    if module is None:
        pytest.skip("the native kernels are switched off in this parametrization")
    calls = []
    real = module.fused_experts
    monkeypatch.setattr(module, "fused_experts", lambda *a: calls.append(a[-1]) or real(*a))
    inputs = op_inputs(150, 256, 320, 8, 2, bias=True, seed=11)
    inputs["topk_ids"][3, 1] = -1
    q, deq = _quantized(inputs, fmt, group)
    assert_fp32_close(run_op(q), run_reference(deq))
    assert calls == [{"int8": 1, "fp8": 2, "int4": 3}[fmt]]
    q16 = dict(q, x=q["x"].bfloat16(), b_up=q["b_up"].bfloat16(), b_down=q["b_down"].bfloat16())
    deq16 = dict(deq, x=deq["x"].bfloat16(), w_up=deq["w_up"].bfloat16(), w_down=deq["w_down"].bfloat16(),
                 b_up=deq["b_up"].bfloat16(), b_down=deq["b_down"].bfloat16())
    assert torch.equal(run_op(q16), run_op(deq16))
