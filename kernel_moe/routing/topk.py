"""Top-k router math: scores, expert selection and routing weights, in plain PyTorch.

Legend: T tokens, E experts, K experts per token, G expert groups.

Differentiable with respect to the logits (gradients reach the router weights through the
routing weights); the selected expert ids are integers and carry no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernel_moe.routing.sparsemixer import sparsemixer_route

SCORINGS = ("softmax", "sigmoid")
ROUTER_SCORINGS = SCORINGS + ("sqrtsoftplus", "sparsemixer")
"""Scorings a recognised router may use: SCORINGS (which the fused gating kernel and the public
gating modules take), ``sqrt(softplus(logit))`` per expert (DeepSeek-V4) and SparseMixer's
rounds of masked softmaxes (Phi-3.5-MoE, ``routing/sparsemixer.py``)."""
ORDERS = ("score_then_topk", "topk_then_score")
GROUP_SCORES = ("top2_sum", "max")
SELECTION_ON = ("scores", "logits")


@dataclass(frozen=True)
class TopKRouting:
    """How router logits [T, E] become routing weights [T, K] and expert ids [T, K].

    - ``scoring``: "softmax" over the experts, "sigmoid" per expert, or "sqrtsoftplus" per expert
      (``sqrt(softplus(logit))``).
    - ``order``: "score_then_topk" scores all E experts then takes the k best (Mixtral,
      Qwen, DeepSeek); "topk_then_score" takes the k largest logits then scores only them
      (GPT-OSS: softmax over the k selected logits).
    - ``renormalize``: divide the k selected weights by their sum.
    - ``scaling``: multiply the final weights (DeepSeek's routed_scaling_factor).
    - ``num_groups`` / ``topk_groups``: group-limited selection: experts are split into G
      groups, each group gets a score, and only experts of the ``topk_groups`` best groups
      can be selected.
    - ``group_score``: how a group is scored from its (biased) expert scores: "top2_sum", the
      sum of its two best (DeepSeek-V3), or "max", its best one (DeepSeek-V2).
    - ``score_dtype``: "float32" computes scores in fp32 (most models); "input" keeps the
      logits' dtype.
    - ``selection_on``: what the selection bias is added to before the top-k: "scores" (the
      softmax/sigmoid scores, DeepSeek-V3) or "logits" (the raw logits, scores taken after).
    - ``shared_ids``: S ids after the E routed ones that every token also takes (shared experts
      weighted per token, Inkling): the logits are [T, E + S]; the top-k is chosen among the first
      E, and the renormalisation divides by the sum of the k chosen and the S shared scores
      (:func:`shared_weights` gives the shared experts' weights).
    - ``mixer_eps``: SparseMixer's threshold (scoring "sparsemixer" only): each round's softmax
      keeps the experts within ``2 * mixer_eps`` (relative) of that round's best logit.
    A selection bias (aux-loss-free balancing, DeepSeek's ``e_score_correction_bias``) is
    passed to :func:`route` separately: it changes which experts are chosen, not the weights.
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    order: str = "score_then_topk"
    renormalize: bool = False
    scaling: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    score_dtype: str = "float32"
    group_score: str = "top2_sum"
    selection_on: str = "scores"
    mixer_eps: float = 0.0
    shared_ids: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"TopKRouting.num_experts={self.num_experts!r} must be an int >= 1")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"TopKRouting.top_k={self.top_k!r} must be an int in [1, num_experts={self.num_experts}]"
            )
        if self.scoring not in ROUTER_SCORINGS:
            raise ValueError(f"TopKRouting.scoring={self.scoring!r}; allowed: {', '.join(ROUTER_SCORINGS)}")
        if self.order not in ORDERS:
            raise ValueError(f"TopKRouting.order={self.order!r}; allowed: {', '.join(ORDERS)}")
        if self.order == "topk_then_score" and self.scoring != "softmax":
            raise ValueError("TopKRouting.order='topk_then_score' is defined for scoring='softmax' only")
        if self.num_groups < 1 or self.num_experts % self.num_groups != 0:
            raise ValueError(
                f"TopKRouting.num_groups={self.num_groups!r} must be >= 1 and divide num_experts={self.num_experts}"
            )
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(
                f"TopKRouting.topk_groups={self.topk_groups!r} must be in [1, num_groups={self.num_groups}]"
            )
        if self.num_groups > 1 and self.top_k > self.topk_groups * (self.num_experts // self.num_groups):
            raise ValueError(
                f"TopKRouting.top_k={self.top_k} exceeds the experts in the {self.topk_groups} selectable groups"
            )
        if self.score_dtype not in ("float32", "input"):
            raise ValueError(f"TopKRouting.score_dtype={self.score_dtype!r}; allowed: float32, input")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"TopKRouting.group_score={self.group_score!r}; allowed: {', '.join(GROUP_SCORES)}")
        if self.selection_on not in SELECTION_ON:
            raise ValueError(f"TopKRouting.selection_on={self.selection_on!r}; allowed: {', '.join(SELECTION_ON)}")
        if self.shared_ids and (self.shared_ids < 0 or self.scoring not in ("sigmoid", "sqrtsoftplus")
                                or not self.renormalize or self.order != "score_then_topk" or self.num_groups != 1
                                or self.selection_on != "scores"):
            raise ValueError("TopKRouting.shared_ids needs a per-expert scoring (sigmoid, sqrtsoftplus) with "
                             f"renormalisation and no groups, got {self!r}")
        if self.scoring == "sparsemixer" and (self.order != "score_then_topk" or self.num_groups != 1
                                              or self.renormalize or not self.mixer_eps >= 0):
            raise ValueError("TopKRouting.scoring='sparsemixer' takes no groups, renormalisation or top-k order "
                             f"and a mixer_eps >= 0, got {self!r}")

    def describe(self) -> str:
        """A short human-readable form for reports, e.g. 'softmax>top2>renorm'."""
        topk = f"top{self.top_k}"
        scoring = f"sparsemixer(eps={self.mixer_eps:g})" if self.scoring == "sparsemixer" else self.scoring
        parts = [scoring, topk] if self.order == "score_then_topk" else [topk, scoring]
        if self.num_groups > 1:
            group_score = "(max)" if self.group_score == "max" else ""
            parts.insert(1, f"groups{self.topk_groups}/{self.num_groups}{group_score}")
        if self.selection_on == "logits":
            parts.insert(1, "bias-on-logits")
        if self.renormalize:
            parts.append(f"renorm(+{self.shared_ids} shared)" if self.shared_ids else "renorm")
        if self.scaling != 1.0:
            parts.append(f"x{self.scaling:g}")
        return ">".join(parts)


def _group_limited_mask(choice_TE: torch.Tensor, spec: TopKRouting) -> torch.Tensor:
    """Keep only experts of the best ``topk_groups`` groups: returns choice scores with the
    others set to -inf. A group's score is the sum of its two best expert scores
    (``group_score="top2_sum"``) or its best one (``"max"``)."""
    T, E = choice_TE.shape
    G = spec.num_groups
    per_group = E // G
    grouped_TGe = choice_TE.view(T, G, per_group)
    if spec.group_score == "max":
        group_score_TG = grouped_TGe.amax(dim=-1)
    else:
        group_score_TG = grouped_TGe.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    group_idx_Tg = group_score_TG.topk(spec.topk_groups, dim=-1, sorted=False).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, group_idx_Tg, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, G, per_group).reshape(T, E)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))


def route(
    logits_TE: torch.Tensor,
    spec: TopKRouting,
    selection_bias_E: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (routing weights [T, K], expert ids [T, K] int64).

    Weights are in fp32 when ``spec.score_dtype == "float32"``, else in the logits' dtype.
    """
    logits = logits_TE.float() if spec.score_dtype == "float32" else logits_TE
    if spec.scoring == "sparsemixer":
        if selection_bias_E is not None:
            raise ValueError("sparsemixer routing takes no selection bias")
        weights_TK, ids_TK = sparsemixer_route(logits, spec.top_k, spec.mixer_eps)
    elif spec.shared_ids:
        scores_TG = _scores(logits, spec)
        choice_TE = scores_TG[:, : spec.num_experts]
        choice_TE = choice_TE if selection_bias_E is None else choice_TE + selection_bias_E
        ids_TK = choice_TE.topk(spec.top_k, dim=-1).indices
        weights_TK = scores_TG.gather(1, ids_TK) / _shared_denominator(scores_TG, ids_TK, spec)
    elif spec.order == "topk_then_score":
        choice_TE = logits if selection_bias_E is None else logits + selection_bias_E
        if spec.num_groups > 1:
            choice_TE = _group_limited_mask(choice_TE, spec)
        ids_TK = choice_TE.topk(spec.top_k, dim=-1).indices
        weights_TK = torch.softmax(logits.gather(1, ids_TK), dim=-1)
    else:
        scores_TE = _scores(logits, spec)
        choice_TE = logits if spec.selection_on == "logits" else scores_TE
        if selection_bias_E is not None:
            choice_TE = choice_TE + selection_bias_E
        if spec.num_groups > 1:
            choice_TE = _group_limited_mask(choice_TE, spec)
        if selection_bias_E is None and spec.num_groups == 1 and spec.selection_on == "scores":
            weights_TK, ids_TK = scores_TE.topk(spec.top_k, dim=-1)
        else:
            ids_TK = choice_TE.topk(spec.top_k, dim=-1).indices
            weights_TK = scores_TE.gather(1, ids_TK)
        weights_TK = _renormalized(weights_TK, spec)
    if spec.scaling != 1.0:
        weights_TK = weights_TK * spec.scaling
    return weights_TK, ids_TK


def _scores(logits_TE: torch.Tensor, spec: TopKRouting) -> torch.Tensor:
    if spec.scoring == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if spec.scoring == "sqrtsoftplus":
        return F.softplus(logits_TE).sqrt()
    return torch.sigmoid(logits_TE)


def _shared_denominator(scores_TG: torch.Tensor, ids_TK: torch.Tensor, spec: TopKRouting) -> torch.Tensor:
    """[T, 1]: the chosen experts' scores plus the shared ones' (``spec.shared_ids``)."""
    return scores_TG.gather(1, ids_TK).sum(dim=-1, keepdim=True) + scores_TG[:, spec.num_experts:].sum(
        dim=-1, keepdim=True)


def shared_weights(logits_TG: torch.Tensor, ids_TK: torch.Tensor, spec: TopKRouting) -> torch.Tensor:
    """The weights [T, S] of the shared ids (``spec.shared_ids``) for routed ids ``ids_TK``: their
    scores over the same denominator as the routed weights, scaled alike."""
    logits = logits_TG.float() if spec.score_dtype == "float32" else logits_TG
    scores_TG = _scores(logits, spec)
    weights_TS = scores_TG[:, spec.num_experts:] / _shared_denominator(scores_TG, ids_TK, spec)
    return weights_TS * spec.scaling if spec.scaling != 1.0 else weights_TS


def _renormalized(weights_TK: torch.Tensor, spec: TopKRouting) -> torch.Tensor:
    if not spec.renormalize:
        return weights_TK
    denom = weights_TK.sum(dim=-1, keepdim=True)
    if spec.scoring != "softmax":  # per-expert scores need not sum to anything: keep the division finite
        denom = denom + 1e-20
    return weights_TK / denom


def routing_weights(logits_TE: torch.Tensor, ids_TK: torch.Tensor, spec: TopKRouting) -> torch.Tensor:
    """The weights ``spec`` gives to the experts ``ids_TK`` [T, K] (chosen by any rule): what
    :func:`route` returns for its own choice, for another one (random routing)."""
    if spec.scoring == "sparsemixer":
        raise ValueError("sparsemixer routing weighs only the experts of its own rounds, not a given choice")
    logits = logits_TE.float() if spec.score_dtype == "float32" else logits_TE
    if spec.order == "topk_then_score":
        weights_TK = torch.softmax(logits.gather(1, ids_TK), dim=-1)
    elif spec.shared_ids:
        scores_TG = _scores(logits, spec)
        weights_TK = scores_TG.gather(1, ids_TK) / _shared_denominator(scores_TG, ids_TK, spec)
    else:
        weights_TK = _renormalized(_scores(logits, spec).gather(1, ids_TK), spec)
    return weights_TK * spec.scaling if spec.scaling != 1.0 else weights_TK


RoutingSpec = TopKRouting  # deprecated alias (renamed: it says how logits become top-k weights and ids)
