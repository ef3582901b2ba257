"""The CPU backend's backward of the routed experts: gradients of x, the routing weights, the
expert weights and biases, recomputing each expert's up-projection instead of storing it.

Legend: T tokens, H hidden, E experts, K top-k, N up features, I intermediate, M slots of one
expert. Dropped slots (ids outside [0, E)) get a zero routing-weight gradient and add nothing.
"""

from __future__ import annotations

import torch

from kernel_moe.kernels.annotate import COMBINE, DISPATCH, stage
from kernel_moe.kernels.contract import ExpertsGrads, StackedExperts
from kernel_moe.kernels.cpu.forward import expert_groups
from kernel_moe.kernels.cpu.mlp import expert_of, mlp_backward


def experts_backward(grad_TH: torch.Tensor, x_TH: torch.Tensor, topk_weights_TK: torch.Tensor,
                     topk_ids_TK: torch.Tensor, experts: StackedExperts,
                     weight_grads: tuple[bool, bool] = (True, True)) -> ExpertsGrads:
    """Gradients of :func:`~kernel_moe.kernels.cpu.forward.experts_forward`, one expert at a time;
    the gradient of w_up / w_down only where ``weight_grads`` asks for it (else None, never allocated)."""
    T, H = x_TH.shape
    K = topk_ids_TK.shape[1]
    acc = torch.promote_types(x_TH.dtype, torch.float32)
    w_up, w_down, b_up, b_down = experts[:4]
    grad_x_TH = torch.zeros(T, H, dtype=acc, device=x_TH.device)
    grad_w_S = torch.zeros(T * K, dtype=acc, device=x_TH.device)
    wanted = (False, False) if experts.quantized else weight_grads  # quantized weights take no gradient
    grad_w_up = torch.zeros(w_up.shape, dtype=w_up.dtype, device=w_up.device) if wanted[0] else None
    grad_w_down = torch.zeros(w_down.shape, dtype=w_down.dtype, device=w_down.device) if wanted[1] else None
    grad_b_up = torch.zeros_like(b_up) if b_up is not None else None
    grad_b_down = torch.zeros_like(b_down) if b_down is not None else None
    weights_S = topk_weights_TK.reshape(-1)
    with stage(DISPATCH):
        groups = list(expert_groups(topk_ids_TK, experts.num_experts))
    for e, tok_M, slot_M in groups:
        with stage(DISPATCH):
            rows = grad_TH.index_select(0, tok_M), weights_S.index_select(0, slot_M), x_TH.index_select(0, tok_M)
        g = mlp_backward(*rows, expert_of(experts, e, x_TH.dtype), experts.activation, weight_grads=wanted)
        with stage(COMBINE):  # gradients written in place: the routing weights', the expert's, x's
            grad_w_S[slot_M] = g.scale
            if grad_w_up is not None:
                grad_w_up[e] = g.w_up
            if grad_w_down is not None:
                grad_w_down[e] = g.w_down
            if grad_b_up is not None:
                grad_b_up[e] = g.b_up
            if grad_b_down is not None:
                grad_b_down[e] = g.b_down
            grad_x_TH.index_add_(0, tok_M, g.x)
    return ExpertsGrads(grad_x_TH.to(x_TH.dtype), grad_w_S.view(T, K).to(topk_weights_TK.dtype), grad_w_up,
                        grad_w_down, grad_b_up, grad_b_down)


def dense_backward(grad_TH: torch.Tensor, x_TH: torch.Tensor, experts: StackedExperts,
                   weight_grads: tuple[bool, bool] = (True, True)) -> ExpertsGrads:
    """Gradients of a dense call (one expert, weight 1): no routing-weight gradient; weight
    gradients as :func:`experts_backward` gives them."""
    wanted = (False, False) if experts.quantized else weight_grads
    g = mlp_backward(grad_TH, None, x_TH, expert_of(experts, 0, x_TH.dtype), experts.activation,
                     weight_grads=wanted)
    w_up, w_down, b_up, b_down = experts[:4]

    def one(grad, like):
        return None if grad is None else grad.to(like.dtype).unsqueeze(0)

    return ExpertsGrads(g.x.to(x_TH.dtype), None, one(g.w_up, w_up), one(g.w_down, w_down),
                        None if b_up is None else g.b_up.unsqueeze(0), None if b_down is None else g.b_down.unsqueeze(0))


__all__ = ["dense_backward", "experts_backward"]
