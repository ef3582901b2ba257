"""MoE layers of other libraries, as they ship (requirements/thirdparty.txt, installed without
dependencies by the Makefile; skipped when absent): recognized by structure, proven by
computation, swapped exactly, or skipped with the reason. docs/third-party.md lists the results."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

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


OLMO_DROPLESS = ("dropless-softmax", "dropless-sigmoid", "dropless-softmax-shared", "dropless-sigmoid-shared",
                 "dropless-softmax-l1-normalized", "dropless-sigmoid-bias-gamma")
OLMO_CAPACITY = ("capacity-softmax", "capacity-sigmoid-shared")


@pytest.fixture(scope="module")
def olmo_core_results():
    """What tests/integration/olmo_core_blocks.py finds for each configuration (run in a subprocess
    with TRITON_INTERPRET=1: OLMo-core's MoEs move tokens with Triton kernels only)."""
    if importlib.util.find_spec("olmo_core") is None or importlib.util.find_spec("dataclass_extensions") is None:
        pytest.skip("ai2-olmo-core is not installed (requirements/thirdparty.txt)")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("olmo_core_blocks.py"))], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("label", OLMO_DROPLESS)
def test_olmo_core_dropless_moe_swaps_exactly(olmo_core_results, label):
    """olmo_core.nn.moe.DroplessMoE: a flat [E*H] router (softmax, or sigmoid + 1e-7; top-k, L1
    renormalised or not; a score bias for selection), experts packed [E*I, H] (w1 gate, w2 down,
    w3 up), a shared MLP averaged with the k routed experts. Inference is fused, exactly (outputs,
    input and parameter gradients); training runs the original, which attaches its auxiliary losses
    to the backward and accumulates routing counts and losses in its router."""
    r = olmo_core_results[label]
    assert r["swapped"] and r["records"] == 1 and r["views"], r
    assert r["eval_fp32"] and r["eval_grads"] and r["train_fp32"] and r["train_state_updated"], r
    assert "training forward updates the module's own state" in r["training_fallback"], r
    assert "router._batch_size_per_expert.x" in r["training_fallback"] and r["gradient_fallback"] is None, r
    assert ("shared x0.333333" in r["details"]) == label.endswith("shared"), r


@pytest.mark.parametrize("label", OLMO_CAPACITY)
def test_olmo_core_capacity_moe_is_skipped_for_its_capacity(olmo_core_results, label):
    """olmo_core.nn.moe.MoE drops the tokens beyond a capacity of capacity_factor * k * T / E (rounded
    to a multiple of 8) per call: a capacity that depends on the call's length, which the fused layer
    does not compute. It is in the report, skipped for that reason."""
    r = olmo_core_results[label]
    assert not r["swapped"] and r["records"] == 1, r
    assert "capacity (capacity_factor=1.25) that grows with the call's token count" in r["reason"], r
