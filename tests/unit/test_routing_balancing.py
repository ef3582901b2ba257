"""Aux-loss-free bias update, load statistics and the load tracker."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_moe.routing.balancing import (
    ExpertLoadTracker,
    expert_counts,
    expert_load_stats,
    load_entropy,
    update_expert_bias,
)
from kernel_moe.routing.topk import TopKRouting, route


def reference_stats(counts):
    """CV, max/mean and Gini (mean absolute difference form) by loops."""
    E = len(counts)
    mean = sum(counts) / E
    if mean == 0:
        return {"cv": 0.0, "max_over_mean": 0.0, "gini": 0.0}
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / E)
    mad = sum(abs(a - b) for a in counts for b in counts) / (E * E)
    return {"cv": std / mean, "max_over_mean": max(counts) / mean, "gini": mad / (2 * mean)}


@given(counts=st.lists(st.integers(0, 1000), min_size=1, max_size=32))
@settings(max_examples=150, deadline=None)
def test_load_stats_match_loop_reference(counts):
    stats = expert_load_stats(torch.tensor(counts))
    expected = reference_stats(counts)
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key].dim() == 0
        assert math.isclose(stats[key].item(), value, rel_tol=1e-9, abs_tol=1e-12), key


@pytest.mark.parametrize("E", [1, 2, 8, 13])
def test_load_stats_extremes(E):
    uniform = expert_load_stats(torch.full((E,), 7))
    assert uniform["cv"].item() == 0 and uniform["gini"].item() == 0 and uniform["max_over_mean"].item() == 1
    one_hot = torch.zeros(E, dtype=torch.int64)
    one_hot[E // 2] = 100
    collapsed = expert_load_stats(one_hot)
    assert math.isclose(collapsed["gini"].item(), (E - 1) / E, abs_tol=1e-12)
    assert math.isclose(collapsed["max_over_mean"].item(), E)
    assert math.isclose(collapsed["cv"].item(), math.sqrt(E - 1), abs_tol=1e-12)
    zero = expert_load_stats(torch.zeros(E))
    assert all(v.item() == 0 for v in zero.values())


@given(counts=st.lists(st.integers(0, 1000), min_size=1, max_size=32))
@settings(max_examples=100, deadline=None)
def test_load_entropy_matches_loop_reference(counts):
    total, E = sum(counts), len(counts)
    if total == 0:
        expected = 0.0
    elif E == 1:
        expected = 1.0
    else:
        expected = -sum(c / total * math.log(c / total) for c in counts if c) / math.log(E)
    entropy = load_entropy(torch.tensor(counts))
    assert entropy.dim() == 0 and entropy.dtype == torch.float64
    assert math.isclose(entropy.item(), expected, rel_tol=1e-9, abs_tol=1e-12)


def test_expert_counts_matches_bincount():
    torch.manual_seed(0)
    _, ids_TK = route(torch.randn(50, 7), TopKRouting(7, 3))
    counts_E = expert_counts(ids_TK, 7)
    assert counts_E.dtype == torch.int64
    assert torch.equal(counts_E, torch.bincount(ids_TK.flatten(), minlength=7))
    assert torch.equal(expert_counts(torch.zeros(0, 2, dtype=torch.int64), 3), torch.zeros(3, dtype=torch.int64))


def test_update_expert_bias_formula():
    bias_E = torch.tensor([0.0, 0.5, -0.25, 1.0, 0.0])
    counts_E = torch.tensor([10, 2, 4, 4, 0])  # mean 4
    before = counts_E.clone()
    update_expert_bias(bias_E, counts_E, 0.01)
    # Overloaded experts go down, underloaded go up, an expert exactly at the mean stays.
    expected = [0.0 - 0.01, 0.5 + 0.01, -0.25, 1.0, 0.0 + 0.01]
    torch.testing.assert_close(bias_E, torch.tensor(expected), atol=0, rtol=0)
    assert torch.equal(counts_E, before)


def test_update_expert_bias_loop_reference_and_inplace_parameter():
    torch.manual_seed(1)
    bias = torch.nn.Parameter(torch.randn(6))  # also works on a Parameter that requires grad
    data_ptr = bias.data_ptr()
    start = bias.detach().clone().tolist()
    counts = torch.randint(0, 20, (6,)).float()
    update_expert_bias(bias, counts, 0.003)
    mean = sum(counts.tolist()) / 6
    expected = [b + 0.003 * ((mean > c) - (mean < c)) for b, c in zip(start, counts.tolist())]
    torch.testing.assert_close(bias.detach(), torch.tensor(expected), atol=1e-7, rtol=0)
    assert bias.data_ptr() == data_ptr and bias.grad is None


def test_update_expert_bias_steers_routing_towards_balance():
    """Repeated updates on a fixed, skewed router reduce the imbalance of the selection."""
    torch.manual_seed(0)
    E, K = 8, 2
    logits_TE = torch.randn(512, E) + torch.linspace(0, 2, E)  # later experts preferred
    spec = TopKRouting(E, K)
    bias_E = torch.zeros(E)
    first = None
    for _ in range(200):
        _, ids_TK = route(logits_TE, spec, selection_bias_E=bias_E)
        counts_E = expert_counts(ids_TK, E)
        first = expert_load_stats(counts_E)["cv"].item() if first is None else first
        update_expert_bias(bias_E, counts_E, 0.002)
    last = expert_load_stats(expert_counts(route(logits_TE, spec, selection_bias_E=bias_E)[1], E))["cv"].item()
    assert first > 0.3 and last < 0.1 * first


@pytest.mark.parametrize(
    "args,name",
    [
        ((torch.zeros(4), torch.zeros(4), -1.0), "rate"),
        ((torch.zeros(4), torch.zeros(4), float("nan")), "rate"),
        ((torch.zeros(4), torch.zeros(3), 0.1), "counts_E"),
        ((torch.zeros(4, dtype=torch.int64), torch.zeros(4), 0.1), "bias_E.dtype"),
    ],
)
def test_update_expert_bias_rejects(args, name):
    with pytest.raises(ValueError, match=name):
        update_expert_bias(*args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # Rank 0 overloads expert 0, rank 1 expert 3: globally [6, 2, 2, 6], mean 4.
        counts_E = torch.tensor([5, 1, 1, 1]) if rank == 0 else torch.tensor([1, 1, 1, 5])
        bias_E = torch.zeros(4)
        update_expert_bias(bias_E, counts_E, 0.5)
        results[rank] = (bias_E.tolist(), counts_E.tolist())
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_update_expert_bias_all_reduces_counts_across_ranks():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        out = dict(results)
    for rank, local in ((0, [5, 1, 1, 1]), (1, [1, 1, 1, 5])):
        bias, counts = out[rank]
        assert bias == [-0.5, 0.5, 0.5, -0.5]  # from the global counts, identical on both ranks
        assert counts == local  # the caller's counts are not reduced in place


def test_tracker_accumulates_and_reports():
    torch.manual_seed(2)
    tracker = ExpertLoadTracker(5)
    total_E = torch.zeros(5, dtype=torch.int64)
    for _ in range(4):
        _, ids_TK = route(torch.randn(9, 5), TopKRouting(5, 2))
        tracker.update(ids_TK)
        total_E += torch.bincount(ids_TK.flatten(), minlength=5)
    tracker.update_counts(torch.tensor([1, 0, 0, 0, 2]))
    total_E += torch.tensor([1, 0, 0, 0, 2])
    assert torch.equal(tracker.counts_E, total_E) and tracker.steps == 5
    stats = tracker.stats()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
    summary = tracker.summary()
    expected = reference_stats(total_E.tolist())
    for key, value in expected.items():
        assert math.isclose(summary[key], value, rel_tol=1e-9)
    assert summary["total"] == 4 * 9 * 2 + 3 and summary["steps"] == 5
    tracker.reset()
    assert tracker.counts_E.sum().item() == 0 and tracker.steps == 0


def test_tracker_rejects():
    with pytest.raises(ValueError, match="num_experts=0"):
        ExpertLoadTracker(0)
    with pytest.raises(ValueError, match="counts_E shape"):
        ExpertLoadTracker(3).update_counts(torch.zeros(4))
