"""Router auxiliary losses: Switch Transformer load balancing and ST-MoE router z-loss.

Legend: T tokens, E experts, K experts per token.

Both return an fp32 0-dim tensor, stay on the device and compile without graph breaks.
An empty batch (T = 0) gives 0 rather than NaN so that it can be summed over layers.
"""

from __future__ import annotations

import torch

from kernel_moe.routing.balancing import expert_counts


def load_balancing_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss ``E * sum_i f_i * P_i`` as an fp32 0-dim tensor.

    ``f_i`` is the fraction of the T*K slots routed to expert i (so sum_i f_i = 1) and
    ``P_i`` the mean router probability of expert i over the tokens (``probs_TE`` are the
    scores over all E experts, e.g. the softmax of the logits). The loss is 1 for a
    perfectly uniform router and E when one expert gets every slot and all the
    probability. It is differentiable through ``P`` only; ``f`` counts integers.

    transformers' ``load_balancing_loss_func`` divides the counts by T instead of T*K, so
    its value is K times this one.
    """
    if probs_TE.dim() != 2 or probs_TE.shape[1] != num_experts:
        raise ValueError(
            f"probs_TE shape {tuple(probs_TE.shape)} must be [T, num_experts={num_experts}]"
        )
    if ids_TK.dim() != 2 or ids_TK.shape[0] != probs_TE.shape[0]:
        raise ValueError(
            f"ids_TK shape {tuple(ids_TK.shape)} must be [T={probs_TE.shape[0]}, K]"
        )
    T, K = ids_TK.shape
    fraction_E = expert_counts(ids_TK, num_experts).float() / max(T * K, 1)
    mean_prob_E = probs_TE.float().sum(dim=0) / max(T, 1)
    return (fraction_E * mean_prob_E).sum() * num_experts


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits_t)^2``, fp32 0-dim.

    Penalises large router logits, which keeps the softmax out of its saturated, round-off
    sensitive range. Scale it by a small coefficient (ST-MoE uses 1e-3) before adding it to
    the training loss.
    """
    if logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must be [T, E]; got shape {tuple(logits_TE.shape)}")
    T = logits_TE.shape[0]
    lse_T = torch.logsumexp(logits_TE.float(), dim=-1)
    return lse_T.square().sum() / max(T, 1)
