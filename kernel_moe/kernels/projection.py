"""Grouped expert projections: one half of the expert computation, for experts that do
something between their two projections that is not a pointwise activation (attention).

The experts op (:mod:`kernel_moe.kernels.contract`) fuses ``up -> activation -> down`` per
slot. An attention expert (MoA, SwitchHead) has attention across tokens between its projections,
so its two projections run as two calls of the op's halves:

- **gather** (the op's up half): ``y[t, k] = x[t] @ w[id[t, k]]^T (+ b)``, one output row per
  slot, token rows gathered by expert (x [T, D] -> [T, K, O]);
- **combine** (the op's down half): ``out[t] = sum_k g[t, k] * (x[t, k] @ w[id[t, k]]^T (+ b))``,
  the routing weight applied and the slots summed in one scatter-add (x [T, K, D] -> [T, O]).

A call may also read a per-slot input and write per-slot outputs (x [T, K, D], no weights:
SwitchHead's output experts before its per-head sums are taken). Both run like the CPU
backend's batched path: slots sorted by expert once (its ``sort_slots``, dropped ids left
out), rows gathered with one ``index_select``, one GEMM per expert into a shared buffer, one
scatter at the end. They run inside a custom op, so reading token counts on the host is free.
Dropped slots (ids outside [0, E)) give zero output rows and zero gradients, as in the contract.

Backends: ``backend`` resolves like the experts op's (:func:`kernel_moe.kernels.resolve_backend`):
"triton" runs :mod:`kernel_moe.kernels.triton.projection` (gather in the A-load on the
expert-aligned layout, no host synchronisation; CPU tensors through the interpreter), "cpu" the
PyTorch code of this module (any device).

Legend: T tokens, K slots per token, E experts, D input features, O output features,
S' kept slots.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from kernel_moe.errors import UnsupportedInputError
from kernel_moe.kernels import resolve_backend
from kernel_moe.kernels.contract import FLOAT_DTYPES, ID_DTYPES
from kernel_moe.kernels.cpu.forward import SortedSlots, sort_slots


class ProjectionGrads(NamedTuple):
    """Gradients of a projection call: x (its shape), routing weights [T, K] (None without),
    w [E, O, D], b [E, O] (None without)."""

    x: Tensor
    topk_weights: Optional[Tensor]
    weight: Tensor
    bias: Optional[Tensor]


def validate_projection(x: Tensor, weights_TK: Optional[Tensor], ids_TK: Tensor, w_EOD: Tensor,
                        b_EO: Optional[Tensor]) -> None:
    """The one check of a projection call's inputs (metadata only); raises UnsupportedInputError
    naming the input, what it is and what is allowed."""
    if ids_TK.dim() != 2 or ids_TK.dtype not in ID_DTYPES:
        raise UnsupportedInputError(f"topk_ids must be a 2-D int32/int64 tensor [T, K], got {ids_TK.dtype} "
                                    f"{tuple(ids_TK.shape)}")
    T, K = ids_TK.shape
    if w_EOD.dim() != 3 or w_EOD.dtype not in FLOAT_DTYPES:
        raise UnsupportedInputError(f"weight must be a floating 3-D tensor [E, O, D], got {w_EOD.dtype} "
                                    f"{tuple(w_EOD.shape)}")
    E, O, D = w_EOD.shape
    if tuple(x.shape) not in ((T, D), (T, K, D)):
        raise UnsupportedInputError(f"x must be [T={T}, D={D}] or [T={T}, K={K}, D={D}], got {tuple(x.shape)}")
    if x.dtype != w_EOD.dtype:
        raise UnsupportedInputError(f"x dtype {x.dtype} must equal the weight dtype {w_EOD.dtype}")
    if b_EO is not None and (tuple(b_EO.shape) != (E, O) or b_EO.dtype != w_EOD.dtype):
        raise UnsupportedInputError(f"bias must be [E={E}, O={O}] in {w_EOD.dtype}, got {b_EO.dtype} "
                                    f"{tuple(b_EO.shape)}")
    if weights_TK is not None and (weights_TK.shape != ids_TK.shape or not weights_TK.is_floating_point()):
        raise UnsupportedInputError(f"topk_weights must be floating [T={T}, K={K}], got {weights_TK.dtype} "
                                    f"{tuple(weights_TK.shape)}")
    for name, t in (("topk_weights", weights_TK), ("topk_ids", ids_TK), ("weight", w_EOD), ("bias", b_EO)):
        if t is not None and t.device != x.device:
            raise UnsupportedInputError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share a "
                                        "device")


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton(backend: str, x: Tensor):
    """The Triton projection module when ``backend`` resolves to "triton" for x's device (checking
    the dtype it takes), else None."""
    if resolve_backend(backend, x.device) != "triton":
        return None
    if x.dtype not in TRITON_DTYPES:
        raise UnsupportedInputError(f"the triton backend does not support x dtype {x.dtype}; allowed: float32, "
                                    "bfloat16, float16")
    return importlib.import_module("kernel_moe.kernels.triton.projection")


def projection_shape(x: Tensor, weights_TK: Optional[Tensor], ids_TK: Tensor, w_EOD: Tensor) -> tuple[int, ...]:
    """The output shape: [T, O] with routing weights (combined), else [T, K, O]."""
    T, K = ids_TK.shape
    return (T, w_EOD.shape[1]) if weights_TK is not None else (T, K, w_EOD.shape[1])


def _rows(x: Tensor, slots: SortedSlots) -> Tensor:
    """The input row of each sorted slot: [S', D] (the token's row, or the slot's own row)."""
    D = x.shape[-1]
    return x.reshape(-1, D).index_select(0, slots.order_S if x.dim() == 3 else slots.tok_S)


def _per_expert(slots: SortedSlots, fn) -> None:
    """fn(expert, start, stop) for each expert with kept slots (rows [start, stop) of the sort)."""
    start = 0
    for e, n in enumerate(slots.counts):
        if n:
            fn(e, start, start + n)
        start += n


def _expert_outputs(x_SD: Tensor, slots: SortedSlots, w_EOD: Tensor, b_EO: Optional[Tensor]) -> Tensor:
    """[S', D] sorted rows -> [S', O], one GEMM per expert into one buffer."""
    y_SO = x_SD.new_empty(x_SD.shape[0], w_EOD.shape[1])

    def one(e: int, a: int, b: int) -> None:
        if b_EO is None:
            torch.mm(x_SD[a:b], w_EOD[e].t(), out=y_SO[a:b])
        else:
            torch.addmm(b_EO[e], x_SD[a:b], w_EOD[e].t(), out=y_SO[a:b])

    _per_expert(slots, one)
    return y_SO


def projection_forward(x: Tensor, weights_TK: Optional[Tensor], ids_TK: Tensor, w_EOD: Tensor,
                       b_EO: Optional[Tensor], backend: str = "cpu") -> Tensor:
    """x [T, D] or [T, K, D] -> [T, O] (weights given: weighted sum over the slots, accumulated in
    fp32) or [T, K, O] (per slot); see the module docstring."""
    triton_impl = _triton(backend, x)
    if triton_impl is not None:
        return triton_impl.projection_forward_triton(x, weights_TK, ids_TK, w_EOD, b_EO)
    T, K = ids_TK.shape
    E, O, _ = w_EOD.shape
    slots = sort_slots(ids_TK, E)
    y_SO = _expert_outputs(_rows(x, slots), slots, w_EOD, b_EO)
    if weights_TK is None:
        return x.new_zeros(T * K, O).index_copy_(0, slots.order_S, y_SO).view(T, K, O)
    acc = torch.promote_types(x.dtype, torch.float32)
    g_S = weights_TK.reshape(-1).index_select(0, slots.order_S).to(acc)
    out = torch.zeros(T, O, dtype=acc, device=x.device).index_add_(0, slots.tok_S, y_SO.to(acc) * g_S[:, None])
    return out.to(x.dtype)


def projection_backward(grad: Tensor, x: Tensor, weights_TK: Optional[Tensor], ids_TK: Tensor, w_EOD: Tensor,
                        b_EO: Optional[Tensor], backend: str = "cpu") -> ProjectionGrads:
    """Gradients of :func:`projection_forward` for the output gradient ``grad`` (its output's
    shape): x, routing weights (the slot's output dotted with the token's gradient), w, b."""
    triton_impl = _triton(backend, x)
    if triton_impl is not None:
        return ProjectionGrads(*triton_impl.projection_backward_triton(grad, x, weights_TK, ids_TK, w_EOD, b_EO))
    T, K = ids_TK.shape
    E, O, D = w_EOD.shape
    slots = sort_slots(ids_TK, E)
    x_SD = _rows(x, slots)
    g_w = torch.zeros_like(w_EOD)
    g_b = None if b_EO is None else torch.zeros_like(b_EO)
    if weights_TK is None:
        g_SO = grad.reshape(T * K, O).index_select(0, slots.order_S)  # [S', O]
    else:
        g_SO = grad.index_select(0, slots.tok_S)  # the token's gradient, before the slot's weight
        w_S1 = weights_TK.reshape(-1).index_select(0, slots.order_S).to(grad.dtype)[:, None]
    u_SD = x_SD.new_empty(x_SD.shape)  # the gradient reaching each slot's input, before its weight

    def one(e: int, a: int, b: int) -> None:
        torch.mm(g_SO[a:b], w_EOD[e], out=u_SD[a:b])
        g_e = g_SO[a:b] if weights_TK is None else g_SO[a:b] * w_S1[a:b]
        torch.mm(g_e.t(), x_SD[a:b], out=g_w[e])
        if g_b is not None:
            torch.sum(g_e, dim=0, out=g_b[e])

    _per_expert(slots, one)
    g_topk = None
    g_x_SD = u_SD
    if weights_TK is not None:
        # d out / d weight[t, k] = the slot's output y = x w^T + b, so grad . y = (grad w) . x + grad . b
        g_topk_S = (u_SD.float() * x_SD.float()).sum(-1)
        if b_EO is not None:
            ids_S = ids_TK.reshape(-1).index_select(0, slots.order_S)
            g_topk_S = g_topk_S + (g_SO.float() * b_EO.index_select(0, ids_S).float()).sum(-1)
        g_topk = weights_TK.new_zeros(T * K).index_copy_(0, slots.order_S, g_topk_S.to(weights_TK.dtype)).view(T, K)
        g_x_SD = u_SD * w_S1
    if x.dim() == 3:
        g_x = x.new_zeros(T * K, D).index_copy_(0, slots.order_S, g_x_SD).view(T, K, D)
    else:
        g_x = x.new_zeros(T, D).index_add_(0, slots.tok_S, g_x_SD)
    return ProjectionGrads(g_x, g_topk, g_w, g_b)


__all__ = ["TRITON_DTYPES", "ProjectionGrads", "projection_backward", "projection_forward", "projection_shape", "validate_projection"]
