"""``BACKEND``: the Triton peer of the experts contract, the object
``kernel_moe.kernels.select_backend`` returns for "triton".

It runs the kernels of :mod:`~kernel_moe.kernels.triton.forward` and
:mod:`~kernel_moe.kernels.triton.backward` on what the op hands it: inputs already checked by
:func:`~kernel_moe.kernels.contract.validate_call` and ids already local
(:func:`~kernel_moe.kernels.contract.local_ids`). Routing None is a dense call (one expert,
weight 1; the routing is made on the device). float64 and weight formats other than "full"
raise UnsupportedInputError.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from kernel_moe.kernels.contract import ExpertsGrads, StackedExperts
from kernel_moe.kernels.triton.backward import experts_backward
from kernel_moe.kernels.triton.forward import experts_forward


class TritonBackend:
    """Implements :class:`~kernel_moe.kernels.contract.ExpertsBackend` with the Triton kernels
    (CUDA tensors; CPU tensors through the interpreter)."""

    name = "triton"

    def forward(self, x_TH: Tensor, weights_TK: Optional[Tensor], ids_TK: Optional[Tensor],
                experts: StackedExperts, deterministic: bool) -> Tensor:
        """out [T, H] in x's dtype; ``deterministic`` reduces over K in a fixed order (False:
        fp32 atomics)."""
        return experts_forward(x_TH, weights_TK, ids_TK, experts, deterministic)

    def backward(self, grad_TH: Tensor, x_TH: Tensor, weights_TK: Optional[Tensor], ids_TK: Optional[Tensor],
                 experts: StackedExperts, weight_grads: tuple[bool, bool] = (True, True)) -> ExpertsGrads:
        """Gradients of :meth:`forward` (always deterministic); ``topk_weights`` is None for a
        dense call; weight gradients only where ``weight_grads`` asks (see the kernels' function)."""
        return experts_backward(grad_TH, x_TH, weights_TK, ids_TK, experts, weight_grads=weight_grads)

    def __repr__(self) -> str:
        return "TritonBackend()"


BACKEND = TritonBackend()

__all__ = ["BACKEND", "TritonBackend"]
