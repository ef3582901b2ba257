"""Whole tiny transformers MoE models (Mixtral, Qwen2-MoE; random weights, built from their
config classes): the model as given, kernel_moe-optimized, and transformers' "eager" and
"grouped_mm" experts implementations.

    pytest benchmarks/test_bench_hf.py --benchmark-json=out/hf.json
"""

from __future__ import annotations

import functools

import pytest
from presets import HF_SEQUENCE_LENGTH, HF_VARIANTS, bench_device, token_counts, with_compiled

from kernel_moe.bench.runner import MoEBenchmark
from kernel_moe.bench.settings import BenchSettings

pytest.importorskip("transformers")

DEVICE = bench_device()
BATCHES = sorted({max(1, t // HF_SEQUENCE_LENGTH) for t in token_counts(DEVICE)})
VARIANTS = with_compiled(HF_VARIANTS)
MODELS = ("mixtral-tiny", "qwen2moe-tiny")


@functools.cache
def _bench(name: str) -> MoEBenchmark:
    from kernel_moe.bench.presets import tiny_hf_models

    model = dict(tiny_hf_models())[name]
    settings = BenchSettings(progress=False)
    return MoEBenchmark(model, baselines=["eager", "grouped_mm"], device=DEVICE, settings=settings)


@functools.cache
def _module(name: str, variant: str):
    return _bench(name).build_variant(variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("name", MODELS)
def test_tiny_model(measure_variant, name, batch, variant):
    key = f"{name} B={batch} S={HF_SEQUENCE_LENGTH}"
    build = functools.partial(_module, name)
    measure_variant(key, _bench(name), build, variant, (batch, HF_SEQUENCE_LENGTH), model=name)
