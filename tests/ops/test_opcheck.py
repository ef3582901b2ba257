"""torch.library.opcheck of kernel_moe::fused_experts and kernel_moe::fused_experts_backward:
schema, fake (meta) implementation, autograd registration and AOT dispatch with dynamic shapes."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import op_inputs

H, I = 8, 6

CASES = {
    "silu_concat": dict(T=5, E=4, K=2),
    "bias_gelu_none": dict(T=9, E=3, K=1, glu="none", activation="gelu", bias=True),
    "gpt_oss_interleaved_bias": dict(T=6, E=4, K=2, glu="interleaved", activation="gpt_oss", bias=True, limit=7.0),
    "zero_tokens": dict(T=0, E=4, K=2, bias=True),
    "bf16": dict(T=7, E=4, K=2, dtype=torch.bfloat16, bias=True),
    "k_equals_e_int32_ids": dict(T=4, E=3, K=3, int32=True),
    "transposed_weights": dict(T=5, E=4, K=2, transposed=True),
    "dropped_ids": dict(T=6, E=4, K=2, dropped=True),
    "expert_map": dict(T=6, E=4, K=2, mapped=True),
}


def _args(T, E, K, glu="concat", activation="silu", bias=False, dtype=torch.float32, limit=math.inf,
          int32=False, transposed=False, requires_grad=True, dropped=False, mapped=False):
    i = op_inputs(T, H, I, E, K, glu=glu, bias=bias, dtype=dtype, seed=T + E)
    expert_map = None
    if dropped:  # ids outside [0, E) drop their slot
        i["topk_ids"][::2, 0] = -1
        i["topk_ids"][1::3, 1] = E
    if mapped:  # ids route over 2E experts; this rank holds the odd ones
        i["topk_ids"] = i["topk_ids"] * 2 + 1
        i["topk_ids"][::2, 0] -= 1
        expert_map = torch.tensor([-1, 0, -1, 1, -1, 2, -1, 3])[: 2 * E]
    if int32:
        i["topk_ids"] = i["topk_ids"].to(torch.int32)
    if transposed:
        i["w_up"] = i["w_up"].transpose(1, 2).contiguous().transpose(1, 2)
        i["w_down"] = i["w_down"].transpose(1, 2).contiguous().transpose(1, 2)
    for k in ("x", "topk_weights", "w_up", "w_down", "b_up", "b_down"):
        if i[k] is not None and requires_grad:
            i[k].requires_grad_(True)
    tensors = (i["x"], i["topk_weights"], i["topk_ids"], i["w_up"], i["w_down"], i["b_up"], i["b_down"], expert_map,
               None, None)
    return tensors, (activation, glu, 1.702, limit, math.inf, math.inf, False, "full", "auto")


def _assert_passed(result: dict) -> None:
    assert result, "opcheck ran no test"
    failed = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failed, failed


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_fused_experts(case):
    tensors, scalars = _args(**CASES[case])
    _assert_passed(torch.library.opcheck(torch.ops.kernel_moe.fused_experts.default, tensors + scalars))


@pytest.mark.parametrize("case", ["silu_concat", "gpt_oss_interleaved_bias", "zero_tokens", "bf16"])
def test_opcheck_fused_experts_backward(case):
    tensors, scalars = _args(**CASES[case], requires_grad=False)
    x = tensors[0]
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    _assert_passed(torch.library.opcheck(torch.ops.kernel_moe.fused_experts_backward.default,
                                         (grad_out,) + tensors + scalars))


@pytest.mark.parametrize("case", ["silu_concat", "dropped_ids", "zero_tokens", "bf16", "expert_map"])
def test_opcheck_with_a_post_expert_norm(case):
    """The post-expert norm's scale [H] and epsilon (the schemas' last arguments): both ops, with
    the scale's gradient from the backward."""
    tensors, scalars = _args(**CASES[case])
    scale = (1.0 + 0.1 * torch.randn(H, generator=torch.Generator().manual_seed(2))).to(tensors[0].dtype)
    norm = (True, scale.requires_grad_(True), 1e-6)
    _assert_passed(torch.library.opcheck(torch.ops.kernel_moe.fused_experts.default, tensors + scalars + norm))
    detached = tuple(None if t is None else t.detach() for t in tensors)
    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(1)).to(tensors[0].dtype)
    _assert_passed(torch.library.opcheck(torch.ops.kernel_moe.fused_experts_backward.default,
                                         (grad_out,) + detached + scalars + (scale.detach(), 1e-6)))


def test_fake_implementations_give_the_real_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    tensors, scalars = _args(T=11, E=4, K=2, bias=True, dtype=torch.bfloat16, requires_grad=False)
    real = torch.ops.kernel_moe.fused_experts(*tensors, *scalars)
    grad_out = torch.ones_like(real)
    real_grads = torch.ops.kernel_moe.fused_experts_backward(grad_out, *tensors, *scalars)
    with FakeTensorMode() as mode:
        fake_tensors = tuple(None if t is None else mode.from_tensor(t) for t in tensors)
        fake = torch.ops.kernel_moe.fused_experts(*fake_tensors, *scalars)
        fake_grads = torch.ops.kernel_moe.fused_experts_backward(mode.from_tensor(grad_out), *fake_tensors, *scalars)
    assert (fake.shape, fake.dtype) == (real.shape, real.dtype)
    assert [(g.shape, g.dtype) for g in fake_grads] == [(g.shape, g.dtype) for g in real_grads]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("glu", ["none", "concat"])
def test_opcheck_dense_call_and_ffn_alias(bias, glu):
    """A dense FFN is the experts op with one expert and no routing; kernel_moe::fused_ffn is an alias."""
    torch.manual_seed(0)
    T, H, I = 9, 20, 12
    N = 2 * I if glu != "none" else I
    x = torch.randn(T, H, requires_grad=True)
    w_up = (torch.randn(N, H) * 0.2).requires_grad_()
    w_down = (torch.randn(H, I) * 0.2).requires_grad_()
    b_up = (torch.randn(N) * 0.1).requires_grad_() if bias else None
    b_down = (torch.randn(H) * 0.1).requires_grad_() if bias else None
    act = ("silu", glu, 1.702, math.inf, "cpu")
    experts_act = ("silu", glu, 1.702, math.inf, math.inf, math.inf, False, "full", "cpu")

    def one(t):
        return None if t is None else t.unsqueeze(0)

    dense = (x, None, None, one(w_up), one(w_down), one(b_up), one(b_down), None, None, None, *experts_act)
    _assert_passed(torch.library.opcheck(torch.ops.kernel_moe.fused_experts.default, dense))
    detached = [None if t is None else t.detach() for t in dense[:10]]
    _assert_passed(torch.library.opcheck(torch.ops.kernel_moe.fused_experts_backward.default,
                                         (torch.randn(T, H), *detached, *experts_act)))
    out = torch.ops.kernel_moe.fused_ffn(x, w_up, w_down, b_up, b_down, *act)
    torch.testing.assert_close(out, torch.ops.kernel_moe.fused_experts(*dense), rtol=0, atol=0)


def test_fused_ffn_gradcheck_without_biases():
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w_up = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, u, d: torch.ops.kernel_moe.fused_ffn(x, u, d, None, None, "gelu_tanh", "concat", 1.702, math.inf,
                                                       "cpu"), (x, w_up, w_down))
