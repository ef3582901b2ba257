"""Expert Choice routing against a plain-Python loop reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_moe.reference.moe import naive_moe_experts
from kernel_moe.routing.capacity import expert_capacity
from kernel_moe.routing.expert_choice import expert_choice_route, expert_choice_to_slots


def reference_expert_choice(logits_TE, capacity, scoring):
    """Per expert, by a loop: score every token, sort tokens by score, keep the first C."""
    T, E = logits_TE.shape
    # Scores from the same fp32 op, so that near-ties rank identically; the ranking is the loop's.
    if scoring == "softmax":
        scores = torch.softmax(logits_TE, dim=-1).tolist()
    else:
        scores = torch.sigmoid(logits_TE).tolist()
    weights, tokens = [], []
    for e in range(E):
        ranked = sorted(range(T), key=lambda t: -scores[t][e])[:capacity]
        tokens.append(ranked)
        weights.append([scores[t][e] for t in ranked])
    return weights, tokens


@given(
    T=st.integers(0, 16),
    E=st.integers(1, 6),
    capacity_fraction=st.floats(0.0, 1.0),
    scoring=st.sampled_from(["softmax", "sigmoid"]),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=100, deadline=None)
def test_expert_choice_matches_loop_reference(T, E, capacity_fraction, scoring, seed):
    capacity = round(capacity_fraction * T)
    logits_TE = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    weights_EC, token_ids_EC = expert_choice_route(logits_TE, capacity, scoring)
    assert weights_EC.shape == (E, capacity) and token_ids_EC.shape == (E, capacity)
    assert weights_EC.dtype == torch.float32 and token_ids_EC.dtype == torch.int64
    ref_weights, ref_tokens = reference_expert_choice(logits_TE, capacity, scoring)
    assert token_ids_EC.tolist() == ref_tokens
    assert torch.equal(weights_EC, torch.tensor(ref_weights, dtype=torch.float32).view(E, capacity))


def test_each_expert_gets_exactly_capacity_tokens():
    torch.manual_seed(0)
    T, E = 32, 8
    logits_TE = torch.randn(T, E) + torch.tensor([5.0] + [0.0] * (E - 1))  # everyone prefers expert 0
    capacity = expert_capacity(T, 1, E, capacity_factor=2.0)
    weights_EC, token_ids_EC = expert_choice_route(logits_TE, capacity)
    assert capacity == 8 and token_ids_EC.shape == (E, capacity)
    assert (weights_EC > 0).all()  # the unpopular experts still fill their capacity
    for e in range(E):
        assert len(set(token_ids_EC[e].tolist())) == capacity  # distinct tokens per expert


def test_capacity_equal_to_tokens_picks_every_token():
    logits_TE = torch.randn(5, 3)
    weights_EC, token_ids_EC = expert_choice_route(logits_TE, 5)
    assert all(sorted(row) == list(range(5)) for row in token_ids_EC.tolist())
    weights_TE, _ = expert_choice_to_slots(weights_EC, token_ids_EC, 5)
    torch.testing.assert_close(weights_TE, torch.softmax(logits_TE, dim=-1))


def test_expert_choice_gradient_reaches_logits():
    logits_TE = torch.randn(8, 4, requires_grad=True)
    weights_EC, _ = expert_choice_route(logits_TE, 3)
    weights_EC.sum().backward()
    assert logits_TE.grad is not None and logits_TE.grad.abs().sum() > 0


@pytest.mark.parametrize("T,E,capacity", [(0, 4, 0), (1, 4, 0), (1, 4, 1), (7, 1, 7), (10, 5, 3)])
def test_to_slots_matches_loop_reference(T, E, capacity):
    torch.manual_seed(T + E + capacity)
    weights_EC, token_ids_EC = expert_choice_route(torch.randn(T, E), capacity)
    weights_TE, ids_TE = expert_choice_to_slots(weights_EC, token_ids_EC, T)
    assert weights_TE.shape == (T, E) and ids_TE.shape == (T, E) and ids_TE.dtype == torch.int64
    expected = [[0.0] * E for _ in range(T)]
    for e in range(E):
        for c in range(capacity):
            expected[token_ids_EC[e, c]][e] = float(weights_EC[e, c])
    assert torch.equal(weights_TE, torch.tensor(expected, dtype=torch.float32).view(T, E))
    assert ids_TE.tolist() == [list(range(E))] * T


def test_to_slots_feeds_a_topk_experts_op():
    """The slot form through the top-k reference experts equals applying each expert's picks."""
    torch.manual_seed(3)
    T, H, E, I, C = 12, 8, 4, 6, 5
    x_TH = torch.randn(T, H)
    w_up_ENH = torch.randn(E, 2 * I, H) * 0.3
    w_down_EHI = torch.randn(E, H, I) * 0.3
    weights_EC, token_ids_EC = expert_choice_route(torch.randn(T, E), C)
    weights_TE, ids_TE = expert_choice_to_slots(weights_EC, token_ids_EC, T)
    out_TH = naive_moe_experts(x_TH, weights_TE, ids_TE, w_up_ENH, w_down_EHI)
    expected_TH = torch.zeros(T, H)
    for e in range(E):
        for c in range(C):
            t = int(token_ids_EC[e, c])
            one = naive_moe_experts(x_TH[t : t + 1], torch.ones(1, 1), torch.tensor([[e]]), w_up_ENH, w_down_EHI)
            expected_TH[t] += weights_EC[e, c] * one[0]
    torch.testing.assert_close(out_TH, expected_TH, atol=1e-5, rtol=1e-5)


def test_to_slots_gradient():
    logits_TE = torch.randn(6, 3, requires_grad=True)
    weights_EC, token_ids_EC = expert_choice_route(logits_TE, 2)
    weights_TE, _ = expert_choice_to_slots(weights_EC, token_ids_EC, 6)
    weights_TE.sum().backward()
    assert logits_TE.grad is not None and logits_TE.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: expert_choice_route(torch.randn(4, 3), 5), "capacity=5"),
        (lambda: expert_choice_route(torch.randn(4, 3), -1), "capacity=-1"),
        (lambda: expert_choice_route(torch.randn(4, 3), 2, "relu"), "scoring='relu'"),
        (lambda: expert_choice_route(torch.randn(4), 2), "logits_TE"),
        (lambda: expert_choice_to_slots(torch.rand(3, 2), torch.zeros(3, 1, dtype=torch.int64), 4), "token_ids_EC"),
        (lambda: expert_choice_to_slots(torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int64), -1), "num_tokens"),
    ],
)
def test_expert_choice_rejects(call, name):
    with pytest.raises(ValueError, match=name):
        call()
