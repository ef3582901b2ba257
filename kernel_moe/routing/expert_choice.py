"""Expert Choice routing: every expert picks its top-C tokens instead of every token its top-k experts.

Legend: T tokens, E experts, C tokens per expert (capacity).

Expert Choice (Zhou et al., 2022) is balanced by construction: each expert processes
exactly C tokens, while a token may be taken by any number of experts, from 0 to E. The
capacity is usually ``T * c / E`` for a capacity factor c (average experts per token),
see :func:`kernel_moe.routing.capacity.expert_capacity`. Selection looks at all tokens of
the batch, so it suits training and batched inference, not autoregressive decoding.
"""

from __future__ import annotations

import torch

from kernel_moe.routing.capacity import _check_int

SCORINGS = ("softmax", "sigmoid")


def expert_choice_route(
    logits_TE: torch.Tensor,
    capacity: int,
    scoring: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [E, C] fp32, token ids [E, C] int64).

    Scores are a softmax over the experts of each token (as in the Expert Choice paper) or a
    per-expert sigmoid, computed in fp32. Row e holds the C tokens with the highest score
    for expert e, best first (equal scores: earlier token first), and their scores as
    routing weights, differentiable with respect to the logits. ``capacity`` must be in
    [0, T].
    """
    if logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must be [T, E]; got shape {tuple(logits_TE.shape)}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r}; allowed: {', '.join(SCORINGS)}")
    T = logits_TE.shape[0]
    _check_int("capacity", capacity, 0)
    if capacity > T:
        raise ValueError(f"capacity={capacity!r} must be in [0, num_tokens={T}]")
    logits = logits_TE.float()
    scores_TE = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    # A stable sort rather than topk: equal scores go to the earlier token on every device.
    sorted_ET, order_ET = torch.sort(scores_TE.t(), dim=-1, descending=True, stable=True)
    return sorted_ET[:, :capacity], order_ET[:, :capacity]


def expert_choice_to_slots(
    weights_EC: torch.Tensor,
    token_ids_EC: torch.Tensor,
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert choices -> per-token padded slots (weights [T, E], ids [T, E] int64).

    The result has the top-k layout with K' = E, the upper bound of experts that can pick
    one token: slot j of every token is expert j (``ids[t, j] == j``), and its weight is
    the weight expert j gave token t, or 0 when expert j did not pick it. A top-k experts
    op can consume it unchanged since a weight-0 slot contributes nothing; note that such an
    op then does the work of a dense layer (T * E slots), so for speed prefer an experts op
    that takes the [E, C] form directly. No host sync, fixed shapes; the weights stay
    differentiable. ``token_ids_EC`` must hold distinct tokens per row (as
    :func:`expert_choice_route` returns).
    """
    if weights_EC.dim() != 2 or token_ids_EC.shape != weights_EC.shape:
        raise ValueError(
            f"weights_EC {tuple(weights_EC.shape)} and token_ids_EC {tuple(token_ids_EC.shape)} must both be [E, C]"
        )
    _check_int("num_tokens", num_tokens, 0)
    E = weights_EC.shape[0]
    device = weights_EC.device
    expert_E1 = torch.arange(E, device=device).unsqueeze(1)
    flat_EC = token_ids_EC.long() * E + expert_E1  # index of (token, expert) in a [T, E] row-major buffer
    weights_TE = (
        weights_EC.new_zeros(num_tokens * E)
        .scatter(0, flat_EC.reshape(-1), weights_EC.reshape(-1))
        .view(num_tokens, E)
    )
    ids_TE = torch.arange(E, device=device).expand(num_tokens, E).contiguous()
    return weights_TE, ids_TE
