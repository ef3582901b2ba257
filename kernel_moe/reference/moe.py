"""Plain-PyTorch MoE implementations: the truth for every test.

Legend: T tokens, H hidden size, E experts, K experts per token (top-k), I expert
intermediate size, N up-projection features (2*I when gated, I otherwise), S = T*K
token-expert slots.

Weight layout (the layout of ``kernel_moe::fused_experts``): ``w_up_ENH`` [E, N, H] and
``w_down_EHI`` [E, H, I], i.e. ``nn.Linear`` convention (out_features, in_features) per
expert; any strides are accepted. Biases are [E, N] and [E, H].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernel_moe.reference.activations import apply_activation


def expert_mlp(
    x_MH: torch.Tensor,
    w_up_NH: torch.Tensor,
    w_down_HI: torch.Tensor,
    b_up_N: torch.Tensor | None,
    b_down_H: torch.Tensor | None,
    activation: str,
    glu: str,
    alpha: float = 1.702,
    limit: float = math.inf,
) -> torch.Tensor:
    """One MLP (an expert, or a dense FFN) applied to M tokens: [M, H] -> [M, H]."""
    h_MN = F.linear(x_MH, w_up_NH, b_up_N)
    a_MI = apply_activation(h_MN, activation, glu, alpha, limit)
    return F.linear(a_MI, w_down_HI, b_down_H)


def naive_moe_experts(
    x_TH: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    w_up_ENH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    b_up_EN: torch.Tensor | None = None,
    b_down_EH: torch.Tensor | None = None,
    activation: str = "silu",
    glu: str = "concat",
    alpha: float = 1.702,
    limit: float = math.inf,
) -> torch.Tensor:
    """Routed experts by a loop over every (token, slot) pair, accumulated in fp32.

    Deliberately the simplest possible formulation: out[t] = sum_j w[t, j] * expert_{id[t, j]}(x[t]).
    Accumulated in fp32 (fp64 for fp64 input); returns [T, H] in the dtype of ``x_TH``.
    """
    T, H = x_TH.shape
    acc = torch.promote_types(x_TH.dtype, torch.float32)
    out_TH = torch.zeros(T, H, dtype=acc, device=x_TH.device)
    for e in range(w_up_ENH.shape[0]):
        tok, slot = torch.where(topk_ids_TK == e)
        if tok.numel() == 0:
            continue
        y_MH = expert_mlp(
            x_TH[tok],
            w_up_ENH[e],
            w_down_EHI[e],
            None if b_up_EN is None else b_up_EN[e],
            None if b_down_EH is None else b_down_EH[e],
            activation,
            glu,
            alpha,
            limit,
        )
        out_TH.index_add_(0, tok, y_MH.to(acc) * topk_weights_TK[tok, slot].to(acc).unsqueeze(-1))
    return out_TH.to(x_TH.dtype)


def sorted_moe_experts(
    x_TH: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    w_up_ENH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    b_up_EN: torch.Tensor | None = None,
    b_down_EH: torch.Tensor | None = None,
    activation: str = "silu",
    glu: str = "concat",
    alpha: float = 1.702,
    limit: float = math.inf,
) -> torch.Tensor:
    """Routed experts the way fused kernels do it: sort slots by expert, one GEMM per expert
    group over a permuted copy of the tokens, weight, un-permute and sum over K."""
    T, H = x_TH.shape
    K = topk_ids_TK.shape[1]
    E = w_up_ENH.shape[0]
    ids_S = topk_ids_TK.reshape(-1)
    order_S = torch.argsort(ids_S, stable=True)
    counts_E = torch.bincount(ids_S, minlength=E)
    xs_SH = x_TH[order_S // K]
    ys_SH = torch.empty(T * K, H, dtype=torch.float32, device=x_TH.device)
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n == 0:
            continue
        ys_SH[start : start + n] = expert_mlp(
            xs_SH[start : start + n],
            w_up_ENH[e],
            w_down_EHI[e],
            None if b_up_EN is None else b_up_EN[e],
            None if b_down_EH is None else b_down_EH[e],
            activation,
            glu,
            alpha,
            limit,
        ).float()
        start += n
    unsorted_SH = torch.empty_like(ys_SH)
    unsorted_SH[order_S] = ys_SH
    weighted_TKH = unsorted_SH.view(T, K, H) * topk_weights_TK.float().unsqueeze(-1)
    return weighted_TKH.sum(dim=1).to(x_TH.dtype)


def dense_mlp(
    x_TH: torch.Tensor,
    w_up_NH: torch.Tensor,
    w_down_HI: torch.Tensor,
    activation: str = "silu",
    glu: str = "concat",
) -> torch.Tensor:
    """A dense FFN (the baseline an MoE is compared with): [T, H] -> [T, H]."""
    h_TN = F.linear(x_TH, w_up_NH)
    a_TI = apply_activation(h_TN, activation, glu)
    return F.linear(a_TI, w_down_HI)
