"""Extra outputs a block returns after its output, computed from its routing.

Blocks return more than their output: the router logits, the top-k weights or ids, per-expert
counts, an auxiliary loss. Each is one :class:`RoutingExtra` value, and :func:`routing_extra`
computes it from the routing of one call, so that a fused layer returns what the original
returned (values, dtype and gradients: everything differentiable stays in the graph).

Legend: T tokens, E experts (the ids the router chooses from), K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernel_moe.routing.balancing import expert_counts
from kernel_moe.routing.losses import load_balancing_loss, router_z_loss

EXTRA_KINDS = ("logits", "probs", "weights", "ids", "counts", "loss")
COUNT_SCALES = ("none", "slots", "tokens")


@dataclass(frozen=True)
class RoutingExtra:
    """One extra output of a block, by kind:

    - "logits": the router logits [T, E]; "probs": their softmax over all experts [T, E];
    - "weights": the top-k routing weights [T, K]; "ids": the top-k expert ids [T, K];
    - "counts": slots routed to each expert [E], divided by nothing (``per="none"``), by the
      T * K slots (``per="slots"``) or by the T tokens (``per="tokens"``);
    - "loss": a 0-dim ``balance * LB + z * Z``: LB the Switch load-balancing loss
      ``E * sum_i f_i * P_i`` (f the fraction of all slots routed to expert i, or of the tokens'
      first choices when ``top1``; P the mean softmax probability), Z the router z-loss
      ``mean(logsumexp(logits)^2)``.

    ``dtype``: the dtype the block returns it in (None: as computed).
    """

    kind: str
    dtype: torch.dtype | None = None
    per: str = "none"
    balance: float = 0.0
    top1: bool = False
    z: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in EXTRA_KINDS:
            raise ValueError(f"RoutingExtra.kind={self.kind!r}; allowed: {', '.join(EXTRA_KINDS)}")
        if self.per not in COUNT_SCALES:
            raise ValueError(f"RoutingExtra.per={self.per!r}; allowed: {', '.join(COUNT_SCALES)}")

    @property
    def needs_choice(self) -> bool:
        """Whether it is computed from each token's top-k choice (not from the logits alone)."""
        return self.kind in ("weights", "ids", "counts") or (self.kind == "loss" and self.balance != 0.0)

    def describe(self) -> str:
        if self.kind == "counts" and self.per != "none":
            return f"counts/{self.per}"
        if self.kind != "loss":
            return self.kind
        terms = []
        if self.balance:
            terms.append(f"{self.balance:.4g}*balance" + ("(top1)" if self.top1 else ""))
        if self.z:
            terms.append(f"{self.z:.4g}*z")
        return "loss " + "+".join(terms)


def routing_extra(extra: RoutingExtra, logits_TE: torch.Tensor, weights_TK: torch.Tensor | None,
                  ids_TK: torch.Tensor | None) -> torch.Tensor:
    """The value of ``extra`` for one call's logits [T, E], top-k weights [T, K] and ids [T, K]
    (no host sync; differentiable through the logits and weights)."""
    kind = extra.kind
    if kind == "logits":
        value = logits_TE
    elif kind == "probs":
        value = torch.softmax(logits_TE.float(), dim=-1)
    elif kind == "weights":
        value = weights_TK
    elif kind == "ids":
        value = ids_TK
    elif kind == "counts":
        value = expert_counts(ids_TK, logits_TE.shape[-1])
        if extra.per != "none":
            T, K = ids_TK.shape
            value = value.float() / max(T * K if extra.per == "slots" else T, 1)
    else:
        value = logits_TE.new_zeros((), dtype=torch.float32)
        if extra.balance:
            probs_TE = torch.softmax(logits_TE.float(), dim=-1)
            chosen_TK = ids_TK[:, :1] if extra.top1 else ids_TK
            value = value + extra.balance * load_balancing_loss(probs_TE, chosen_TK, logits_TE.shape[-1])
        if extra.z:
            value = value + extra.z * router_z_loss(logits_TE)
    return value if extra.dtype is None else value.to(extra.dtype)


__all__ = ["COUNT_SCALES", "EXTRA_KINDS", "RoutingExtra", "routing_extra"]
