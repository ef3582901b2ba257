"""``kernel_moe::expert_projection``: one projection of routed experts as a custom op (the gather
or the combine half of the experts op, see :mod:`kernel_moe.kernels.projection`), with its
backward ``kernel_moe::expert_projection_backward``.

The output shape depends on the input shapes alone ([T, O] with routing weights, [T, K, O]
without), so ``torch.compile(fullgraph=True)`` keeps the op in the graph as one node. The
backward recomputes the slot outputs it needs instead of saving them and returns gradients of
x, the routing weights (so the router trains), the expert weights and biases.

Legend: T tokens, K slots per token, E experts, D input features, O output features.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernel_moe.kernels.projection import (
    projection_backward,
    projection_forward,
    projection_shape,
    validate_projection,
)
from kernel_moe.ops.experts import direct_call_allowed


@torch.library.custom_op("kernel_moe::expert_projection", mutates_args=())
def expert_projection(x: Tensor, topk_weights: Optional[Tensor], topk_ids: Tensor, weight: Tensor,
                      bias: Optional[Tensor], backend: str = "auto") -> Tensor:
    """x [T, D] (a row per token) or [T, K, D] (a row per slot), topk_ids [T, K], weight [E, O, D],
    bias [E, O] | None -> [T, O] = sum_k topk_weights * (x @ weight[id]^T + bias[id]) when
    topk_weights [T, K] is given, else [T, K, O] (each slot's projection). ``backend``: "auto"
    (Triton on CUDA), "triton" or "cpu" (the PyTorch path, any device)."""
    validate_projection(x, topk_weights, topk_ids, weight, bias)
    return projection_forward(x, topk_weights, topk_ids, weight, bias, backend)


@expert_projection.register_fake
def _expert_projection_fake(x, topk_weights, topk_ids, weight, bias, backend="auto"):
    validate_projection(x, topk_weights, topk_ids, weight, bias)
    return x.new_empty(projection_shape(x, topk_weights, topk_ids, weight))


@torch.library.custom_op("kernel_moe::expert_projection_backward", mutates_args=())
def expert_projection_backward(grad: Tensor, x: Tensor, topk_weights: Optional[Tensor], topk_ids: Tensor,
                               weight: Tensor, bias: Optional[Tensor],
                               backend: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of expert_projection: (grad_x, grad_topk_weights or [0], grad_weight, grad_bias or [0])."""
    g = projection_backward(grad, x, topk_weights, topk_ids, weight, bias, backend)

    def given(t: Optional[Tensor]) -> Tensor:
        return x.new_empty(0) if t is None else t

    return g.x, given(g.topk_weights), g.weight, given(g.bias)


@expert_projection_backward.register_fake
def _expert_projection_backward_fake(grad, x, topk_weights, topk_ids, weight, bias, backend="auto"):
    def like(t: Optional[Tensor]) -> Tensor:
        return x.new_empty(0) if t is None else t.new_empty(t.shape)

    return like(x), like(topk_weights), like(weight), like(bias)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:5])
    ctx.backend = inputs[5]


def _backward(ctx, grad):
    x, topk_weights, topk_ids, weight, bias = ctx.saved_tensors
    g_x, g_w, g_weight, g_bias = torch.ops.kernel_moe.expert_projection_backward(
        grad.contiguous(), x, topk_weights, topk_ids, weight, bias, ctx.backend)
    return g_x, None if topk_weights is None else g_w, None, g_weight, None if bias is None else g_bias, None


expert_projection.register_autograd(_backward, setup_context=_setup_context)


def run_projection(x: Tensor, weights_TK: Optional[Tensor], ids_TK: Tensor, w_EOD: Tensor,
                   b_EO: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """One call of ``kernel_moe::expert_projection``, or in plain eager inference its
    implementation directly (same checks and result, without the dispatcher's cost)."""
    if direct_call_allowed(x, weights_TK, w_EOD, b_EO):
        validate_projection(x, weights_TK, ids_TK, w_EOD, b_EO)
        return projection_forward(x, weights_TK, ids_TK, w_EOD, b_EO, backend)
    return torch.ops.kernel_moe.expert_projection(x, weights_TK, ids_TK, w_EOD, b_EO, backend)


__all__ = ["expert_projection", "expert_projection_backward", "run_projection"]
