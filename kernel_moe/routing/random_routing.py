"""Random routing (training only): with probability p a token's last slot goes to a uniformly
random expert the token did not choose, so that every expert keeps receiving tokens and a
training signal while the router learns (a guard against expert collapse).

Legend: T tokens, E experts, K experts per token.

The replaced slot is weighted as the routing weights its expert (:func:`routing_weights`), so the
router's gradient reaches the random expert's score too. Draws come from torch's global RNG
(``torch.manual_seed`` makes them reproducible); fixed shapes, no host sync.
"""

from __future__ import annotations

import torch

from kernel_moe.routing.topk import TopKRouting, routing_weights


def random_routing(
    logits_TE: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    spec: TopKRouting,
    probability: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [T, K], ids [T, K], tokens rerouted: a 0-dim int64 tensor). With K == E every
    expert is already chosen and nothing changes."""
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"random_routing probability={probability!r}; allowed: a number in [0, 1)")
    T, K = ids_TK.shape
    E = logits_TE.shape[1]
    if probability == 0.0 or K >= E:
        return weights_TK, ids_TK, torch.zeros((), dtype=torch.int64, device=ids_TK.device)
    picked_T = torch.rand(T, device=ids_TK.device) < probability
    noise_TE = torch.rand(T, E, device=ids_TK.device).scatter(1, ids_TK, -1.0)  # never a chosen expert
    random_T = noise_TE.argmax(dim=-1)
    last_T = torch.where(picked_T, random_T, ids_TK[:, -1])
    new_ids_TK = torch.cat([ids_TK[:, :-1], last_T.unsqueeze(1)], dim=1)
    new_weights_TK = routing_weights(logits_TE, new_ids_TK, spec).to(weights_TK.dtype)
    weights_TK = torch.where(picked_T.unsqueeze(1), new_weights_TK, weights_TK)
    return weights_TK, new_ids_TK, picked_T.sum(dtype=torch.int64)


__all__ = ["random_routing"]
