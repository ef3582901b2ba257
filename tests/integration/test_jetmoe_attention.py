"""JetMoE's mixture of attention heads (JetMoeMoA inside JetMoeAttention): optimize() swaps the
attention layer for FusedMoAAttention after proving it at the layer; logits, gradients and greedy
generate() equal the original's (sdpa and eager attention, with and without padding); restore();
an altered MoA is not proven and stays; the swapped layer compiles without a graph break."""

from __future__ import annotations

import copy
import types

import pytest
import torch

import kernel_moe
from kernel_moe.layers.moa_attention import FusedMoAAttention

transformers = pytest.importorskip("transformers")
from transformers import JetMoeConfig, JetMoeForCausalLM  # noqa: E402

VOCAB = 97


def _model(attn: str = "sdpa") -> JetMoeForCausalLM:
    cfg = JetMoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
                       intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                       attn_implementation=attn)
    torch.manual_seed(0)
    model = JetMoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # non-zero output biases, so that they are proven too
            layer.self_attention.experts.bias.normal_()
            layer.mlp.bias.normal_()
    return model


def _pair(attn: str = "sdpa"):
    model = _model(attn)
    original = copy.deepcopy(model)
    optimized, report = kernel_moe.optimize(model, return_report=True)
    return optimized, original, report


def _batch():
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_layers_are_swapped_and_logits_equal(attn):
    model, original, report = _pair(attn)
    swapped = {r.name: r.new_class for r in report.swapped}
    assert swapped["model.layers.0.self_attention"] == "FusedMoAAttention"
    assert swapped["model.layers.1.self_attention"] == "FusedMoAAttention"
    assert not report.skipped, report.skipped
    ids, mask = _batch()
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            torch.testing.assert_close(model(ids, **kwargs).logits, original(ids, **kwargs).logits, atol=1e-5,
                                       rtol=1e-5)


def test_state_dict_and_parameters_are_kept():
    model, original, _ = _pair()
    assert list(model.state_dict()) == list(original.state_dict())
    layer = model.model.layers[0].self_attention
    assert isinstance(layer, FusedMoAAttention)
    assert layer.experts.input_linear.weight is layer.original.experts.input_linear.weight


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_generate_equals_the_original(attn):
    model, original, _ = _pair(attn)
    ids, mask = _batch()
    for kwargs in ({"input_ids": ids[1:]}, {"input_ids": ids, "attention_mask": mask}):
        ours = model.generate(**kwargs, max_new_tokens=10, do_sample=False, pad_token_id=0)
        ref = original.generate(**kwargs, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(ours, ref)


def test_training_gradients_equal_the_original():
    model, original, _ = _pair()
    ids, mask = _batch()
    grads = []
    for m in (model, original):
        m.train()
        m(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_restore_and_idempotence():
    model, original, _ = _pair()
    again = kernel_moe.UnifiedManager()
    again.optimize(model)
    assert "model.layers.0.self_attention" in again.report.already_optimized
    kernel_moe.restore(model)
    assert type(model.model.layers[0].self_attention).__name__ == "JetMoeAttention"


def test_an_altered_moa_is_not_proven_and_stays():
    model = _model()
    experts = model.model.layers[0].self_attention.experts
    reduce = experts.reduce
    experts.reduce = types.MethodType(lambda self, x, topo: 1.01 * reduce(x, topo), experts)
    report = kernel_moe.optimize(model, return_report=True)[1]
    skipped = {r.name: r.reason for r in report.skipped}
    assert "not proven" in skipped["model.layers.0.self_attention"]
    assert type(model.model.layers[0].self_attention).__name__ == "JetMoeAttention"
    assert isinstance(model.model.layers[1].self_attention, FusedMoAAttention)


def test_swapped_layer_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model, _, _ = _pair()
    layer = model.model.layers[0].self_attention
    x = torch.randn(2, 9, 32)
    emb = torch.randn(2, 9, 4).repeat(1, 1, 2)
    explained = torch._dynamo.explain(layer)(x, None, (emb.cos(), emb.sin()))
    assert explained.graph_break_count == 0, explained.break_reasons
    original = layer.original
    assert torch._dynamo.explain(original)(x, None, (emb.cos(), emb.sin())).graph_break_count > 0
    torch._dynamo.reset()


def test_attention_dropout_in_training_draws_as_the_original():
    """The swapped layer calls the model's attention function with the same dropout and draws
    nothing before it, so under the same seed its training forward equals the original's: the
    proof (run under one seed) accepts it without a training fallback."""
    cfg = _model().config
    cfg.attention_dropout = 0.5
    torch.manual_seed(0)
    model = JetMoeForCausalLM(cfg).eval()
    original = copy.deepcopy(model)
    report = kernel_moe.optimize(model, return_report=True)[1]
    details = {r.name: r.details for r in report.swapped}["model.layers.0.self_attention"]
    assert "runs the original" not in details
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
    model.train()
    original.train()
    for m in (model, original):
        torch.manual_seed(3)
        m.loss = m(ids, attention_mask=mask, labels=ids).loss
    torch.testing.assert_close(model.loss, original.loss, atol=1e-5, rtol=1e-5)
