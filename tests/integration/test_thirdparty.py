"""MoE layers of other libraries, as they ship (requirements/thirdparty.txt, installed without
dependencies by the Makefile; skipped when absent): recognized by structure, proven by
computation, swapped exactly, or skipped with the reason. docs/third-party.md lists the results."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kernel_moe
from helpers import assert_fp32_close
from kernel_moe import FusedMoE, KernelConfig

pytestmark = pytest.mark.thirdparty


@pytest.mark.parametrize("topk_first", [False, True], ids=["softmax-then-topk", "topk-then-softmax"])
@pytest.mark.parametrize("use_bias", [False, True], ids=["swiglu", "clamped-swiglu-bias"])
def test_ibm_fms_moe_feed_forward_swaps_exactly(topk_first, use_bias):
    """fms.modules.feedforward.MOEFeedForward keeps k as ``num_activated_experts`` and its experts
    as [E, 2I, H] / [E, H, I] in ConditionalFeedForward; with biases its activation is the clamped
    SwiGLU of GPT-OSS on interleaved features. Its expert matmul's backward is a placeholder in
    this release (it returns the input), so calls that need gradients run the original, as the
    report says."""
    feedforward = pytest.importorskip("fms.modules.feedforward")
    torch.manual_seed(0)
    block = feedforward.MOEFeedForward(8, 2, 64, 96, use_bias=use_bias, topk_first=topk_first)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    original = copy.deepcopy(block)
    model = nn.Sequential(nn.LayerNorm(64), block)
    _, report = kernel_moe.optimize(model, KernelConfig.for_moe(), return_report=True)
    assert report.num_swapped == 1 and isinstance(model[1], FusedMoE), report
    assert report.swapped[0].top_k == 2
    assert "calls that need gradients run the original" in report.swapped[0].details
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert_fp32_close(model[1](x), original(x))
    compiled = torch.compile(model[1], fullgraph=True)
    with torch.no_grad():
        assert_fp32_close(compiled(x), original(x))
