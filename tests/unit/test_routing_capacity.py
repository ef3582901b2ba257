"""expert_capacity and apply_capacity against plain-Python references."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_moe.routing.capacity import apply_capacity, expert_capacity
from kernel_moe.routing.topk import TopKRouting, route


def reference_capacity_mask(weights, ids, capacity, priority):
    """Dropped mask [T][K] by a loop: per expert, order its slots by priority, keep the first C."""
    T = len(ids)
    K = len(ids[0]) if T else 0
    dropped = [[False] * K for _ in range(T)]
    experts = {ids[t][j] for t in range(T) for j in range(K)}
    for e in experts:
        slots = [(t, j) for t in range(T) for j in range(K) if ids[t][j] == e]
        if priority == "score":
            slots.sort(key=lambda tj: (-weights[tj[0]][tj[1]], tj[0] * K + tj[1]))
        else:
            slots.sort(key=lambda tj: tj[0] * K + tj[1])
        for t, j in slots[capacity:]:
            dropped[t][j] = True
    return dropped


def check_against_reference(weights_TK, ids_TK, E, capacity, priority):
    kept_TK, ids_out_TK, dropped_TK, num_dropped = apply_capacity(weights_TK, ids_TK, E, capacity, priority)
    expected = reference_capacity_mask(weights_TK.tolist(), ids_TK.tolist(), capacity, priority)
    expected_TK = torch.tensor(expected, dtype=torch.bool).view(ids_TK.shape)
    assert dropped_TK.dtype == torch.bool
    assert torch.equal(dropped_TK, expected_TK)
    assert torch.equal(ids_out_TK, ids_TK)
    assert torch.equal(kept_TK, torch.where(expected_TK, torch.zeros_like(weights_TK), weights_TK))
    assert num_dropped.dim() == 0 and num_dropped.dtype == torch.int64
    assert int(num_dropped) == int(expected_TK.sum())
    # No expert keeps more than its capacity.
    kept_per_expert = torch.bincount(ids_TK[~dropped_TK].long(), minlength=E)
    assert (kept_per_expert <= capacity).all()


# --- expert_capacity ---------------------------------------------------------------


@pytest.mark.parametrize(
    "T,K,E,factor,min_cap,expected",
    [
        (16, 2, 4, 1.0, 0, 8),
        (10, 2, 4, 1.0, 0, 5),
        (10, 1, 4, 1.0, 0, 3),  # ceil(2.5)
        (100, 1, 11, 1.1, 0, 10),  # 110/11 exactly, despite 1.1 not being exact in binary
        (10, 2, 4, 1.25, 0, 7),  # ceil(6.25)
        (10, 2, 4, 100.0, 0, 10),  # never more than T
        (10, 1, 8, 0.1, 0, 1),
        (10, 1, 8, 0.1, 4, 4),  # min_capacity raises it
        (3, 1, 8, 1.0, 5, 3),  # but T caps min_capacity
        (0, 2, 4, 1.0, 3, 0),
        (1, 1, 1, 1.0, 0, 1),
        (7, 3, 3, 1.0, 0, 7),  # k = E: every token to every expert
    ],
)
def test_expert_capacity_values(T, K, E, factor, min_cap, expected):
    assert expert_capacity(T, K, E, factor, min_cap) == expected


@given(
    T=st.integers(0, 5000),
    E=st.integers(1, 300),
    K=st.integers(1, 8),
    factor=st.sampled_from([0.5, 1.0, 1.25, 1.5, 2.0, 4.0]),
)
@settings(max_examples=200, deadline=None)
def test_expert_capacity_matches_ceil(T, E, K, factor):
    K = min(K, E)
    expected = min(math.ceil(Fraction(factor) * T * K / E), T)
    assert expert_capacity(T, K, E, factor) == expected


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(num_tokens=-1, top_k=1, num_experts=4, capacity_factor=1.0), "num_tokens"),
        (dict(num_tokens=4, top_k=0, num_experts=4, capacity_factor=1.0), "top_k"),
        (dict(num_tokens=4, top_k=5, num_experts=4, capacity_factor=1.0), "top_k"),
        (dict(num_tokens=4, top_k=1, num_experts=0, capacity_factor=1.0), "num_experts"),
        (dict(num_tokens=4, top_k=1, num_experts=4, capacity_factor=0.0), "capacity_factor"),
        (dict(num_tokens=4, top_k=1, num_experts=4, capacity_factor=float("inf")), "capacity_factor"),
        (dict(num_tokens=4, top_k=1, num_experts=4, capacity_factor=float("nan")), "capacity_factor"),
        (dict(num_tokens=4, top_k=1, num_experts=4, capacity_factor=1.0, min_capacity=-1), "min_capacity"),
        (dict(num_tokens=4.0, top_k=1, num_experts=4, capacity_factor=1.0), "num_tokens"),
        (dict(num_tokens=True, top_k=1, num_experts=4, capacity_factor=1.0), "num_tokens"),
    ],
)
def test_expert_capacity_rejects(kwargs, name):
    with pytest.raises(ValueError, match=name):
        expert_capacity(**kwargs)


# --- apply_capacity ----------------------------------------------------------------


@st.composite
def routing_case(draw):
    T = draw(st.integers(0, 12))
    E = draw(st.integers(1, 6))
    K = draw(st.integers(1, E))
    capacity = draw(st.integers(0, T + 1))
    seed = draw(st.integers(0, 2**31 - 1))
    levels = draw(st.sampled_from([0, 3]))  # 3: few distinct weights, to exercise ties
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.zeros(T, K, dtype=torch.int64)
    for t in range(T):
        ids_TK[t] = torch.randperm(E, generator=g)[:K]
    weights_TK = torch.rand(T, K, generator=g)
    if levels:
        weights_TK = (weights_TK * levels).floor() / levels
    return weights_TK, ids_TK, E, capacity


@given(case=routing_case(), priority=st.sampled_from(["score", "position"]))
@settings(max_examples=150, deadline=None)
def test_apply_capacity_matches_loop_reference(case, priority):
    weights_TK, ids_TK, E, capacity = case
    check_against_reference(weights_TK, ids_TK, E, capacity, priority)


@pytest.mark.parametrize("priority", ["score", "position"])
@pytest.mark.parametrize(
    "T,E,K,capacity", [(0, 4, 2, 0), (0, 4, 2, 3), (1, 4, 2, 1), (1, 4, 4, 0), (5, 3, 3, 5), (9, 5, 2, 1)]
)
def test_apply_capacity_edges(T, E, K, capacity, priority):
    torch.manual_seed(T * 100 + E * 10 + K)
    weights_TK, ids_TK = route(torch.randn(T, E), TopKRouting(E, K))
    check_against_reference(weights_TK, ids_TK, E, capacity, priority)


def test_capacity_zero_drops_everything():
    weights_TK, ids_TK = route(torch.randn(6, 4), TopKRouting(4, 2))
    kept_TK, _, dropped_TK, num_dropped = apply_capacity(weights_TK, ids_TK, 4, 0)
    assert dropped_TK.all() and int(num_dropped) == 12 and (kept_TK == 0).all()


@pytest.mark.parametrize("priority", ["score", "position"])
def test_all_tokens_to_one_expert(priority):
    T, E = 10, 4
    weights_TK = torch.tensor([[0.5], [0.9], [0.1], [0.9], [0.7], [0.3], [0.8], [0.2], [0.6], [0.4]])
    ids_TK = torch.full((T, 1), 2, dtype=torch.int64)
    kept_TK, _, dropped_TK, num_dropped = apply_capacity(weights_TK, ids_TK, E, 3, priority)
    kept_rows = (~dropped_TK[:, 0]).nonzero().flatten().tolist()
    if priority == "score":
        assert kept_rows == [1, 3, 6]  # 0.9, 0.9 (tie: earlier first), 0.8
    else:
        assert kept_rows == [0, 1, 2]
    assert int(num_dropped) == 7


def test_large_capacity_factor_drops_nothing():
    T, E, K = 33, 8, 2
    weights_TK, ids_TK = route(torch.randn(T, E), TopKRouting(E, K))
    capacity = expert_capacity(T, K, E, capacity_factor=float(E))
    kept_TK, ids_out_TK, dropped_TK, num_dropped = apply_capacity(weights_TK, ids_TK, E, capacity)
    assert capacity == T and int(num_dropped) == 0 and not dropped_TK.any()
    assert torch.equal(kept_TK, weights_TK) and torch.equal(ids_out_TK, ids_TK)


def test_score_priority_keeps_highest_weights_position_keeps_earliest():
    # Expert 0 gets slots (t=0, w=0.1), (t=1, w=0.3), (t=2, w=0.9); capacity 2.
    weights_TK = torch.tensor([[0.1, 0.9], [0.3, 0.7], [0.9, 0.1]])
    ids_TK = torch.tensor([[0, 1], [0, 2], [0, 3]])
    _, _, by_score, _ = apply_capacity(weights_TK, ids_TK, 4, 2, "score")
    _, _, by_position, _ = apply_capacity(weights_TK, ids_TK, 4, 2, "position")
    assert by_score[:, 0].tolist() == [True, False, False]
    assert by_position[:, 0].tolist() == [False, False, True]


def test_gradient_flows_to_kept_weights_only():
    torch.manual_seed(0)
    logits_TE = torch.randn(12, 4, requires_grad=True)
    weights_TK, ids_TK = route(logits_TE, TopKRouting(4, 2))
    weights_TK.retain_grad()
    kept_TK, _, dropped_TK, _ = apply_capacity(weights_TK, ids_TK, 4, 4)
    assert dropped_TK.any() and (~dropped_TK).any()
    (kept_TK * torch.arange(1, 25, dtype=torch.float32).view(12, 2)).sum().backward()
    expected_grad = torch.where(dropped_TK, 0.0, torch.arange(1, 25, dtype=torch.float32).view(12, 2))
    assert torch.equal(weights_TK.grad, expected_grad)
    assert logits_TE.grad is not None and logits_TE.grad.abs().sum() > 0


def test_bf16_weights_and_int32_ids():
    torch.manual_seed(1)
    weights_TK, ids_TK = route(torch.randn(20, 5), TopKRouting(5, 2))
    check_against_reference(weights_TK.bfloat16(), ids_TK.int(), 5, 3, "score")


@pytest.mark.parametrize(
    "args,name",
    [
        ((torch.rand(4, 2), torch.zeros(4, 3, dtype=torch.int64), 4, 1), "ids_TK"),
        ((torch.rand(4, 2), torch.zeros(4, 2), 4, 1), "ids_TK.dtype"),
        ((torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.int64), 0, 1), "num_experts"),
        ((torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.int64), 4, -1), "capacity"),
    ],
)
def test_apply_capacity_rejects(args, name):
    with pytest.raises(ValueError, match=name):
        apply_capacity(*args)


def test_apply_capacity_rejects_priority():
    with pytest.raises(ValueError, match="priority='random'"):
        apply_capacity(torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.int64), 4, 1, "random")
