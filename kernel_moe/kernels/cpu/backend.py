"""The CPU backend object the selector returns (``kernels.select_backend``)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from kernel_moe.kernels.contract import ExpertsGrads, StackedExperts
from kernel_moe.kernels.cpu.backward import dense_backward, experts_backward
from kernel_moe.kernels.cpu.forward import dense_forward, experts_forward


class CPUBackend:
    """Native CPU kernels where they apply, PyTorch elsewhere (any device); the reduction order is
    fixed, so ``deterministic`` needs nothing."""

    name = "cpu"

    def forward(self, x_TH: Tensor, weights_TK: Optional[Tensor], ids_TK: Optional[Tensor],
                experts: StackedExperts, deterministic: bool) -> Tensor:
        if ids_TK is None:
            return dense_forward(x_TH, experts)
        return experts_forward(x_TH, weights_TK, ids_TK, experts)

    def backward(self, grad_TH: Tensor, x_TH: Tensor, weights_TK: Optional[Tensor], ids_TK: Optional[Tensor],
                 experts: StackedExperts, weight_grads: tuple[bool, bool] = (True, True)) -> ExpertsGrads:
        if ids_TK is None:
            return dense_backward(grad_TH, x_TH, experts, weight_grads)
        return experts_backward(grad_TH, x_TH, weights_TK, ids_TK, experts, weight_grads)


BACKEND = CPUBackend()

__all__ = ["BACKEND", "CPUBackend"]
