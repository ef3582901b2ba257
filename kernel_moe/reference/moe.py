"""Plain-PyTorch MoE implementations: the truth for every test.

Legend: T tokens, H hidden size, E experts, K experts per token (top-k), I expert
intermediate size, N up-projection features (2*I when gated, I otherwise), S = T*K
token-expert slots.

Weight layout (the layout of ``kernel_moe::fused_experts``): ``w_up_ENH`` [E, N, H] and
``w_down_EHI`` [E, H, I], i.e. ``nn.Linear`` convention (out_features, in_features) per
expert; any strides are accepted. Biases are [E, N] and [E, H].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernel_moe.kernels.contract import Activation, StackedExperts
from kernel_moe.reference.activations import apply_activation


def expert_mlp(
    x_MH: torch.Tensor,
    w_up_NH: torch.Tensor,
    w_down_HI: torch.Tensor,
    b_up_N: torch.Tensor | None = None,
    b_down_H: torch.Tensor | None = None,
    activation: Activation = Activation(),
) -> torch.Tensor:
    """One MLP (an expert, or a dense FFN) applied to M tokens: [M, H] -> [M, H]."""
    h_MN = F.linear(x_MH, w_up_NH, b_up_N)
    a = activation
    return F.linear(apply_activation(h_MN, a.kind, a.glu, a.alpha, a.limit, (a.gate_softcap, a.up_softcap)),
                    w_down_HI, b_down_H)


def naive_moe_experts(
    x_TH: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    w_up_ENH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    b_up_EN: torch.Tensor | None = None,
    b_down_EH: torch.Tensor | None = None,
    activation: Activation = Activation(),
) -> torch.Tensor:
    """Routed experts by a loop over every expert and its (token, slot) pairs, accumulated in fp32.

    Deliberately the simplest possible formulation: out[t] = sum_j w[t, j] * expert_{id[t, j]}(x[t]),
    where a slot whose id is outside [0, E) is dropped (no expert takes it). Accumulated in fp32
    (fp64 for fp64 input); returns [T, H] in the dtype of ``x_TH``.
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
        )
        out_TH.index_add_(0, tok, y_MH.to(acc) * topk_weights_TK[tok, slot].to(acc).unsqueeze(-1))
    return out_TH.to(x_TH.dtype)


def naive_post_norm_experts(x_TH: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                            experts: StackedExperts) -> torch.Tensor:
    """Routed experts with a post-expert norm (``experts.post_norm`` s [H]), by a loop over experts:
    out[t] = sum_j w[t, j] * rmsnorm(s * expert_{id[t, j]}(x[t])), the norm
    ``z * rsqrt(mean(z^2) + eps)`` of each expert output in fp32, before its routing weight."""
    T, H = x_TH.shape
    acc = torch.promote_types(x_TH.dtype, torch.float32)
    out_TH = torch.zeros(T, H, dtype=acc, device=x_TH.device)
    b_up, b_down = experts.b_up, experts.b_down
    for e in range(experts.w_up.shape[0]):
        tok, slot = torch.where(topk_ids_TK == e)
        if tok.numel() == 0:
            continue
        y_MH = expert_mlp(x_TH[tok], experts.w_up[e], experts.w_down[e], None if b_up is None else b_up[e],
                          None if b_down is None else b_down[e], experts.activation)
        z_MH = y_MH.to(acc) * experts.post_norm.to(acc)
        n_MH = z_MH / torch.sqrt(z_MH.pow(2).mean(dim=-1, keepdim=True) + experts.post_norm_eps)
        out_TH.index_add_(0, tok, n_MH * topk_weights_TK[tok, slot].to(acc).unsqueeze(-1))
    return out_TH.to(x_TH.dtype)
