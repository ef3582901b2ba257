"""The mask kinds and readings of hand-written attention modules (layers/attention_masks.py): kinds
from dtype and shape, the scaled_dot_product_attention mask of each reading with causality folded
in, and which calls are understood."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernel_moe.layers.attention_masks import attention_bias, call_mask, mask_kind, mask_parameter

B, T = 2, 5


@pytest.mark.parametrize("mask,kind", [
    (torch.ones(B, T, dtype=torch.bool), "bool keys"),
    (torch.ones(B, T, dtype=torch.long), "int keys"),
    (torch.zeros(T, T), "float square"),
    (torch.zeros(B, T, T, dtype=torch.bool), "bool batched"),
    (torch.zeros(B, 1, T, T, dtype=torch.float16), "float heads"),
    (torch.zeros(B, 2, T, T), None),
    (torch.zeros(T), None),
])
def test_kind_from_dtype_and_shape(mask, kind):
    assert mask_kind(mask, B, T) == kind


def test_a_2d_mask_is_ambiguous_when_batch_equals_sequence():
    assert mask_kind(torch.ones(T, T, dtype=torch.bool), T, T) is None
    assert mask_kind(torch.ones(T, 1, T, T, dtype=torch.bool), T, T) == "bool heads"


def _explicit(allowed_BTT: torch.Tensor, q, k, v) -> torch.Tensor:
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return s.masked_fill(~allowed_BTT[:, None], float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("reading", ["keep", "block"])
def test_key_mask_readings_equal_explicit_attention(reading, causal):
    q, k, v = (torch.randn(B, 3, T, 4) for _ in range(3))
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    mask = keep if reading == "keep" else ~keep
    allowed = keep[:, None, :].expand(B, T, T) & (torch.ones(T, T, dtype=torch.bool).tril() if causal else True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias(mask, "bool keys", reading, causal,
                                                                           q.dtype))
    torch.testing.assert_close(out, _explicit(allowed, q, k, v), atol=1e-6, rtol=1e-6)


def test_additive_mask_is_added_and_causality_folded_in():
    q, k, v = (torch.randn(B, 3, T, 4) for _ in range(3))
    bias = torch.randn(B, 1, T, T)
    s = q @ k.transpose(-1, -2) / 2 + bias
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias(bias, "float heads", "add", True, q.dtype))
    torch.testing.assert_close(out, s.softmax(-1) @ v, atol=1e-6, rtol=1e-6)


def test_calls_understood():
    m = torch.ones(B, T, dtype=torch.bool)
    assert call_mask((), {}, "mask") == (True, None)
    assert call_mask((m,), {}, "mask")[1] is m
    assert call_mask((), {"mask": m}, "mask")[1] is m
    assert call_mask((), {"mask": None}, "mask") == (True, None)
    assert not call_mask((), {"other": m}, "mask")[0]
    assert not call_mask((m, m), {}, "mask")[0]
    assert not call_mask((True,), {}, "mask")[0]


def test_mask_parameter_is_the_argument_after_x():
    class WithMask(nn.Module):
        def forward(self, x, attn_mask=None):
            return x

    class Plain(nn.Module):
        def forward(self, x):
            return x

    assert mask_parameter(WithMask()) == "attn_mask"
    assert mask_parameter(Plain()) is None
