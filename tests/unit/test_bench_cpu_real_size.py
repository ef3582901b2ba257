"""kernel_moe.bench.cpu_real_size: the pieces the real-size CPU benchmarks stand on (bandwidth,
routings, random weights without a second copy, interleaved timing with a per-call index)."""

from __future__ import annotations

import pytest
import torch

from kernel_moe.bench.cpu_real_size import (
    REAL_SIZE_LAYERS,
    ROUTINGS,
    LayerShape,
    materialize,
    mean_distinct_experts,
    prepared_routings,
    read_rates,
    time_cycled,
)
from kernel_moe.bench.models import DenseFFN


def test_layer_shapes_are_the_real_models():
    sizes = {n: (s.hidden, s.intermediate, s.experts, s.top_k) for n, s in REAL_SIZE_LAYERS.items()}
    assert sizes == {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8), "deepseek": (7168, 2048, 64, 8)}
    assert REAL_SIZE_LAYERS["mixtral"].experts * REAL_SIZE_LAYERS["mixtral"].expert_bytes(torch.bfloat16) == \
        8 * 3 * 4096 * 14336 * 2
    assert REAL_SIZE_LAYERS["qwen3"].with_experts(16).experts == 16
    with pytest.raises(ValueError, match="experts=4.*top_k=8"):
        REAL_SIZE_LAYERS["qwen3"].with_experts(4)


def test_read_rates_are_positive_and_best_is_their_maximum():
    rates = read_rates(2**20)
    assert set(rates) == {"fp32_sum", "bf16_sum", "bf16_gemv", "best"}
    assert rates["best"] == max(rates["fp32_sum"], rates["bf16_sum"], rates["bf16_gemv"]) > 0
    with pytest.raises(ValueError, match="nbytes=1000"):
        read_rates(1000)


def test_prepared_routings_are_distinct_normalised_top_k():
    shape = LayerShape("t", 8, 4, 16, 4, "test")
    routings = prepared_routings(3, shape, torch.bfloat16)
    assert len(routings) == ROUTINGS
    for w_TK, ids_TK in routings:
        assert w_TK.shape == ids_TK.shape == (3, 4) and w_TK.dtype == torch.bfloat16
        torch.testing.assert_close(w_TK.float().sum(-1), torch.ones(3), atol=2e-2, rtol=0)
        assert all(len(set(row.tolist())) == 4 for row in ids_TK)
    assert len({tuple(ids.flatten().tolist()) for _, ids in routings}) > 1
    assert 4 <= mean_distinct_experts(routings) <= 12


def test_materialize_allocates_in_the_final_dtype_without_grad():
    module = materialize(lambda: DenseFFN(32, 48), torch.bfloat16, seed=3)
    again = materialize(lambda: DenseFFN(32, 48), torch.bfloat16, seed=3)
    for p, q in zip(module.parameters(), again.parameters(), strict=True):
        assert p.device.type == "cpu" and p.dtype == torch.bfloat16 and not p.requires_grad
        assert torch.equal(p, q) and 0.01 < p.float().std().item() < 0.03
    assert not module.training


def test_time_cycled_passes_each_call_its_own_index():
    seen = {"a": [], "b": []}
    medians = time_cycled({k: (lambda i, k=k: seen[k].append(i)) for k in seen}, min_time=0.0, min_reps=3)
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())
    for calls in seen.values():
        assert calls == list(range(len(calls))) and len(calls) >= 4  # one untimed call, then >= 3 timed
