"""Load-balance measures of per-expert token counts, and latency summaries.

Legend: E experts. Counts are the number of (token, slot) pairs routed to each expert, so
they sum to T*K when no token is dropped. The load measures are those of
:mod:`kernel_moe.routing.balancing` (the one implementation), as Python floats for reports,
and None where they are undefined (every count 0).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from kernel_moe.routing.balancing import expert_load_stats, load_entropy


def _load_E(counts_E: Sequence[int | float]) -> torch.Tensor:
    """The counts as an fp64 tensor [E]; ValueError when empty, negative or NaN."""
    values = [float(c) for c in counts_E]
    if not values:
        raise ValueError("counts_E is empty; allowed: one non-negative count per expert (E >= 1)")
    if any(c < 0 or math.isnan(c) for c in values):
        raise ValueError(f"counts_E={list(counts_E)!r} has a negative or NaN count; allowed: counts >= 0")
    return torch.tensor(values, dtype=torch.float64)


def _measures(counts_E: Sequence[int | float]) -> dict[str, float] | None:
    """Every load measure of the counts as floats, from :mod:`kernel_moe.routing.balancing` (the
    one implementation); None when every count is 0 (the measures are then undefined)."""
    load_E = _load_E(counts_E)
    if not load_E.sum() > 0:
        return None
    measures = {name: float(v) for name, v in expert_load_stats(load_E).items()}
    measures["normalized_entropy"] = float(load_entropy(load_E))
    return measures


def _measure(counts_E: Sequence[int | float], name: str) -> float | None:
    measures = _measures(counts_E)
    return None if measures is None else measures[name]


def coefficient_of_variation(counts_E: Sequence[int | float]) -> float | None:
    """Population standard deviation / mean of the counts (0 = perfectly balanced).
    None when every count is 0."""
    return _measure(counts_E, "cv")


def gini(counts_E: Sequence[int | float]) -> float | None:
    """Gini coefficient of the counts: 0 when uniform, (E-1)/E when one expert gets everything.
    None when every count is 0."""
    return _measure(counts_E, "gini")


def max_over_mean(counts_E: Sequence[int | float]) -> float | None:
    """Load of the busiest expert relative to the average (1 = balanced, E = all on one).
    None when every count is 0."""
    return _measure(counts_E, "max_over_mean")


def normalized_entropy(counts_E: Sequence[int | float]) -> float | None:
    """Shannon entropy of the routing distribution divided by log(E): 1 = uniform, 0 = one
    expert. 1.0 for E == 1; None when every count is 0."""
    return _measure(counts_E, "normalized_entropy")


@dataclass(frozen=True)
class LoadBalance:
    """The load-balance measures of one layer's per-expert counts."""

    cv: float | None
    gini: float | None
    max_over_mean: float | None
    normalized_entropy: float | None
    total: int

    @classmethod
    def from_counts(cls, counts_E: Sequence[int | float]) -> LoadBalance:
        measures = _measures(counts_E) or {}
        return cls(
            cv=measures.get("cv"),
            gini=measures.get("gini"),
            max_over_mean=measures.get("max_over_mean"),
            normalized_entropy=measures.get("normalized_entropy"),
            total=int(_load_E(counts_E).sum()),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not samples:
        raise ValueError("samples is empty; allowed: at least one sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q={q!r}; allowed: a number in [0, 100]")
    s = sorted(float(v) for v in samples)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class LatencySummary:
    """Summary of per-call latencies in seconds."""

    median_s: float
    p10_s: float
    p90_s: float
    mean_s: float
    stdev_s: float
    n: int

    @classmethod
    def from_samples(cls, samples_s: Sequence[float]) -> LatencySummary:
        if not samples_s:
            raise ValueError("samples_s is empty; allowed: at least one latency sample")
        if any(not math.isfinite(v) or v < 0 for v in samples_s):
            raise ValueError("samples_s has a negative or non-finite latency; allowed: finite values >= 0")
        return cls(
            median_s=statistics.median(samples_s),
            p10_s=percentile(samples_s, 10),
            p90_s=percentile(samples_s, 90),
            mean_s=statistics.fmean(samples_s),
            stdev_s=statistics.stdev(samples_s) if len(samples_s) > 1 else 0.0,
            n=len(samples_s),
        )

    def to_dict(self) -> dict:
        return asdict(self)
