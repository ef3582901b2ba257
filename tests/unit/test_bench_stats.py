"""Load-balance measures and latency summaries of kernel_moe.bench.stats."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_moe.bench.stats import (
    LatencySummary,
    LoadBalance,
    coefficient_of_variation,
    gini,
    max_over_mean,
    normalized_entropy,
    percentile,
)
from kernel_moe.routing.balancing import expert_load_stats, load_entropy


@pytest.mark.parametrize("num_experts", [1, 2, 7, 64])
def test_uniform_counts_are_perfectly_balanced(num_experts):
    counts = [12] * num_experts
    assert gini(counts) == pytest.approx(0.0, abs=1e-12)
    assert coefficient_of_variation(counts) == pytest.approx(0.0, abs=1e-12)
    assert max_over_mean(counts) == pytest.approx(1.0)
    assert normalized_entropy(counts) == pytest.approx(1.0)


@pytest.mark.parametrize("num_experts", [2, 3, 8, 64])
@pytest.mark.parametrize("hot", [0, -1])
def test_single_expert_gets_everything(num_experts, hot):
    counts = [0] * num_experts
    counts[hot] = 1000
    assert gini(counts) == pytest.approx((num_experts - 1) / num_experts)
    assert max_over_mean(counts) == pytest.approx(num_experts)
    assert normalized_entropy(counts) == pytest.approx(0.0, abs=1e-12)
    # population stdev of (T, 0, ..., 0) over mean T/E is sqrt(E - 1)
    assert coefficient_of_variation(counts) == pytest.approx(math.sqrt(num_experts - 1))


def test_hand_computed_values():
    counts = [1, 2, 3, 4]
    # sorted ascending, G = 2 * sum(i * c_i) / (n * sum) - (n + 1) / n with i = 1..n
    assert gini(counts) == pytest.approx(2 * (1 + 4 + 9 + 16) / (4 * 10) - 5 / 4)
    assert max_over_mean(counts) == pytest.approx(4 / 2.5)
    assert coefficient_of_variation(counts) == pytest.approx(math.sqrt(1.25) / 2.5)
    p = [c / 10 for c in counts]
    assert normalized_entropy(counts) == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(4))


def test_order_of_experts_does_not_matter():
    a, b = [5, 0, 9, 1, 3], [9, 3, 1, 5, 0]
    assert gini(a) == pytest.approx(gini(b))
    assert LoadBalance.from_counts(a).to_dict() == pytest.approx(LoadBalance.from_counts(b).to_dict())


def test_measures_are_those_of_the_routing_load_statistics():
    counts = [3, 0, 7, 1, 9]
    ours = LoadBalance.from_counts(counts)
    theirs = expert_load_stats(torch.tensor(counts))
    assert (ours.cv, ours.gini, ours.max_over_mean) == tuple(theirs[k].item() for k in ("cv", "gini", "max_over_mean"))
    assert ours.normalized_entropy == load_entropy(torch.tensor(counts)).item()


def test_all_zero_counts_are_undefined_not_zero():
    lb = LoadBalance.from_counts([0, 0, 0])
    assert lb.cv is None and lb.gini is None and lb.max_over_mean is None and lb.normalized_entropy is None
    assert lb.total == 0


@pytest.mark.parametrize("bad", [[], [1, -1], [float("nan"), 1]])
def test_invalid_counts_raise(bad):
    with pytest.raises(ValueError, match="counts_E"):
        gini(bad)


def test_percentile_linear_interpolation():
    samples = [float(v) for v in range(10, 0, -1)]  # 10..1, unsorted on purpose
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 100) == 10.0
    assert percentile(samples, 50) == pytest.approx(5.5)
    assert percentile(samples, 10) == pytest.approx(1.9)
    assert percentile(samples, 90) == pytest.approx(9.1)
    with pytest.raises(ValueError, match="q="):
        percentile(samples, 101)


def test_latency_summary():
    s = LatencySummary.from_samples([0.004, 0.001, 0.002, 0.003])
    assert s.median_s == pytest.approx(0.0025)
    assert s.mean_s == pytest.approx(0.0025)
    assert s.p10_s == pytest.approx(0.0013)
    assert s.p90_s == pytest.approx(0.0037)
    assert s.stdev_s == pytest.approx(math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3) * 1e-3)
    assert s.n == 4
    assert LatencySummary.from_samples([0.5]).stdev_s == 0.0
    with pytest.raises(ValueError, match="samples_s"):
        LatencySummary.from_samples([])
    with pytest.raises(ValueError, match="samples_s"):
        LatencySummary.from_samples([0.1, -0.1])
