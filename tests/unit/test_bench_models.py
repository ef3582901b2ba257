"""Comparison modules and parameter counting of kernel_moe.bench.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import tiny_mixtral_config
from kernel_moe.bench.models import (
    DenseFFN,
    NaiveMoE,
    ParamCount,
    count_parameters,
    dense_same_active,
    dense_same_total,
    moe_param_count,
)
from kernel_moe.reference.moe import naive_moe_experts

H, I, E, K = 24, 40, 6, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a CPU shared with other jobs, OpenMP barriers can stall for whole
    scheduler slices and make these small timed runs many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("gated", [True, False])
def test_dense_ffn_parameter_count(gated):
    ffn = DenseFFN(H, I, gated=gated)
    expected = (3 if gated else 2) * H * I
    assert count_parameters(ffn) == ParamCount(total=expected, active=expected)


@pytest.mark.parametrize("gated", [True, False])
def test_naive_moe_parameter_count(gated):
    moe = NaiveMoE(H, I, E, K, gated=gated)
    per_expert = (3 if gated else 2) * H * I
    expected = ParamCount(total=H * E + E * per_expert, active=H * E + K * per_expert)
    assert count_parameters(moe) == expected
    assert moe_param_count(H, I, E, K, gated) == expected
    assert count_parameters(nn.Sequential(nn.Linear(H, H, bias=False), moe)) == ParamCount(
        expected.total + H * H, expected.active + H * H
    )


def test_fair_dense_pairs_match_the_moe():
    moe = moe_param_count(H, I, E, K)
    router = H * E
    assert count_parameters(dense_same_active(H, I, E, K)).total == moe.active - router
    assert count_parameters(dense_same_total(H, I, E, K)).total == moe.total - router
    assert dense_same_active(H, I, E, K).intermediate_size == K * I
    assert dense_same_total(H, I, E, K).intermediate_size == E * I


def test_tied_parameters_are_counted_once():
    emb = nn.Embedding(10, H)
    head = nn.Linear(H, 10, bias=False)
    head.weight = emb.weight
    assert count_parameters(nn.ModuleList([emb, head])) == ParamCount(10 * H, 10 * H)


def test_naive_moe_matches_the_reference():
    torch.manual_seed(0)
    moe = NaiveMoE(H, I, E, K).eval()
    x = torch.randn(3, 5, H)
    x_TH = x.reshape(-1, H)
    weights, ids = moe.route(x_TH)
    w_up_ENH = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in moe.experts])
    w_down_EHI = torch.stack([e.down_proj.weight for e in moe.experts])
    expected = naive_moe_experts(x_TH, weights, ids, w_up_ENH, w_down_EHI)
    with torch.no_grad():
        got = moe(x)
    torch.testing.assert_close(got.reshape(-1, H), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(15))


def test_naive_moe_routing_counts_sum_to_slots():
    torch.manual_seed(1)
    moe = NaiveMoE(H, I, E, K)
    moe.track_routing(True)
    with torch.no_grad():
        moe(torch.randn(7, H))
        moe(torch.randn(2, 4, H))
    assert moe.routing_counts.dtype == torch.int64
    assert int(moe.routing_counts.sum()) == (7 + 8) * K
    moe.track_routing(False)
    moe(torch.randn(5, H))
    assert int(moe.routing_counts.sum()) == (7 + 8) * K
    moe.reset_routing_counts()
    assert int(moe.routing_counts.sum()) == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(hidden=0, intermediate=4, num_experts=2, top_k=1), "hidden"),
        (dict(hidden=4, intermediate=4, num_experts=2, top_k=3), "top_k"),
        (dict(hidden=4, intermediate=4, num_experts=2, top_k=1, activation="tanh"), "activation"),
    ],
)
def test_invalid_shapes_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NaiveMoE(**kwargs)


def _tiny_mixtral():
    transformers = pytest.importorskip("transformers")
    cfg = tiny_mixtral_config(vocab_size=128, hidden_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg), cfg


def test_tiny_transformers_mixtral_parameter_count():
    model, cfg = _tiny_mixtral()
    V, Hm, Im, Em, Km, L = 128, 64, 40, 4, 2, 2
    head_dim = Hm // 4
    attention = Hm * Hm + 2 * (2 * head_dim) * Hm + Hm * Hm  # q, k, v (2 kv heads), o
    norms = 2 * Hm
    router = Em * Hm
    experts = Em * (2 * Im * Hm + Hm * Im)
    active_experts = Km * (2 * Im * Hm + Hm * Im)
    dense = V * Hm + V * Hm + Hm  # embeddings, lm_head, final norm
    expected = ParamCount(
        total=dense + L * (attention + norms + router + experts),
        active=dense + L * (attention + norms + router + active_experts),
    )
    assert count_parameters(model) == expected
    # the experts module alone, below its block: top_k comes from the block
    block = model.model.layers[0].mlp
    assert count_parameters(block) == ParamCount(router + experts, router + active_experts)


def test_swapped_model_keeps_its_counts():
    kernel_moe = pytest.importorskip("kernel_moe")
    model, _ = _tiny_mixtral()
    before = count_parameters(model)
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert len(report.swapped) == 2
    assert count_parameters(model) == before

    torch.manual_seed(0)
    holder = nn.Sequential(NaiveMoE(H, I, E, K))
    before = count_parameters(holder)
    assert len(kernel_moe.optimize(holder, return_report=True)[1].swapped) == 1
    assert isinstance(holder[0], kernel_moe.FusedMoE)
    assert count_parameters(holder) == before
