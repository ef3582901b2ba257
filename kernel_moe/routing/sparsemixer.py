"""SparseMixer routing (Phi-3.5-MoE) at inference: k rounds of choosing the best remaining
expert, each weighted by a softmax over the experts whose logit is close to that round's best.

In round j the best remaining logit m is chosen; an expert e takes part in that round's softmax
when ``(m - s_e) / max(|s_e|, m) <= 2 * eps`` and it was not chosen in an earlier round; the
chosen expert's weight is its softmax probability there. The masks carry no gradient; the
weights are differentiable in the logits through the softmax. (Training samples the experts and
has its own backward: a block routing this way keeps running its original module in training.)

Legend: T tokens, E experts, K rounds (top-k).
"""

from __future__ import annotations

import torch


def sparsemixer_route(logits_TE: torch.Tensor, top_k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [T, E] -> (weights [T, K] in the logits' dtype, expert ids [T, K] int64)."""
    remaining_TE = logits_TE
    weights, ids = [], []
    for _ in range(top_k):
        with torch.no_grad():
            best_T1, best_id_T1 = remaining_TE.max(dim=-1, keepdim=True)
            factor_TE = logits_TE.abs().clamp(min=best_T1)
            far_TE = ((best_T1 - logits_TE) / factor_TE) > (2 * eps)
        probs_TE = torch.softmax(remaining_TE.masked_fill(far_TE, float("-inf")), dim=-1)
        weights.append(probs_TE.gather(-1, best_id_T1))
        ids.append(best_id_T1)
        remaining_TE = torch.scatter(remaining_TE, -1, best_id_T1, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(ids, dim=-1)


__all__ = ["sparsemixer_route"]
