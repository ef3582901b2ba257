"""Load-balancing loss and router z-loss against loop references and transformers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_moe.routing.losses import load_balancing_loss, router_z_loss
from kernel_moe.routing.topk import TopKRouting, route


def reference_load_balancing(probs, ids, E):
    """E * sum_i f_i * P_i by loops over plain Python lists."""
    T = len(probs)
    K = len(ids[0]) if T else 0
    counts = [0] * E
    for row in ids:
        for e in row:
            counts[e] += 1
    f = [c / (T * K) for c in counts]
    P = [sum(probs[t][i] for t in range(T)) / T for i in range(E)]
    return E * sum(f[i] * P[i] for i in range(E))


@given(T=st.integers(1, 20), E=st.integers(1, 8), K=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=100, deadline=None)
def test_load_balancing_matches_loop_reference(T, E, K, seed):
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=g) * 2
    probs_TE = torch.softmax(logits_TE, dim=-1)
    _, ids_TK = route(logits_TE, TopKRouting(E, K))
    loss = load_balancing_loss(probs_TE, ids_TK, E)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    expected = reference_load_balancing(probs_TE.double().tolist(), ids_TK.tolist(), E)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("E,K", [(4, 1), (8, 2), (6, 6)])
def test_uniform_router_gives_one(E, K):
    T = 4 * E
    probs_TE = torch.full((T, E), 1.0 / E)
    ids_TK = (torch.arange(T).unsqueeze(1) + torch.arange(K)) % E  # every expert gets T*K/E slots
    assert torch.bincount(ids_TK.flatten(), minlength=E).unique().numel() == 1
    torch.testing.assert_close(load_balancing_loss(probs_TE, ids_TK, E), torch.tensor(1.0))


def test_collapsed_router_gives_num_experts():
    E, T = 8, 10
    probs_TE = torch.zeros(T, E)
    probs_TE[:, 3] = 1.0
    ids_TK = torch.full((T, 1), 3)
    torch.testing.assert_close(load_balancing_loss(probs_TE, ids_TK, E), torch.tensor(float(E)))


def test_empty_batch_gives_zero():
    loss = load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int64), 4)
    assert loss.item() == 0.0
    assert router_z_loss(torch.zeros(0, 4)).item() == 0.0


def test_load_balancing_gradient_through_probabilities_only():
    torch.manual_seed(0)
    E, T, K = 4, 16, 2
    logits_TE = torch.randn(T, E, requires_grad=True)
    probs_TE = torch.softmax(logits_TE, dim=-1)
    _, ids_TK = route(logits_TE.detach(), TopKRouting(E, K))
    probs_TE.retain_grad()
    load_balancing_loss(probs_TE, ids_TK, E).backward()
    # d loss / d probs[t, i] = E * f_i / T: the same for every token.
    f_E = torch.bincount(ids_TK.flatten(), minlength=E).float() / (T * K)
    torch.testing.assert_close(probs_TE.grad, (E * f_E / T).expand(T, E))
    assert logits_TE.grad.abs().sum() > 0


@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (16, 8, 2), (33, 6, 3), (20, 5, 5)])
def test_matches_transformers_load_balancing_loss_func(T, E, K):
    """transformers counts assignments per token (dividing by T, not T*K): its value is K times ours."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(T * E + K)
    logits_TE = torch.randn(T, E)
    probs_TE = torch.softmax(logits_TE, dim=-1)
    _, ids_TK = torch.topk(probs_TE, K, dim=-1)  # the selection transformers makes
    ours = load_balancing_loss(probs_TE, ids_TK, E)
    theirs = load_balancing_loss_func((logits_TE,), num_experts=E, top_k=K)
    torch.testing.assert_close(ours * K, theirs.float(), atol=1e-5, rtol=1e-5)
    # Several layers in transformers = the mean of the per-layer sums, i.e. our loss on the concatenation.
    logits2_TE = torch.randn(T, E)
    probs2_TE = torch.softmax(logits2_TE, dim=-1)
    ids2_TK = torch.topk(probs2_TE, K, dim=-1).indices
    theirs2 = load_balancing_loss_func((logits_TE, logits2_TE), num_experts=E, top_k=K)
    ours2 = load_balancing_loss(torch.cat([probs_TE, probs2_TE]), torch.cat([ids_TK, ids2_TK]), E)
    torch.testing.assert_close(ours2 * K, theirs2.float(), atol=1e-5, rtol=1e-5)


@given(
    T=st.integers(1, 20),
    E=st.integers(1, 8),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=60, deadline=None)
def test_router_z_loss_matches_loop_reference(T, E, scale, seed):
    logits_TE = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * scale
    rows = logits_TE.double().tolist()
    expected = 0.0
    for row in rows:
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        expected += lse * lse
    expected /= T
    loss = router_z_loss(logits_TE)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert math.isclose(loss.item(), expected, rel_tol=1e-5, abs_tol=1e-5)


def test_router_z_loss_bf16_and_gradient():
    logits_TE = torch.randn(6, 4, requires_grad=True)
    router_z_loss(logits_TE).backward()
    # d/dx mean(lse^2) = 2 * lse * softmax / T
    lse_T1 = torch.logsumexp(logits_TE.detach(), dim=-1, keepdim=True)
    torch.testing.assert_close(logits_TE.grad, 2 * lse_T1 * torch.softmax(logits_TE.detach(), dim=-1) / 6)
    loss_bf16 = router_z_loss(logits_TE.detach().bfloat16())
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, router_z_loss(logits_TE.detach().bfloat16().float()))


@pytest.mark.parametrize(
    "args,name",
    [
        ((torch.rand(4, 3), torch.zeros(4, 1, dtype=torch.int64), 4), "probs_TE"),
        ((torch.rand(4, 4), torch.zeros(5, 1, dtype=torch.int64), 4), "ids_TK"),
    ],
)
def test_load_balancing_rejects(args, name):
    with pytest.raises(ValueError, match=name):
        load_balancing_loss(*args)
