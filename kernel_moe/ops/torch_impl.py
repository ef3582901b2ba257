"""The PyTorch implementation of the routed-experts op (forward and recomputing backward).

It runs inside the custom op, where it is opaque to the compiler, so it may read token
counts on the host: tokens are sorted by expert once, and each expert that received tokens
runs two GEMMs over exactly its rows. Intermediates exist for one expert at a time, which
keeps peak memory near inputs + outputs + one expert's [M, N] block.

Legend: T tokens, H hidden, E experts, K top-k, N up features, I intermediate, S = T*K,
M tokens of one expert.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kernel_moe.errors import UnsupportedInputError
from kernel_moe.reference.activations import activation_backward, apply_activation


def _expert_groups(
    topk_ids_TK: torch.Tensor, num_experts: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (expert, token indices [M], slot indices [M]) for each expert with tokens, in
    expert order and, within an expert, in slot order."""
    K = topk_ids_TK.shape[1]
    ids_S = topk_ids_TK.reshape(-1)
    if ids_S.numel() == 0:
        return
    counts_E = torch.bincount(ids_S, minlength=num_experts)
    if counts_E.numel() != num_experts:
        raise UnsupportedInputError(
            f"topk_ids holds expert id {int(ids_S.max())}, outside [0, {num_experts}) for w_up with {num_experts} experts"
        )
    order_S = torch.sort(ids_S, stable=True).indices
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n == 0:
            continue
        slots_M = order_S[start : start + n]
        yield e, slots_M // K, slots_M
        start += n


def _bias(b_EX: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if b_EX is None else b_EX[e]


def experts_forward(
    x_TH: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    w_up_ENH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * expert_{id[t, j]}(x[t]); accumulated in fp32, returned in x's dtype."""
    T, H = x_TH.shape
    acc_dtype = torch.promote_types(x_TH.dtype, torch.float32)
    out_TH = torch.zeros(T, H, dtype=acc_dtype, device=x_TH.device)
    weights_S = topk_weights_TK.reshape(-1)
    for e, tok_M, slot_M in _expert_groups(topk_ids_TK, w_up_ENH.shape[0]):
        x_MH = x_TH.index_select(0, tok_M)
        h_MN = F.linear(x_MH, w_up_ENH[e], _bias(b_up_EN, e))
        a_MI = apply_activation(h_MN, activation, glu, alpha, limit)
        y_MH = F.linear(a_MI, w_down_EHI[e], _bias(b_down_EH, e))
        y_MH = y_MH.to(acc_dtype).mul_(weights_S.index_select(0, slot_M).to(acc_dtype).unsqueeze(-1))
        out_TH.index_add_(0, tok_M, y_MH)
    return out_TH.to(x_TH.dtype)


def experts_backward(
    grad_out_TH: torch.Tensor,
    x_TH: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    w_up_ENH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of experts_forward, recomputing each expert's up-projection instead of storing it.

    Returns (grad_x [T, H], grad_topk_weights [T, K], grad_w_up [E, N, H], grad_w_down [E, H, I],
    grad_b_up [E, N] or [0], grad_b_down [E, H] or [0]).
    """
    T, H = x_TH.shape
    K = topk_ids_TK.shape[1]
    f32 = torch.promote_types(x_TH.dtype, torch.float32)
    grad_x_TH = torch.zeros(T, H, dtype=f32, device=x_TH.device)
    grad_w_S = torch.zeros(T * K, dtype=f32, device=x_TH.device)
    grad_w_up = torch.zeros(w_up_ENH.shape, dtype=w_up_ENH.dtype, device=w_up_ENH.device)
    grad_w_down = torch.zeros(w_down_EHI.shape, dtype=w_down_EHI.dtype, device=w_down_EHI.device)
    grad_b_up = torch.zeros_like(b_up_EN) if b_up_EN is not None else x_TH.new_zeros(0)
    grad_b_down = torch.zeros_like(b_down_EH) if b_down_EH is not None else x_TH.new_zeros(0)
    weights_S = topk_weights_TK.reshape(-1)
    for e, tok_M, slot_M in _expert_groups(topk_ids_TK, w_up_ENH.shape[0]):
        x_MH = x_TH.index_select(0, tok_M)
        g_MH = grad_out_TH.index_select(0, tok_M)
        h_MN = F.linear(x_MH, w_up_ENH[e], _bias(b_up_EN, e))
        a_MI = apply_activation(h_MN, activation, glu, alpha, limit)
        y_MH = F.linear(a_MI, w_down_EHI[e], _bias(b_down_EH, e))
        grad_w_S[slot_M] = (g_MH.to(f32) * y_MH.to(f32)).sum(dim=-1)
        dy_MH = (g_MH.to(f32) * weights_S.index_select(0, slot_M).to(f32).unsqueeze(-1)).to(w_down_EHI.dtype)
        grad_w_down[e] = (dy_MH.t() @ a_MI.to(dy_MH.dtype)).to(grad_w_down.dtype)
        if b_down_EH is not None:
            grad_b_down[e] = dy_MH.to(f32).sum(dim=0).to(grad_b_down.dtype)
        da_MI = (dy_MH @ w_down_EHI[e].to(dy_MH.dtype)).to(a_MI.dtype)
        dh_MN = activation_backward(h_MN, da_MI, activation, glu, alpha, limit).to(w_up_ENH.dtype)
        grad_w_up[e] = (dh_MN.t() @ x_MH.to(dh_MN.dtype)).to(grad_w_up.dtype)
        if b_up_EN is not None:
            grad_b_up[e] = dh_MN.to(f32).sum(dim=0).to(grad_b_up.dtype)
        grad_x_TH.index_add_(0, tok_M, (dh_MN @ w_up_ENH[e].to(dh_MN.dtype)).to(f32))
    return (
        grad_x_TH.to(x_TH.dtype),
        grad_w_S.view(T, K).to(topk_weights_TK.dtype),
        grad_w_up,
        grad_w_down,
        grad_b_up,
        grad_b_down,
    )


__all__ = ["experts_forward", "experts_backward"]
