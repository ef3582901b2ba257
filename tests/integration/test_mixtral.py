"""A tiny random-weight transformers Mixtral (built from MixtralConfig, no download):
optimize() swaps every sparse MoE block; logits, greedy generation, state_dict, training
gradients and a compiled decoder layer match the original model."""

from __future__ import annotations

import copy

import pytest
import torch

import kernel_moe
from helpers import (
    assert_bf16_matches_fp32_reference,
    assert_compiles_whole_and_matches,
    assert_same_grads,
    assert_same_state,
    decoder_kwargs,
    param_ids,
    snapshot_state,
    tiny_mixtral_config,
)
from kernel_moe import FusedMoE

pytest.importorskip("transformers")


def _model(seed: int = 0, **overrides):
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(tiny_mixtral_config(**overrides)).eval()


def _ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair():
    """(optimized model, original model, report), built once for the read-only tests."""
    model = _model()
    original = copy.deepcopy(model)
    report = kernel_moe.optimize(model, return_report=True)[1]
    return model, original, report


def test_every_sparse_block_is_swapped(pair):
    model, _, report = pair
    assert [r.name for r in report.swapped] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for rec in report.swapped:
        assert (rec.original_class, rec.new_class, rec.num_experts, rec.top_k) == (
            "MixtralSparseMoeBlock", "FusedMoE", 4, 2)
        assert "softmax>top2>renorm" in rec.details and "silu-glu(concat)" in rec.details
    assert report.skipped == []
    assert all(isinstance(layer.mlp, FusedMoE) for layer in model.model.layers)


def test_logits_match_in_fp32(pair):
    model, original, _ = pair
    for batch, seq in ((2, 11), (1, 1), (3, 4)):
        ids = _ids(batch, seq)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-4, rtol=1e-4)


def test_greedy_generation_is_identical(pair):
    model, original, _ = pair
    ids = _ids(2, 5, seed=3)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(ids, **kwargs)
        theirs = original.generate(ids, **kwargs)
    assert ours.shape == (2, 13)
    assert torch.equal(ours, theirs)


def test_state_dict_parameters_and_restore():
    model = _model(seed=2)
    snap = snapshot_state(model)
    ids_before = param_ids(model)
    blocks = [layer.mlp for layer in model.model.layers]
    kernel_moe.optimize(model)
    assert_same_state(model, snap)
    assert param_ids(model) == ids_before
    # Stacked 3-D expert weights are used in place: the very same storage.
    for layer, block in zip(model.model.layers, blocks):
        assert layer.mlp.experts is block.experts
    assert kernel_moe.restore(model) is model
    assert [layer.mlp for layer in model.model.layers] == blocks
    assert_same_state(model, snap)


def test_checkpoint_round_trip_between_plain_and_optimized():
    source = _model(seed=3)
    ids = _ids(2, 6)
    with torch.no_grad():
        ref = source(ids).logits
    target = _model(seed=4)
    kernel_moe.optimize(target)
    target.load_state_dict(source.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_training_gradients_match():
    model = _model(seed=5).train()
    original = copy.deepcopy(model)
    kernel_moe.optimize(model)
    assert all(layer.mlp.spec.training_fallback is None for layer in model.model.layers)
    ids = _ids(2, 7, seed=6)
    loss = model(ids, labels=ids).loss
    loss_ref = original(ids, labels=ids).loss
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    loss_ref.backward()
    assert_same_grads(model, original)


def test_bf16_block_matches_fp32_reference():
    model = _model(seed=7)
    block = model.model.layers[0].mlp
    reference = copy.deepcopy(block).to(torch.bfloat16).float()  # bf16-rounded weights, fp32 math
    layer = kernel_moe.UnifiedManager().convert(block).to(torch.bfloat16)
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(8)).bfloat16()
    assert_bf16_matches_fp32_reference(layer, reference, x)


def test_compiled_decoder_layer_has_no_graph_breaks_and_matches():
    torch._dynamo.reset()
    model = _model(seed=9)
    original = copy.deepcopy(model)
    kernel_moe.optimize(model)
    layer, layer_ref = model.model.layers[0], original.model.layers[0]
    hidden = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(10))
    assert_compiles_whole_and_matches(layer, layer_ref, hidden, decoder_kwargs(model, hidden), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
