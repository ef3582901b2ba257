"""Expert load: counts, imbalance statistics and auxiliary-loss-free balancing (DeepSeek-V3).

Legend: T tokens, E experts, K experts per token.

Aux-loss-free balancing keeps a per-expert selection bias that is added to the router
scores only to choose the experts (``route(logits, spec, selection_bias_E=bias)``), never
to weight them. After each step the bias of overloaded experts goes down and the bias of
underloaded experts goes up by a fixed rate, which steers tokens away from hot experts
without a loss term that competes with the language-model objective.
"""

from __future__ import annotations

import math

import torch


def expert_counts(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids [T, K] -> slots routed to each expert [E] int64, on the device, no host sync."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, torch.SymInt)) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r} must be an int >= 1")
    ids_S = ids_TK.reshape(-1).long()
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_TK.device)
    return counts_E.scatter_add_(0, ids_S, torch.ones_like(ids_S))


def update_expert_bias(
    bias_E: torch.Tensor,
    counts_E: torch.Tensor,
    rate: float,
    process_group: object | None = None,
) -> None:
    """Aux-loss-free balancing step, in place: ``bias_E += rate * sign(mean(counts) - counts)``.

    ``counts_E`` [E] are the slots each expert received since the last update (any
    numeric dtype). When ``torch.distributed`` is initialised the counts are first summed
    over the ranks of ``process_group`` (the default group when None), so every rank
    applies the same update and the biases stay identical; in a single process nothing is
    communicated. The caller's ``counts_E`` is not modified. An expert exactly at the mean
    keeps its bias; the others move by exactly ``rate``. Runs under ``torch.no_grad()``.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
        raise ValueError(f"rate={rate!r} must be a finite number >= 0")
    if bias_E.dim() != 1 or counts_E.shape != bias_E.shape:
        raise ValueError(
            f"bias_E {tuple(bias_E.shape)} and counts_E {tuple(counts_E.shape)} must both be [E]"
        )
    if not bias_E.dtype.is_floating_point:
        raise ValueError(f"bias_E.dtype={bias_E.dtype} must be floating point")
    with torch.no_grad():
        counts = counts_E.detach().to(device=bias_E.device, dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM, group=process_group)
        delta_E = torch.sign(counts.mean() - counts) * rate
        bias_E.add_(delta_E.to(bias_E.dtype))


def expert_load_stats(counts_E: torch.Tensor) -> dict[str, torch.Tensor]:
    """Imbalance of a load [E] as 0-dim fp64 tensors (no host sync; ``float()`` them to log).

    - ``cv``: coefficient of variation, population std / mean (0 when balanced).
    - ``max_over_mean``: load of the busiest expert over the mean (1 when balanced); the
      factor by which the slowest expert delays a synchronous step.
    - ``gini``: Gini coefficient of the load, 0 when uniform, (E-1)/E when one expert
      takes everything.
    A load that is zero everywhere reports 0, 0 and 0. This is the one implementation of these
    measures; ``kernel_moe.bench.stats`` reports them for benchmarks.
    """
    load_E = _load(counts_E)
    E = load_E.numel()
    mean = load_E.mean()
    positive = mean > 0
    safe_mean = torch.where(positive, mean, torch.ones_like(mean))
    zero = torch.zeros_like(mean)
    cv = torch.where(positive, load_E.std(correction=0) / safe_mean, zero)
    max_over_mean = torch.where(positive, load_E.max() / safe_mean, zero)
    sorted_E = torch.sort(load_E).values
    rank_E = torch.arange(1, E + 1, dtype=torch.float64, device=load_E.device)
    gini = torch.where(positive, ((2 * rank_E - E - 1) * sorted_E).sum() / (E * E * safe_mean), zero).clamp_min(0)
    return {"cv": cv, "max_over_mean": max_over_mean, "gini": gini}


def load_entropy(counts_E: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of a load [E] as a 0-dim fp64 tensor: the Shannon entropy of the share
    each expert gets over log(E); 1 when uniform (and for E == 1), 0 when one expert takes
    everything or the load is zero everywhere. No host sync."""
    load_E = _load(counts_E)
    E = load_E.numel()
    total = load_E.sum()
    positive = total > 0
    share_E = load_E / torch.where(positive, total, torch.ones_like(total))
    entropy = -torch.special.xlogy(share_E, share_E).sum()
    normalised = entropy / math.log(E) if E > 1 else torch.ones_like(entropy)
    return torch.where(positive, normalised, torch.zeros_like(entropy))


def _load(counts_E: torch.Tensor) -> torch.Tensor:
    """Counts [E] as fp64, detached; ValueError unless a non-empty 1-D tensor."""
    if counts_E.dim() != 1 or counts_E.numel() == 0:
        raise ValueError(f"counts_E must be a non-empty [E] tensor; got shape {tuple(counts_E.shape)}")
    return counts_E.detach().to(torch.float64)


class ExpertLoadTracker:
    """Accumulates per-expert slot counts over steps on the device, without host syncs.

    ``update(ids_TK)`` adds one step's routing; ``stats()`` gives :func:`expert_load_stats`
    of the accumulated load as tensors, ``summary()`` as Python floats (one sync, for logs
    and benchmarks); ``reset()`` starts over. ``counts_E`` is also what
    :func:`update_expert_bias` expects, accumulated between two bias updates.
    """

    def __init__(self, num_experts: int, device: torch.device | str | None = None) -> None:
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"ExpertLoadTracker.num_experts={num_experts!r} must be an int >= 1")
        self.num_experts = num_experts
        self.counts_E = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.steps = 0

    def update(self, ids_TK: torch.Tensor) -> None:
        """Add the slots of one routing step (expert ids [T, K], any integer dtype)."""
        if self.counts_E.device != ids_TK.device:
            self.counts_E = self.counts_E.to(ids_TK.device)
        self.counts_E.add_(expert_counts(ids_TK.detach(), self.num_experts))
        self.steps += 1

    def update_counts(self, counts_E: torch.Tensor) -> None:
        """Add precomputed per-expert counts [E] of one step."""
        if counts_E.shape != self.counts_E.shape:
            raise ValueError(f"counts_E shape {tuple(counts_E.shape)} must be ({self.num_experts},)")
        self.counts_E.add_(counts_E.detach().to(device=self.counts_E.device, dtype=torch.int64))
        self.steps += 1

    def reset(self) -> None:
        """Zero the accumulated counts and the step count."""
        self.counts_E.zero_()
        self.steps = 0

    def stats(self) -> dict[str, torch.Tensor]:
        """:func:`expert_load_stats` of the accumulated counts (0-dim tensors, no sync)."""
        return expert_load_stats(self.counts_E)

    def summary(self) -> dict[str, float]:
        """The stats as floats plus ``steps`` and ``total`` slots (synchronises once)."""
        stats = self.stats()
        values = torch.stack([*stats.values(), self.counts_E.sum().to(torch.float64)]).tolist()
        out = dict(zip([*stats.keys(), "total"], values))
        out["steps"] = float(self.steps)
        return out
