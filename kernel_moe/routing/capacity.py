"""Expert capacity: how many token-expert slots one expert may process, and token dropping.

Legend: T tokens, E experts, K experts per token, S = T*K token-expert slots, C capacity.

With a capacity the work per expert is bounded by a number known before the data is seen
(Switch Transformer, GShard); slots beyond it are dropped. Everything here keeps fixed
shapes and stays on the device, so it compiles with ``torch.compile(fullgraph=True)`` and
never synchronises with the host.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

PRIORITIES = ("score", "position")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")


def expert_capacity(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    capacity_factor: float,
    min_capacity: int = 0,
) -> int:
    """Slots one expert may take: ``ceil(capacity_factor * T * K / E)``, clamped to [min_capacity, T].

    ``capacity_factor`` 1.0 gives every expert exactly its share of a perfectly balanced
    load; larger factors leave head-room for imbalance. The result never exceeds T since an
    expert sees each token at most once, so ``min_capacity`` above T is clamped to T too.
    The product is computed in exact rational arithmetic (the factor is read as the nearest
    fraction with a denominator up to 10**6), so that e.g. 1.1 * 100 / 11 gives 10, not 11.
    For Expert Choice routing (each expert picks tokens), pass ``top_k=1`` and the paper's
    capacity factor c (average experts per token) if c <= E.
    """
    _check_int("num_tokens", num_tokens, 0)
    _check_int("num_experts", num_experts, 1)
    _check_int("top_k", top_k, 1)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k!r} must be in [1, num_experts={num_experts}]")
    _check_int("min_capacity", min_capacity, 0)
    if (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, (int, float))
        or not math.isfinite(capacity_factor)
        or capacity_factor <= 0
    ):
        raise ValueError(f"capacity_factor={capacity_factor!r} must be a finite number > 0")
    factor = Fraction(capacity_factor).limit_denominator(10**6)
    numerator = num_tokens * top_k * factor.numerator
    denominator = num_experts * factor.denominator
    capacity = -(-numerator // denominator)  # ceil for non-negative integers
    return min(max(capacity, min_capacity), num_tokens)


def apply_capacity(
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    priority: str = "score",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the slots that exceed each expert's capacity.

    Returns ``(weights_TK, ids_TK, dropped_TK, num_dropped)``:

    - ``weights_TK``: the input weights with dropped slots set to 0, so a dropped slot adds
      nothing to the output; gradients flow to the kept weights only.
    - ``ids_TK``: unchanged. A dropped slot keeps a valid expert id, so the experts op needs
      no special case (no -1 sentinel): it computes the slot and multiplies it by 0. A
      kernel that wants to skip the work can read ``dropped_TK``.
    - ``dropped_TK``: bool, True where the slot was dropped.
    - ``num_dropped``: int64 0-dim tensor on the device (no host sync).

    ``priority`` decides which slots of an over-full expert survive:
    "score" keeps the slots with the highest routing weight first (batch-prioritized
    routing, V-MoE), ties by slot order; "position" keeps the earliest slots first, in
    slot order ``t * K + j`` (Switch Transformer / GShard).

    Implemented with a stable sort by priority, a stable sort by expert and an exclusive
    cumulative count per expert: fixed shapes, no data-dependent control flow.
    """
    if weights_TK.dim() != 2 or ids_TK.shape != weights_TK.shape:
        raise ValueError(
            f"weights_TK {tuple(weights_TK.shape)} and ids_TK {tuple(ids_TK.shape)} must both be [T, K]"
        )
    if ids_TK.dtype.is_floating_point or ids_TK.dtype == torch.bool:
        raise ValueError(f"ids_TK.dtype={ids_TK.dtype} must be an integer dtype")
    _check_int("num_experts", num_experts, 1)
    _check_int("capacity", capacity, 0)
    if priority not in PRIORITIES:
        raise ValueError(f"priority={priority!r}; allowed: {', '.join(PRIORITIES)}")

    S = weights_TK.numel()
    device = weights_TK.device
    ids_S = ids_TK.reshape(-1).long()
    slot_S = torch.arange(S, device=device)

    if priority == "score":
        # Highest weight first; the stable sort keeps slot order among equal weights.
        by_priority_S = torch.argsort(weights_TK.detach().reshape(-1), descending=True, stable=True)
    else:
        by_priority_S = slot_S
    ids_by_priority_S = ids_S[by_priority_S]
    # Group by expert, keeping priority order inside each expert.
    within_S = torch.argsort(ids_by_priority_S, stable=True)
    order_S = by_priority_S[within_S]  # original slot index, sorted by (expert, priority)
    sorted_ids_S = ids_by_priority_S[within_S]

    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts_E.scatter_add_(0, ids_S, torch.ones_like(ids_S))
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E  # exclusive prefix sum
    rank_sorted_S = slot_S - starts_E[sorted_ids_S]  # position of the slot inside its expert
    rank_S = torch.empty_like(rank_sorted_S).scatter_(0, order_S, rank_sorted_S)

    dropped_TK = (rank_S >= capacity).view(weights_TK.shape)
    kept_weights_TK = weights_TK.masked_fill(dropped_TK, 0)
    num_dropped = dropped_TK.sum(dtype=torch.int64)
    return kept_weights_TK, ids_TK, dropped_TK, num_dropped
