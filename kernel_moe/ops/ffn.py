"""``kernel_moe::fused_ffn``: a dense FFN (up-projection, activation, down-projection) as one
custom op, with a recomputing backward ``kernel_moe::fused_ffn_backward``.

x [T, H], w_up [N, H] (N = 2*I gated, else I), w_down [H, I], optional biases [N] and [H].
On the Triton backend it runs the grouped kernels with one expert.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernel_moe.errors import UnsupportedInputError
from kernel_moe.ops import torch_impl
from kernel_moe.ops.backend import direct_call_allowed, resolve_backend
from kernel_moe.ops.experts import _check_inputs


def _check(x, w_up, w_down, b_up, b_down, activation, glu) -> None:
    if w_up.dim() != 2 or w_down.dim() != 2:
        raise UnsupportedInputError(
            f"w_up and w_down must be 2-D [N, H] and [H, I], got {tuple(w_up.shape)} and {tuple(w_down.shape)}")
    T = x.shape[0] if x.dim() == 2 else 0
    ids = x.new_zeros((T, 1), dtype=torch.int64)
    _check_inputs(x, ids.to(x.dtype), ids, w_up.unsqueeze(0), w_down.unsqueeze(0),
                  None if b_up is None else b_up.unsqueeze(0), None if b_down is None else b_down.unsqueeze(0),
                  activation, glu)


@torch.library.custom_op("kernel_moe::fused_ffn", mutates_args=())
def fused_ffn(
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
    backend: str,
) -> Tensor:
    """Dense FFN: x [T, H] -> [T, H] in x's dtype."""
    return _fused_ffn_impl(x, w_up, w_down, b_up, b_down, activation, glu, alpha, limit, backend)


def _fused_ffn_impl(x, w_up, w_down, b_up, b_down, activation, glu, alpha, limit, backend) -> Tensor:
    _check(x, w_up, w_down, b_up, b_down, activation, glu)
    if resolve_backend(backend, x.device) == "triton":
        from kernel_moe.kernels import fused_experts_triton

        T = x.shape[0]
        return fused_experts_triton(
            x, x.new_ones((T, 1), dtype=torch.float32), x.new_zeros((T, 1), dtype=torch.int64),
            w_up.unsqueeze(0), w_down.unsqueeze(0), None if b_up is None else b_up.unsqueeze(0),
            None if b_down is None else b_down.unsqueeze(0), activation=activation, glu=glu, alpha=alpha, limit=limit)
    return torch_impl.mlp_forward(x, w_up, w_down, b_up, b_down, activation, glu, alpha, limit).to(x.dtype)


def call_fused_ffn(
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
    backend: str,
) -> Tensor:
    """``kernel_moe::fused_ffn``, or in plain eager inference its implementation directly."""
    args = (x, w_up, w_down, b_up, b_down, activation, glu, alpha, limit, backend)
    if direct_call_allowed(x, w_up, w_down, b_up, b_down):
        return _fused_ffn_impl(*args)
    return torch.ops.kernel_moe.fused_ffn(*args)


@fused_ffn.register_fake
def _fused_ffn_fake(x, w_up, w_down, b_up, b_down, activation, glu, alpha, limit, backend):
    _check(x, w_up, w_down, b_up, b_down, activation, glu)
    return x.new_empty(x.shape)


@torch.library.custom_op("kernel_moe::fused_ffn_backward", mutates_args=())
def fused_ffn_backward(
    grad_out: Tensor,
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_w_up, grad_w_down, grad_b_up or [0], grad_b_down or [0])."""
    if resolve_backend(backend, x.device) == "triton":
        from kernel_moe.kernels import fused_experts_backward_triton

        T = x.shape[0]
        dx, _, dw_up, dw_down, db_up, db_down = fused_experts_backward_triton(
            grad_out, x, x.new_ones((T, 1), dtype=torch.float32), x.new_zeros((T, 1), dtype=torch.int64),
            w_up.unsqueeze(0), w_down.unsqueeze(0), None if b_up is None else b_up.unsqueeze(0),
            None if b_down is None else b_down.unsqueeze(0), activation, glu, alpha, limit)
        return (dx, dw_up.squeeze(0), dw_down.squeeze(0), db_up if b_up is None else db_up.squeeze(0),
                db_down if b_down is None else db_down.squeeze(0))
    dx, dw_up, dw_down, db_up, db_down, _ = torch_impl.mlp_backward(
        grad_out, None, x, w_up, w_down, b_up, b_down, activation, glu, alpha, limit)
    return (dx.to(x.dtype), dw_up.to(w_up.dtype), dw_down.to(w_down.dtype),
            x.new_zeros(0) if db_up is None else db_up, x.new_zeros(0) if db_down is None else db_down)


@fused_ffn_backward.register_fake
def _fused_ffn_backward_fake(grad_out, x, w_up, w_down, b_up, b_down, activation, glu, alpha, limit, backend):
    return (x.new_empty(x.shape), w_up.new_empty(w_up.shape), w_down.new_empty(w_down.shape),
            b_up.new_empty(b_up.shape) if b_up is not None else x.new_empty(0),
            b_down.new_empty(b_down.shape) if b_down is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, w_up, w_down, b_up, b_down, activation, glu, alpha, limit, backend = inputs
    ctx.save_for_backward(x, w_up, w_down, b_up, b_down)
    ctx.act = (activation, glu, alpha, limit, backend)


def _backward(ctx, grad_out):
    x, w_up, w_down, b_up, b_down = ctx.saved_tensors
    g_x, g_up, g_down, g_bup, g_bdown = torch.ops.kernel_moe.fused_ffn_backward(
        grad_out.contiguous(), x, w_up, w_down, b_up, b_down, *ctx.act)
    return (g_x, g_up, g_down, g_bup if b_up is not None else None, g_bdown if b_down is not None else None,
            None, None, None, None, None)


fused_ffn.register_autograd(_backward, setup_context=_setup_context)
