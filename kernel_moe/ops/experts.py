"""``kernel_moe::fused_experts``: the routed-expert computation as one custom op.

Given tokens, their top-k routing weights and expert ids, it sorts token-expert slots by
expert, runs each expert's up-projection with the activation, its down-projection, scales
by the routing weight and sums the k contributions of every token. The output shape
[T, H] depends only on the input shapes, so ``torch.compile(fullgraph=True)`` keeps the op
in the graph and CUDA graphs can capture it.

Gradients: ``kernel_moe::fused_experts_backward`` (also opaque to the compiler) returns
the gradients of x, the routing weights (so the router trains), the expert weights and
biases; it recomputes intermediates instead of saving them.

Legend: T tokens, H hidden, E experts, K top-k, N up features (2*I gated, else I), I intermediate.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernel_moe.errors import UnsupportedInputError
from kernel_moe.ops import torch_impl
from kernel_moe.ops.backend import direct_call_allowed, resolve_backend
from kernel_moe.reference.activations import check_activation

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_inputs(
    x: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    activation: str,
    glu: str,
) -> None:
    """Shape, dtype and device checks (metadata only: no data is read)."""
    try:
        check_activation(activation, glu)
    except ValueError as exc:
        raise UnsupportedInputError(str(exc)) from None
    if x.dim() != 2:
        raise UnsupportedInputError(f"x must be 2-D [T, H], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise UnsupportedInputError(f"x dtype {x.dtype} is not supported; allowed: float32, bfloat16, float16, float64")
    T, H = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise UnsupportedInputError(f"topk_ids must be [T={T}, K], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise UnsupportedInputError(f"topk_ids dtype {topk_ids.dtype} is not supported; allowed: int32, int64")
    if topk_weights.shape != topk_ids.shape:
        raise UnsupportedInputError(
            f"topk_weights shape {tuple(topk_weights.shape)} must equal topk_ids shape {tuple(topk_ids.shape)}"
        )
    if w_up.dim() != 3 or w_down.dim() != 3:
        raise UnsupportedInputError(
            f"w_up and w_down must be 3-D [E, N, H] and [E, H, I], got {tuple(w_up.shape)} and {tuple(w_down.shape)}"
        )
    E, N, H_w = w_up.shape
    I = N // 2 if glu != "none" else N
    if H_w != H:
        raise UnsupportedInputError(f"w_up is [E, N, H={H_w}] but x has H={H}")
    if glu != "none" and N % 2 != 0:
        raise UnsupportedInputError(f"w_up has N={N} features, not even, but glu={glu!r} needs [gate, up] pairs")
    if tuple(w_down.shape) != (E, H, I):
        raise UnsupportedInputError(f"w_down must be [E={E}, H={H}, I={I}], got {tuple(w_down.shape)}")
    if b_up is not None and tuple(b_up.shape) != (E, N):
        raise UnsupportedInputError(f"b_up must be [E={E}, N={N}], got {tuple(b_up.shape)}")
    if b_down is not None and tuple(b_down.shape) != (E, H):
        raise UnsupportedInputError(f"b_down must be [E={E}, H={H}], got {tuple(b_down.shape)}")
    for name, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids), ("w_up", w_up), ("w_down", w_down),
                    ("b_up", b_up), ("b_down", b_down)):
        if t is not None and t.device != x.device:
            raise UnsupportedInputError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share a device")


@torch.library.custom_op("kernel_moe::fused_experts", mutates_args=())
def fused_experts(
    x: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
    backend: str,
    deterministic: bool = True,
) -> Tensor:
    """Routed experts: x [T, H], topk_weights/topk_ids [T, K], w_up [E, N, H], w_down [E, H, I],
    b_up [E, N] or None, b_down [E, H] or None -> [T, H] in x's dtype. ``deterministic``
    selects a fixed reduction order on the Triton path (the CPU path always has one)."""
    return _fused_experts_impl(x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, activation, glu, alpha, limit,
                               backend, deterministic)


def _fused_experts_impl(x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, activation, glu, alpha, limit, backend,
                        deterministic) -> Tensor:
    _check_inputs(x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, activation, glu)
    if resolve_backend(backend, x.device) == "triton":
        from kernel_moe.kernels import fused_experts_triton

        return fused_experts_triton(
            x, topk_weights, topk_ids, w_up, w_down, b_up, b_down,
            activation=activation, glu=glu, alpha=alpha, limit=limit, deterministic=deterministic,
        )
    return torch_impl.experts_forward(
        x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, activation, glu, alpha, limit
    )


def call_fused_experts(
    x: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
    backend: str,
    deterministic: bool = True,
) -> Tensor:
    """``kernel_moe::fused_experts``, or in plain eager inference its implementation directly
    (same checks, same result, without the dispatcher's cost; see ``direct_call_allowed``)."""
    args = (x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, activation, glu, alpha, limit, backend, deterministic)
    if direct_call_allowed(x, topk_weights, w_up, w_down, b_up, b_down):
        return _fused_experts_impl(*args)
    return torch.ops.kernel_moe.fused_experts(*args)


@fused_experts.register_fake
def _fused_experts_fake(x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, activation, glu, alpha, limit, backend,
                        deterministic=True):
    _check_inputs(x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, activation, glu)
    return x.new_empty(x.shape)


@torch.library.custom_op("kernel_moe::fused_experts_backward", mutates_args=())
def fused_experts_backward(
    grad_out: Tensor,
    x: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of fused_experts: (grad_x, grad_topk_weights, grad_w_up, grad_w_down,
    grad_b_up or [0], grad_b_down or [0])."""
    if resolve_backend(backend, x.device) == "triton":
        from kernel_moe.kernels import fused_experts_backward_triton

        return fused_experts_backward_triton(
            grad_out, x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, activation, glu, alpha, limit
        )
    return torch_impl.experts_backward(
        grad_out, x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, activation, glu, alpha, limit
    )


@fused_experts_backward.register_fake
def _fused_experts_backward_fake(grad_out, x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, activation, glu,
                                 alpha, limit, backend):
    return (
        x.new_empty(x.shape),
        topk_weights.new_empty(topk_weights.shape),
        w_up.new_empty(w_up.shape),
        w_down.new_empty(w_down.shape),
        b_up.new_empty(b_up.shape) if b_up is not None else x.new_empty(0),
        b_down.new_empty(b_down.shape) if b_down is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, activation, glu, alpha, limit, backend = inputs[:12]
    ctx.save_for_backward(x, topk_weights, topk_ids, w_up, w_down, b_up, b_down)
    ctx.act = (activation, glu, alpha, limit, backend)


def _backward(ctx, grad_out):
    x, topk_weights, topk_ids, w_up, w_down, b_up, b_down = ctx.saved_tensors
    grads = torch.ops.kernel_moe.fused_experts_backward(
        grad_out.contiguous(), x, topk_weights, topk_ids, w_up, w_down, b_up, b_down, *ctx.act
    )
    g_x, g_w, g_up, g_down, g_bup, g_bdown = grads
    return (
        g_x,
        g_w,
        None,
        g_up,
        g_down,
        g_bup if b_up is not None else None,
        g_bdown if b_down is not None else None,
        None, None, None, None, None, None,
    )


fused_experts.register_autograd(_backward, setup_context=_setup_context)
