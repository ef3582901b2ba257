"""One MoE layer side by side: the hand-written MoE (original), the kernel_moe-optimized
layer, and dense FFNs with the same active and the same total parameters.

    pytest benchmarks/test_bench_layer.py --benchmark-json=out/layer.json
"""

from __future__ import annotations

import functools

import pytest
import torch
from presets import LAYER_SHAPES, LAYER_VARIANTS, bench_device, token_counts, with_compiled

from kernel_moe.bench.models import NaiveMoE, dense_same_active, dense_same_total
from kernel_moe.bench.runner import MoEBenchmark
from kernel_moe.bench.settings import BenchSettings

DEVICE = bench_device()
TOKENS = token_counts(DEVICE)
VARIANTS = with_compiled(LAYER_VARIANTS)


@functools.cache
def _bench(shape) -> MoEBenchmark:
    torch.manual_seed(0)
    h, i, e, k = shape.hidden, shape.intermediate, shape.num_experts, shape.top_k
    return MoEBenchmark(
        NaiveMoE(h, i, e, k),
        baselines=[
            ("dense_same_active", lambda: dense_same_active(h, i, e, k)),
            ("dense_same_total", lambda: dense_same_total(h, i, e, k)),
        ],
        device=DEVICE,
        settings=BenchSettings(progress=False),
    )


@functools.cache
def _module(shape, variant):
    return _bench(shape).build_variant(variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: s.label.replace(" ", "_"))
def test_moe_layer(measure_variant, shape, tokens, variant):
    build = functools.partial(_module, shape)
    measure_variant(f"{shape.label} T={tokens}", _bench(shape), build, variant, (1, tokens), shape=shape.label)
