"""Load-balance measures of per-expert token counts, and latency summaries.

Legend: E experts. Counts are the number of (token, slot) pairs routed to each expert, so
they sum to T*K when no token is dropped.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def _as_counts(counts_E: Sequence[int | float]) -> list[float]:
    values = [float(c) for c in counts_E]
    if not values:
        raise ValueError("counts_E is empty; allowed: one non-negative count per expert (E >= 1)")
    if any(c < 0 or math.isnan(c) for c in values):
        raise ValueError(f"counts_E={list(counts_E)!r} has a negative or NaN count; allowed: counts >= 0")
    return values


def coefficient_of_variation(counts_E: Sequence[int | float]) -> float | None:
    """Population standard deviation / mean of the counts (0 = perfectly balanced).
    None when every count is 0."""
    c = _as_counts(counts_E)
    mean = sum(c) / len(c)
    if mean == 0:
        return None
    return statistics.pstdev(c) / mean


def gini(counts_E: Sequence[int | float]) -> float | None:
    """Gini coefficient of the counts: 0 when uniform, (E-1)/E when one expert gets everything.
    None when every count is 0."""
    c = sorted(_as_counts(counts_E))
    n, total = len(c), sum(c)
    if total == 0:
        return None
    weighted = sum((i + 1) * ci for i, ci in enumerate(c))
    return max(0.0, 2.0 * weighted / (n * total) - (n + 1) / n)


def max_over_mean(counts_E: Sequence[int | float]) -> float | None:
    """Load of the busiest expert relative to the average (1 = balanced, E = all on one).
    None when every count is 0."""
    c = _as_counts(counts_E)
    mean = sum(c) / len(c)
    if mean == 0:
        return None
    return max(c) / mean


def normalized_entropy(counts_E: Sequence[int | float]) -> float | None:
    """Shannon entropy of the routing distribution divided by log(E): 1 = uniform, 0 = one
    expert. 1.0 for E == 1; None when every count is 0."""
    c = _as_counts(counts_E)
    total = sum(c)
    if total == 0:
        return None
    if len(c) == 1:
        return 1.0
    h = -sum((ci / total) * math.log(ci / total) for ci in c if ci > 0)
    return h / math.log(len(c))


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
        return cls(
            cv=coefficient_of_variation(counts_E),
            gini=gini(counts_E),
            max_over_mean=max_over_mean(counts_E),
            normalized_entropy=normalized_entropy(counts_E),
            total=int(sum(_as_counts(counts_E))),
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
