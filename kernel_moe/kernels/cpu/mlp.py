"""One expert's MLP in PyTorch, forward and recomputing backward: the building block of the CPU
backend's PyTorch paths and of every dense call.

Legend: M rows, H hidden, N up features (2*I gated, else I), I intermediate.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from kernel_moe.kernels.activations import activation_backward, apply_activation
from kernel_moe.kernels.annotate import DOWN, UP, stage
from kernel_moe.kernels.contract import Activation, StackedExperts
from kernel_moe.kernels.cpu.extension import cpu_extension
from kernel_moe.kernels.quantization import dequantize


class Expert(NamedTuple):
    """One expert's tensors: w_up [N, H], w_down [H, I], b_up [N] | None, b_down [H] | None."""

    w_up: torch.Tensor
    w_down: torch.Tensor
    b_up: Optional[torch.Tensor]
    b_down: Optional[torch.Tensor]


def expert_of(experts: StackedExperts, e: int, dtype: torch.dtype | None = None) -> Expert:
    """Expert ``e`` of a stacked set: views, or for a quantized format its weights dequantized in
    ``dtype`` (one expert at a time: the PyTorch paths' transient, never the whole stack)."""
    w_up, w_down = experts.w_up[e], experts.w_down[e]
    if experts.quantized:
        w_up = _dequantized(w_up, experts.w_up_scale[e], experts.weight_format, dtype or torch.float32)
        w_down = _dequantized(w_down, experts.w_down_scale[e], experts.weight_format, dtype or torch.float32)
    return Expert(w_up, w_down, None if experts.b_up is None else experts.b_up[e],
                  None if experts.b_down is None else experts.b_down[e])


_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FORMAT_CODES = {"int8": 1, "fp8": 2, "int4": 3}  # the native kernels' format argument


def _dequantized(data: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """One quantized matrix [N, K] in ``dtype``: converted by the native kernel (threaded, straight
    into ``dtype``) on CPU where it is built, else by :func:`~kernel_moe.kernels.quantization.dequantize`."""
    ext = cpu_extension() if data.device.type == "cpu" and dtype in _NATIVE_DTYPES else None
    if ext is None:
        return dequantize(data, scale, fmt).to(dtype)
    raw = data.view(torch.uint8) if fmt == "fp8" else data
    return ext.dequantize_rows(raw.contiguous(), scale.contiguous(), FORMAT_CODES[fmt], dtype)


def mlp_forward(x_MH: torch.Tensor, ex: Expert, act: Activation) -> torch.Tensor:
    """[M, H] -> [M, H] in the GEMMs' dtype: up-projection, activation, down-projection."""
    with stage(UP):
        a_MI = apply_activation(F.linear(x_MH, ex.w_up, ex.b_up), act)
    with stage(DOWN):
        return F.linear(a_MI, ex.w_down, ex.b_down)


class MLPGrads(NamedTuple):
    """x [M, H] (accumulation dtype), weights and biases (None where absent), the row scales [M]."""

    x: torch.Tensor
    w_up: Optional[torch.Tensor]
    w_down: Optional[torch.Tensor]
    b_up: Optional[torch.Tensor]
    b_down: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]


def mlp_backward(g_MH: torch.Tensor, scale_M: torch.Tensor | None, x_MH: torch.Tensor, ex: Expert,
                 act: Activation, weight_grads: tuple[bool, bool] = (True, True)) -> MLPGrads:
    """Gradients of ``scale_M[:, None] * mlp_forward(x_MH)`` given d/d out ``g_MH``, recomputing
    the forward (nothing was saved); ``weight_grads`` says which of (w_up, w_down) get one: the
    others' are None (frozen or quantized weights, or gradients nobody asked for)."""
    acc = torch.promote_types(x_MH.dtype, torch.float32)
    with stage(UP):  # the up-projection recomputed
        h_MN = F.linear(x_MH, ex.w_up, ex.b_up)
        a_MI = apply_activation(h_MN, act)
    with stage(DOWN):  # the routing-weight gradient and the down-projection's gradients
        d_scale = None
        dy_MH = g_MH.to(acc)
        if scale_M is not None:
            y_MH = F.linear(a_MI, ex.w_down, ex.b_down)
            d_scale = (dy_MH * y_MH.to(acc)).sum(dim=-1)
            dy_MH = dy_MH * scale_M.to(acc).unsqueeze(-1)
        dy_MH = dy_MH.to(ex.w_down.dtype)
        dw_down = dy_MH.t() @ a_MI.to(dy_MH.dtype) if weight_grads[1] else None
        db_down = dy_MH.to(acc).sum(dim=0).to(ex.b_down.dtype) if ex.b_down is not None else None
        da_MI = (dy_MH @ ex.w_down).to(a_MI.dtype)
    with stage(UP):  # the activation's and the up-projection's gradients
        dh_MN = activation_backward(h_MN, da_MI, act).to(ex.w_up.dtype)
        dw_up = dh_MN.t() @ x_MH.to(dh_MN.dtype) if weight_grads[0] else None
        db_up = dh_MN.to(acc).sum(dim=0).to(ex.b_up.dtype) if ex.b_up is not None else None
        return MLPGrads((dh_MN @ ex.w_up).to(acc), dw_up, dw_down, db_up, db_down, d_scale)


__all__ = ["Expert", "MLPGrads", "expert_of", "mlp_backward", "mlp_forward"]
