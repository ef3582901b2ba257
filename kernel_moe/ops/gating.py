"""``kernel_moe::topk_gating``: router logits -> (routing weights, expert ids) as one custom op.

On the Triton backend it is the fused gating kernel (scores, top-k, renormalization and
scaling in one pass per token block); elsewhere it is :func:`kernel_moe.routing.topk.route`.
The backward is an explicit formula (selected ids are integers and carry no gradient), so
gradients reach the router through the routing weights on every backend.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernel_moe.kernels import resolve_backend
from kernel_moe.routing.topk import RoutingSpec, route


@torch.library.custom_op("kernel_moe::topk_gating", mutates_args=())
def topk_gating(
    logits: Tensor,
    top_k: int,
    scoring: str,
    order: str,
    renormalize: bool,
    scaling: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """logits [T, E] -> (weights [T, K] float32, ids [T, K] int64)."""
    spec = RoutingSpec(logits.shape[1], top_k, scoring, order, renormalize, scaling)
    if resolve_backend(backend, logits.device) == "triton":
        from kernel_moe.kernels.triton.routing import topk_gating as gating_kernel

        return gating_kernel(logits, top_k, scoring=scoring, order=order, renormalize=renormalize, scaling=scaling)
    weights, ids = route(logits, spec)
    return weights.float().contiguous(), ids.contiguous()


def gate(logits_TE: Tensor, routing: RoutingSpec, backend: str) -> tuple[Tensor, Tensor]:
    """``kernel_moe::topk_gating`` for a :class:`RoutingSpec` (the schema spells its fields out)."""
    return torch.ops.kernel_moe.topk_gating(logits_TE, routing.top_k, routing.scoring, routing.order,
                                            routing.renormalize, routing.scaling, backend)


@topk_gating.register_fake
def _topk_gating_fake(logits, top_k, scoring, order, renormalize, scaling, backend):
    T = logits.shape[0]
    return logits.new_empty((T, top_k), dtype=torch.float32), logits.new_empty((T, top_k), dtype=torch.int64)


def gating_backward(grad_w_TK: Tensor, logits_TE: Tensor, ids_TK: Tensor, scoring: str, order: str,
                    renormalize: bool, scaling: float) -> Tensor:
    """d loss / d logits [T, E] from d loss / d weights [T, K], recomputing the scores."""
    logits = logits_TE.float()
    g = grad_w_TK.float() * scaling
    if order == "topk_then_score":
        w = torch.softmax(logits.gather(1, ids_TK), dim=-1)
        d_sel = w * (g - (g * w).sum(dim=-1, keepdim=True))
        return torch.zeros_like(logits).scatter_add_(1, ids_TK, d_sel).to(logits_TE.dtype)
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    picked = scores.gather(1, ids_TK)
    if renormalize:
        total = picked.sum(dim=-1, keepdim=True) + (1e-20 if scoring == "sigmoid" else 0.0)
        g = (g - (g * picked).sum(dim=-1, keepdim=True) / total) / total
    d_scores = torch.zeros_like(logits).scatter_add_(1, ids_TK, g)
    if scoring == "softmax":
        d_logits = scores * (d_scores - (d_scores * scores).sum(dim=-1, keepdim=True))
    else:
        d_logits = d_scores * scores * (1 - scores)
    return d_logits.to(logits_TE.dtype)


def _setup_context(ctx, inputs, output) -> None:
    logits, top_k, scoring, order, renormalize, scaling, backend = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.args = (scoring, order, renormalize, scaling)


def _backward(ctx, grad_w, grad_ids):
    logits, ids = ctx.saved_tensors
    return gating_backward(grad_w, logits, ids, *ctx.args), None, None, None, None, None, None


topk_gating.register_autograd(_backward, setup_context=_setup_context)
