"""Router jitter: identity outside training, bounded multiplicative noise, reproducible."""

from __future__ import annotations

import pytest
import torch

from kernel_moe.routing.jitter import jitter_input, jitter_logits

JITTERS = [jitter_logits, jitter_input]


@pytest.mark.parametrize("fn", JITTERS)
def test_identity_when_not_training_or_eps_zero(fn):
    x = torch.randn(5, 7)
    assert fn(x, 0.1, training=False) is x
    assert fn(x, 0.0, training=True) is x


@pytest.mark.parametrize("fn", JITTERS)
def test_noise_is_multiplicative_within_bounds(fn):
    torch.manual_seed(0)
    eps = 0.2
    x = torch.randn(400, 16)
    y = fn(x, eps, training=True)
    ratio = y / x
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (ratio >= 1 - eps - 1e-6).all() and (ratio <= 1 + eps + 1e-6).all()
    # Draws spread over the interval (not a constant scale): mean near 1, both halves hit.
    assert abs(ratio.mean().item() - 1.0) < 0.01
    assert (ratio < 1 - eps / 2).any() and (ratio > 1 + eps / 2).any()
    # One draw per element.
    assert ratio.unique().numel() > 1000


@pytest.mark.parametrize("fn", JITTERS)
def test_reproducible_under_manual_seed(fn):
    x = torch.randn(8, 4)
    torch.manual_seed(123)
    a = fn(x, 0.05, training=True)
    torch.manual_seed(123)
    b = fn(x, 0.05, training=True)
    c = fn(x, 0.05, training=True)
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("fn", JITTERS)
def test_reproducible_under_generator_and_independent_of_global_rng(fn):
    x = torch.randn(8, 4)
    a = fn(x, 0.05, True, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(999)
    b = fn(x, 0.05, True, generator=torch.Generator().manual_seed(7))
    d = fn(x, 0.05, True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, d)


def test_same_noise_for_same_shape_and_seed():
    """Both functions apply the same law; the name only says where it is applied."""
    x = torch.randn(3, 5)
    a = jitter_logits(x, 0.1, True, torch.Generator().manual_seed(1))
    b = jitter_input(x, 0.1, True, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_gradient_and_low_precision():
    x = torch.randn(6, 4, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    y = jitter_input(x, 0.1, True, gen)
    y.sum().backward()
    noise = torch.empty(6, 4).uniform_(0.9, 1.1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.grad, noise)
    xb = torch.randn(6, 4, dtype=torch.bfloat16)
    assert jitter_logits(xb, 0.1, True).dtype == torch.bfloat16


@pytest.mark.parametrize("eps", [-0.1, 1.0, float("nan"), True])
def test_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps="):
        jitter_logits(torch.randn(2, 2), eps, True)


def test_rejects_integer_input():
    with pytest.raises(ValueError, match="dtype"):
        jitter_input(torch.ones(2, 2, dtype=torch.int64), 0.1, True)
