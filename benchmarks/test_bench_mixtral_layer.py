"""pytest-benchmark suite of the Mixtral-style layer of the core performance targets
(H 512, I 1024, E 8, k 2): ours timed by pytest-benchmark, and in the same process the
ratios ours / dense-same-active, ours / transformers eager, ours / transformers grouped_mm
stamped in ``extra_info`` (measured round-robin, medians).

    pytest benchmarks/test_bench_mixtral_layer.py --benchmark-json=out/mixtral_layer.json
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("transformers")

from bench_cpu_layer import DenseSwiGLU, H, K, I, build_block, time_round_robin  # noqa: E402

import kernel_moe  # noqa: E402
from kernel_moe.bench.device import device_name  # noqa: E402

TOKENS = [int(t) for t in os.environ.get("KERNEL_MOE_BENCH_TOKENS", "1,16,128,1024,4096").split(",")]


@functools.cache
def _layers(dtype_name: str):
    dtype = getattr(torch, dtype_name)
    ours = torch.nn.Sequential(build_block("eager", dtype))
    kernel_moe.optimize(ours, kernel_moe.KernelConfig.for_moe(top_k=K))
    torch.manual_seed(1)
    return {"ours": ours, "eager": build_block("eager", dtype), "grouped_mm": build_block("grouped_mm", dtype),
            "dense": DenseSwiGLU(H, K * I).to(dtype).eval()}


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_mixtral_layer(benchmark, dtype_name, tokens):
    layers = _layers(dtype_name)
    x = torch.randn(1, tokens, H, dtype=getattr(torch, dtype_name))
    with torch.no_grad():
        times = time_round_robin({k: functools.partial(m, x) for k, m in layers.items()}, min_time=0.3)
        benchmark(layers["ours"], x)
    benchmark.extra_info.update({
        "device": device_name("cpu"), "dtype": dtype_name, "tokens": tokens,
        "ours_over_dense_same_active": times["ours"] / times["dense"],
        "ours_over_eager": times["ours"] / times["eager"],
        "ours_over_grouped_mm": times["ours"] / times["grouped_mm"],
    })
