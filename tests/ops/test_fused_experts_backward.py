"""Gradients of kernel_moe::fused_experts against autograd through naive_moe_experts.

opcheck does not look at gradient values; these tests do: x, the routing weights, both
expert weights and both biases, fp32 within 1e-4, a float64 gradcheck, and bf16 against fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import GRAD_TOL, as_fp32, assert_low_precision_close, op_inputs, run_op, run_reference, sqnr_db

H, I = 16, 12
DIFF_KEYS = ("x", "topk_weights", "w_up", "w_down", "b_up", "b_down")
ACTIVATIONS = [
    ("silu", "concat"), ("silu", "interleaved"), ("silu", "none"),
    ("gelu", "concat"), ("gelu", "none"),
    ("gelu_tanh", "interleaved"), ("gelu_tanh", "none"),
    ("relu", "concat"), ("relu", "none"), ("relu2", "none"), ("relu2", "interleaved"),
    ("gpt_oss", "concat"), ("gpt_oss", "interleaved"),
]


def _grads(fn, inputs: dict, grad_out: torch.Tensor, keys=DIFF_KEYS):
    leaves = {k: inputs[k].detach().clone().requires_grad_(True) for k in keys if inputs[k] is not None}
    out = fn({**inputs, **leaves})
    out.backward(grad_out)
    return out, {k: v.grad for k, v in leaves.items()}


def _compare(inputs, activation="silu", glu="concat", alpha=1.702, limit=math.inf, keys=DIFF_KEYS):
    T = inputs["x"].shape[0]
    g = torch.randn(T, H, generator=torch.Generator().manual_seed(99))
    out, got = _grads(lambda i: run_op(i, activation, glu, alpha, limit), inputs, g, keys)
    ref, want = _grads(lambda i: run_reference(i, activation, glu, alpha, limit), inputs, g, keys)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert set(got) == set(want)
    for k in want:
        assert got[k] is not None, k
        assert got[k].shape == inputs[k].shape and got[k].dtype == inputs[k].dtype, k
        torch.testing.assert_close(got[k], want[k], **GRAD_TOL, msg=k)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation,glu", ACTIVATIONS, ids=[f"{a}-{g}" for a, g in ACTIVATIONS])
def test_gradients_match_reference(activation, glu, bias):
    inputs = op_inputs(13, H, I, 5, 2, glu=glu, bias=bias, seed=1)
    inputs["x"] = inputs["x"] * 2
    _compare(inputs, activation, glu, 1.702, 3.0 if activation == "gpt_oss" else math.inf)


@pytest.mark.parametrize("glu", ["concat", "interleaved"])
def test_gradients_of_clamped_and_softcapped_swiglu(glu):
    inputs = op_inputs(21, H, I, 4, 2, glu=glu, bias=True, seed=5)
    inputs["x"] = inputs["x"] * 3
    _compare(inputs, "silu", glu, 1.702, 1.5)
    _compare(dict(inputs, softcaps=(2.0, 1.2)), "silu", glu)


@pytest.mark.parametrize("K", [1, 2])
def test_gradients_with_input_scaling_and_dropped_slots(K):
    inputs = op_inputs(17, H, I, 5, K, bias=True, seed=6)
    inputs["scale_inputs"] = True
    inputs["topk_ids"][3, 0] = -1
    inputs["topk_ids"][8, K - 1] = 5
    _compare(inputs)


@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (1, 16, 2), (7, 3, 3), (40, 8, 2), (64, 1, 1)])
def test_gradients_over_shapes(T, E, K):
    _compare(op_inputs(T, H, I, E, K, bias=True, seed=T + E + K))


def test_dropped_slots_get_zero_gradients():
    inputs = op_inputs(12, H, I, 4, 2, bias=True, seed=7)
    inputs["topk_ids"][::3, 1] = -1
    inputs["topk_ids"][1, 0] = 4
    _compare(inputs)
    g = torch.ones(12, H)
    _, got = _grads(lambda i: run_op(i), inputs, g)
    assert torch.equal(got["topk_weights"][::3, 1], torch.zeros(4)) and got["topk_weights"][1, 0] == 0


@pytest.mark.parametrize("routing", ["one", "few"])
def test_gradients_with_skewed_routing(routing):
    _compare(op_inputs(24, H, I, 6, 2, routing=routing, bias=True, seed=2))


def test_gradients_with_transposed_weight_views_and_non_contiguous_x():
    base = op_inputs(19, H, I, 4, 2, bias=True, seed=3)
    T = 19
    g = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    _, want = _grads(run_reference, base, g)
    leaves = {k: base[k].detach().clone().requires_grad_(True) for k in DIFF_KEYS}
    views = dict(base, **leaves)
    views["w_up"] = leaves["w_up"].transpose(1, 2).contiguous().transpose(1, 2)
    views["w_down"] = leaves["w_down"].transpose(1, 2).contiguous().transpose(1, 2)
    views["x"] = leaves["x"].t().contiguous().t()
    assert not (views["w_up"].is_contiguous() or views["w_down"].is_contiguous() or views["x"].is_contiguous())
    run_op(views).backward(g)
    for k in DIFF_KEYS:
        torch.testing.assert_close(leaves[k].grad, want[k], **GRAD_TOL, msg=k)


def test_only_x_requires_grad():
    inputs = op_inputs(11, H, I, 4, 2, seed=4)
    _compare(inputs, keys=("x",))


def test_repeated_expert_in_a_row():
    inputs = op_inputs(9, H, I, 4, 2, bias=True, seed=6)
    inputs["topk_ids"][:, 1] = inputs["topk_ids"][:, 0]
    _compare(inputs)


def test_zero_tokens_give_zero_gradients():
    inputs = op_inputs(0, H, I, 4, 2, bias=True)
    leaves = {k: inputs[k].clone().requires_grad_(True) for k in DIFF_KEYS}
    out = run_op(dict(inputs, **leaves))
    assert out.shape == (0, H)
    out.sum().backward()
    for k, v in leaves.items():
        assert v.grad is not None and v.grad.shape == v.shape, k
        assert torch.count_nonzero(v.grad) == 0, k


def test_unused_experts_get_zero_weight_gradients():
    inputs = op_inputs(5, H, I, 8, 1, routing="one", bias=True, seed=7)
    leaves = {k: inputs[k].clone().requires_grad_(True) for k in ("w_up", "w_down", "b_up", "b_down")}
    run_op(dict(inputs, **leaves)).pow(2).sum().backward()
    for k, v in leaves.items():
        assert torch.count_nonzero(v.grad[1:]) == 0, k
        assert torch.count_nonzero(v.grad[0]) > 0, k


@pytest.mark.parametrize(
    "activation,glu,limit", [("silu", "concat", math.inf), ("gelu_tanh", "none", math.inf),
                             ("gpt_oss", "interleaved", 0.8), ("relu", "interleaved", math.inf)],
)
def test_gradcheck_float64(activation, glu, limit):
    T, h, i, E, K = 5, 3, 2, 3, 2
    inputs = op_inputs(T, h, i, E, K, glu=glu, bias=True, dtype=torch.float64, seed=8)
    inputs["topk_weights"] = inputs["topk_weights"].double()
    ids = inputs["topk_ids"]
    diff = tuple(inputs[k].clone().requires_grad_(True) for k in DIFF_KEYS)

    def fn(x, w, w_up, w_down, b_up, b_down):
        return torch.ops.kernel_moe.fused_experts(x, w, ids, w_up, w_down, b_up, b_down, None, None, None, activation,
                                                  glu, 1.702, limit, math.inf, math.inf, False, "full", "auto")

    assert torch.autograd.gradcheck(fn, diff, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_gradients_against_fp32_reference(dtype):
    inputs = op_inputs(64, H, I, 6, 2, bias=True, dtype=dtype, seed=9)
    g = torch.randn(64, H, generator=torch.Generator().manual_seed(10))
    out, got = _grads(run_op, inputs, g.to(dtype))
    ref, want = _grads(run_reference, as_fp32(inputs), g)
    assert_low_precision_close(out, ref)
    for k in DIFF_KEYS:
        assert got[k].dtype == inputs[k].dtype, k
        assert sqnr_db(got[k], want[k]) >= 30.0, (k, sqnr_db(got[k], want[k]))
        # Weight gradients sum many tokens and reach ~10, where bf16 spacing is 0.06: compare
        # relative to each gradient's scale.
        scale = want[k].abs().max()
        torch.testing.assert_close(got[k].float() / scale, want[k] / scale, atol=2e-2, rtol=2e-2, msg=k)
