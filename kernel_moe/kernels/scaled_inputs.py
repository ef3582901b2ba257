"""Input-scaled routing (Llama 4) on any backend: ``out[t] = sum_j expert_{id[t, j]}(w[t, j] * x[t])``.

The routing weight scales an expert's input instead of its output, and experts are nonlinear, so
the weight cannot be moved to the output. The call becomes an ordinary one over S = T*K rows of
one slot each: row ``t*K + j`` is ``w[t, j] * x[t]`` routed to ``id[t, j]`` with weight 1; the
rows' outputs are summed per token. Fixed shapes and no host sync, so it suits every backend;
dropped slots stay dropped (their rows are computed by nobody and contribute zeros).

Legend: T tokens, H hidden, K top-k, S = T*K rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernel_moe.kernels.contract import ExpertsBackend, ExpertsGrads, StackedExperts


def _rows(x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(scaled rows [S, H] in x's dtype, unit weights [S, 1], ids [S, 1])."""
    T, K = ids_TK.shape
    x_SH = (x_TH.unsqueeze(1) * weights_TK.unsqueeze(-1).to(x_TH.dtype)).reshape(T * K, x_TH.shape[1])
    return x_SH, weights_TK.new_ones(T * K, 1), ids_TK.reshape(T * K, 1)


def forward(backend: ExpertsBackend, x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor, experts: StackedExperts,
            deterministic: bool) -> Tensor:
    T, K = ids_TK.shape
    x_SH, ones_S1, ids_S1 = _rows(x_TH, weights_TK, ids_TK)
    y_SH = backend.forward(x_SH, ones_S1, ids_S1, experts._replace(scale_inputs=False), deterministic)
    acc = torch.promote_types(x_TH.dtype, torch.float32)
    return y_SH.view(T, K, x_TH.shape[1]).to(acc).sum(dim=1).to(x_TH.dtype)


def backward(backend: ExpertsBackend, grad_TH: Tensor, x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor,
             experts: StackedExperts, weight_grads: tuple[bool, bool] = (True, True)) -> ExpertsGrads:
    """d w[t, j] = <d row, x[t]> and d x[t] = sum_j w[t, j] * d row, from the rows' backward
    (weight gradients where ``weight_grads`` asks)."""
    T, K = ids_TK.shape
    H = x_TH.shape[1]
    x_SH, ones_S1, ids_S1 = _rows(x_TH, weights_TK, ids_TK)
    grad_SH = grad_TH.unsqueeze(1).expand(T, K, H).reshape(T * K, H)
    g = backend.backward(grad_SH, x_SH, ones_S1, ids_S1, experts._replace(scale_inputs=False), weight_grads)
    acc = torch.promote_types(x_TH.dtype, torch.float32)
    d_rows_TKH = g.x.view(T, K, H).to(acc)
    grad_w_TK = (d_rows_TKH * x_TH.unsqueeze(1).to(acc)).sum(dim=-1).to(weights_TK.dtype)
    grad_x_TH = (d_rows_TKH * weights_TK.unsqueeze(-1).to(acc)).sum(dim=1).to(x_TH.dtype)
    return ExpertsGrads(grad_x_TH, grad_w_TK, g.w_up, g.w_down, g.b_up, g.b_down)


__all__ = ["backward", "forward"]
