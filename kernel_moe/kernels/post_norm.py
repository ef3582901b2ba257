"""The post-expert norm (MuseSpark) on any backend: each expert output is scaled by s [H] and
RMS-normalised before its routing weight applies,

    out[t] = sum_j w[t, j] * norm(s * expert_{id[t, j]}(x[t])),   norm(z) = z * rsqrt(mean(z^2) + eps).

The norm needs the whole output row of one slot, so the call runs the backend over S = T*K rows
of one slot each (row ``t*K + j`` is ``x[t]`` routed to ``id[t, j]`` with weight 1), normalises
each row in fp32 and sums the weighted rows per token. Fixed shapes and no host sync, so it suits
every backend (native CPU kernels and Triton alike); a dropped slot's row is computed by nobody
and contributes nothing, whatever its weight. The backward recomputes the rows' outputs.

Legend: T tokens, H hidden, K top-k, S = T*K rows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernel_moe.kernels.contract import ExpertsBackend, ExpertsGrads, StackedExperts


def _rows(backend: ExpertsBackend, x_TH: Tensor, ids_TK: Optional[Tensor], experts: StackedExperts,
          deterministic: bool) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """(rows [S, H], their ids [S, 1] or None for a dense call, each row's expert output [S, H]
    in x's dtype without the norm)."""
    plain = experts._replace(post_norm=None)
    if ids_TK is None:
        return x_TH, None, backend.forward(x_TH, None, None, plain, deterministic)
    T, K = ids_TK.shape
    x_SH = x_TH.unsqueeze(1).expand(T, K, x_TH.shape[1]).reshape(T * K, x_TH.shape[1])
    ids_S1 = ids_TK.reshape(T * K, 1)
    ones_S1 = torch.ones(T * K, 1, dtype=_acc(x_TH), device=x_TH.device)
    return x_SH, ids_S1, backend.forward(x_SH, ones_S1, ids_S1, plain, deterministic)


def _acc(x_TH: Tensor) -> torch.dtype:
    """The accumulation dtype: fp32, fp64 for fp64 input."""
    return torch.promote_types(x_TH.dtype, torch.float32)


def _slot_weights(weights_TK: Optional[Tensor], ids_TK: Optional[Tensor], experts: StackedExperts,
                  x_TH: Tensor) -> Tensor:
    """Each slot's routing weight [T, K] in the accumulation dtype, 0 for dropped slots (ids
    outside [0, E))."""
    if ids_TK is None:
        return torch.ones(x_TH.shape[0], 1, dtype=_acc(x_TH), device=x_TH.device)
    kept_TK = (ids_TK >= 0) & (ids_TK < experts.num_experts)
    return torch.where(kept_TK, weights_TK.to(_acc(x_TH)), torch.zeros((), device=x_TH.device))


def _normed(y_SH: Tensor, scale_H: Tensor, eps: float, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(normalised rows [S, H] in ``acc``, each row's rsqrt(mean(z^2) + eps) [S, 1])."""
    z_SH = y_SH.to(acc) * scale_H.to(acc)
    r_S1 = torch.rsqrt(z_SH.square().mean(dim=-1, keepdim=True) + eps)
    return z_SH * r_S1, r_S1


def forward(backend: ExpertsBackend, x_TH: Tensor, weights_TK: Optional[Tensor], ids_TK: Optional[Tensor],
            experts: StackedExperts, deterministic: bool) -> Tensor:
    """out [T, H] in x's dtype (routing None: a dense call, weight 1)."""
    T, H = x_TH.shape
    _, _, y_SH = _rows(backend, x_TH, ids_TK, experts, deterministic)
    n_SH, _ = _normed(y_SH, experts.post_norm, experts.post_norm_eps, _acc(x_TH))
    w_TK = _slot_weights(weights_TK, ids_TK, experts, x_TH)
    # a dropped slot's row is zero, but its weight may not be finite: select, never multiply by 0
    kept_TK1 = (w_TK != 0).unsqueeze(-1)
    weighted_TKH = n_SH.view(T, w_TK.shape[1], H) * w_TK.unsqueeze(-1)
    terms_TKH = torch.where(kept_TK1, weighted_TKH, torch.zeros((), device=x_TH.device))
    return terms_TKH.sum(dim=1).to(x_TH.dtype)


def backward(backend: ExpertsBackend, grad_TH: Tensor, x_TH: Tensor, weights_TK: Optional[Tensor],
             ids_TK: Optional[Tensor], experts: StackedExperts) -> ExpertsGrads:
    """Gradients through the norm: d w[t, j] = <d out[t], n[t, j]>; the rows' gradient
    d z = r * (d n - n * mean(d n * n)) gives d s = sum over rows of d z * y and the expert
    outputs' gradient d y = d z * s, which the backend's backward takes from there."""
    T, H = x_TH.shape
    x_SH, ids_S1, y_SH = _rows(backend, x_TH, ids_TK, experts, True)
    scale_H = experts.post_norm
    acc = _acc(x_TH)
    n_SH, r_S1 = _normed(y_SH, scale_H, experts.post_norm_eps, acc)
    w_TK = _slot_weights(weights_TK, ids_TK, experts, x_TH)
    kept_S1 = (w_TK != 0).reshape(-1, 1) if ids_TK is None else (
        (ids_TK >= 0) & (ids_TK < experts.num_experts)).reshape(-1, 1)
    g_T1H = grad_TH.to(acc).unsqueeze(1)
    g_n_SH = (g_T1H * w_TK.unsqueeze(-1)).reshape(-1, H)
    g_z_SH = r_S1 * (g_n_SH - n_SH * (g_n_SH * n_SH).mean(dim=-1, keepdim=True))
    g_z_SH = torch.where(kept_S1, g_z_SH, torch.zeros((), device=x_TH.device))
    grad_scale_H = (g_z_SH * y_SH.to(acc)).sum(dim=0).to(scale_H.dtype)
    g_y_SH = (g_z_SH * scale_H.to(acc)).to(x_TH.dtype)
    plain = experts._replace(post_norm=None)
    if ids_TK is None:
        g = backend.backward(g_y_SH, x_SH, None, None, plain)
        return g._replace(post_norm=grad_scale_H)
    ones_S1 = torch.ones(T * ids_TK.shape[1], 1, dtype=acc, device=x_TH.device)
    g = backend.backward(g_y_SH, x_SH, ones_S1, ids_S1, plain)
    K = w_TK.shape[1]
    kept_TK = kept_S1.view(T, K)
    dots_TK = (g_T1H * n_SH.view(T, K, H)).sum(dim=-1)
    grad_w_TK = torch.where(kept_TK, dots_TK, torch.zeros((), device=x_TH.device)).to(weights_TK.dtype)
    grad_x_TH = g.x.view(T, K, H).to(acc).sum(dim=1).to(x_TH.dtype)
    return ExpertsGrads(grad_x_TH, grad_w_TK, g.w_up, g.w_down, g.b_up, g.b_down, grad_scale_H)


__all__ = ["backward", "forward"]
