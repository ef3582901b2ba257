"""Families fused whole by recognition of what their blocks compute (tiny random models, no download).

For each: every MoE block becomes a FusedMoE with the expected reading (clamped or softcapped
SwiGLU, relu^2, input-scaled routing, identity experts, packed weights, the block's own capacity,
hash routing, reshaped or scaled outputs), and the fused block gives the original's outputs in eval
and train mode and its gradients (inputs and every parameter). The whole model, reported swapped
whole, gives the original's logits in fp32 and the same greedy generation. Decoys, modules that look the same
but compute something else, are in tests/integration/test_hf_decoys.py.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import kernel_moe
from kernel_moe import FusedMoE
from kernel_moe.kernels.quantization import dequantize
from kernel_moe.layers.weights import PairedRowsWeight

pytest.importorskip("transformers")

from tests.integration.hf_tiny import (  # noqa: E402
    HIDDEN,
    build_tiny_model,
    first_tensor,
    forward_module,
    moe_model_types,
    randomize_weights,
    tiny_config,
    tiny_inputs,
)

FP32 = dict(atol=1e-5, rtol=1e-5)
GRAD = dict(atol=1e-4, rtol=1e-4)


def _build(model_type: str, seed: int = 21, **overrides):
    if model_type not in moe_model_types():
        pytest.skip(f"{model_type} is not in this transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_tiny_model(model_type, seed=seed, **overrides)


def _eager(model) -> None:
    try:
        model.set_experts_implementation("eager")
    except Exception:  # noqa: BLE001 - models without the experts interface loop in eager anyway
        pass


def _fused(model_type: str, scale_before: float | None = None, **overrides):
    """(optimized model, original model with eager experts, report, names of the FusedMoE blocks);
    ``scale_before``: the value every router's ``global_scale`` gets first (1 after randomize_weights)."""
    model = _build(model_type, **overrides)
    if scale_before is not None:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(getattr(module, "global_scale", None), torch.nn.Parameter):
                    module.global_scale.fill_(scale_before)
    original = copy.deepcopy(model)
    _eager(original)
    report = kernel_moe.optimize(model, return_report=True)[1]
    names = [n for n, m in model.named_modules() if isinstance(m, FusedMoE)]
    return model, original, report, names


def _block_args(layer: FusedMoE, seq: int = 9, batch: int = 2, seed: int = 31) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, layer.hidden_size, generator=g)
    if layer.spec.token_ids is None:
        return (x,)
    return (x, torch.randint(0, layer.spec.token_ids.vocab, (batch, seq), generator=g))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _outputs_and_grads(module, args: tuple, training: bool):
    """Every output of module(*args) and the gradients of a fixed projection of the first one with
    respect to the hidden states and every parameter (by name)."""
    x = args[0].detach().clone().requires_grad_()
    module.train(training)
    for p in module.parameters():
        p.grad = None
    out = module(x, *args[1:])
    outs = out if isinstance(out, tuple) else (out,)
    cot = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(5))
    (outs[0] * cot).sum().backward()
    grads = {"input": x.grad.clone()}
    grads.update({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    module.eval()
    return [o.detach() for o in outs], grads


def _assert_same_grads(grads: dict, ref_grads: dict) -> None:
    """Equal gradients by name. A parameter the original leaves without a gradient (an expert no
    token reached in its loop) must get exactly zero from the fused layer, which touches every
    expert's weights: the rule the manager's gradient proof applies."""
    for name in set(grads) | set(ref_grads):
        grad, ref = grads.get(name), ref_grads.get(name)
        if ref is None or grad is None:
            present = ref if grad is None else grad
            assert not present.any(), f"{name}: a gradient on one side only, and not zero"
            continue
        torch.testing.assert_close(grad, ref, **GRAD, msg=name)


def assert_block_equivalent(layer: FusedMoE, original_block, args: tuple, training: bool = True) -> None:
    """The fused block gives the original's outputs and gradients, in eval and (when it has no
    training fallback) in train mode."""
    for mode in (False, True) if training else (False,):
        outs, grads = _outputs_and_grads(layer, args, mode)
        ref_outs, ref_grads = _outputs_and_grads(original_block, args, mode)
        assert len(outs) == len(ref_outs)
        for out, ref in zip(outs, ref_outs):
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, **FP32)
        _assert_same_grads(grads, ref_grads)


def _extra_kinds(spec) -> list[str]:
    """The kinds of what a fused block returns after its output."""
    return [e.kind for e in spec.returned_extras()]


def _check_family(model_type: str, expected_blocks: int, **overrides) -> list[FusedMoE]:
    model, original, report, names = _fused(model_type, **overrides)
    assert len(names) == expected_blocks, (names, [(r.name, r.reason) for r in report.skipped])
    assert report.skipped == [], [(r.name, r.reason) for r in report.skipped]
    layers = [model.get_submodule(n) for n in names]
    for name, layer in zip(names, layers):
        assert layer.spec.gradient_fallback is None, layer.spec.gradient_fallback
        assert_block_equivalent(layer, original.get_submodule(name), _block_args(layer),
                                training=layer.spec.training_fallback is None)
    return layers


@pytest.mark.parametrize("model_type", ["glm5_next_text", "hy_v4"])
def test_clamped_swiglu_is_fused_with_its_limit(model_type):
    layers = _check_family(model_type, 2)
    limit = layers[0].original.experts.swiglu_limit
    act = layers[0].spec.experts.activation
    assert (act.kind, act.glu, act.limit, act.softcapped) == ("silu", "concat", limit, False)


def test_deepseek_v4_clamped_swiglu_sqrt_softplus_router_and_hash_layer():
    hashed, learned = _check_family("deepseek_v4", 2)
    assert hashed.spec.router.id_table == "gate.tid2eid" and hashed.spec.token_ids.name == "input_ids"
    assert hashed.spec.token_ids.vocab == hashed.original.gate.tid2eid.shape[0]
    assert learned.spec.router.id_table is None and learned.spec.router.selection_bias == "gate.e_score_correction_bias"
    for layer in (hashed, learned):
        routing = layer.spec.router.routing
        assert (routing.scoring, routing.renormalize) == ("sqrtsoftplus", True)
        assert layer.spec.experts.activation.limit == layer.original.experts.limit
    # the decoder passes the token ids by keyword; a hash layer without them cannot route
    x, ids = _block_args(hashed)
    with torch.no_grad():
        torch.testing.assert_close(hashed(x, input_ids=ids), hashed.original(x, input_ids=ids), **FP32)
        torch.testing.assert_close(learned(x, input_ids=ids), learned.original(x), **FP32)
        with pytest.raises(ValueError, match="input_ids"):
            hashed(x)
        with pytest.raises(TypeError):
            learned(x, ids, ids)


def test_softcapped_swiglu_reads_the_caps_from_the_module():
    layers = _check_family("inkling2_text", 2)
    act_fn = layers[0].original.experts.act_fn
    act = layers[0].spec.experts.activation
    assert (act.kind, act.limit) == ("silu", math.inf)
    assert (act.gate_softcap, act.up_softcap) == (act_fn.gate_softcap.softcap, act_fn.up_softcap.softcap)


def test_relu_squared_experts_are_fused():
    (layer,) = _check_family("nemotron_h", 1)
    act = layer.spec.experts.activation
    assert (act.kind, act.glu) == ("relu2", "none")


def test_muse_spark_post_expert_norm_between_its_projections():
    """MuseSpark: the router scales its logits (output_multiplier) and has a selection bias; the
    experts run at their own width between the block's projection + norm and its output
    projection, and normalise each expert output (scale 1 + w, then RMS) before its weight."""
    layers = _check_family("muse_spark_text", 2)
    spec, original = layers[0].spec, layers[0].original
    assert spec.router.logit_scale == original.gate.output_multiplier
    assert spec.router.selection_bias == "gate.e_score_correction_bias"
    assert (spec.expert_input, spec.expert_output) == (("pre_expert_proj", "pre_expert_norm"), ("post_expert_proj",))
    assert (spec.block_hidden, spec.experts.hidden) == (HIDDEN, original.experts.hidden_dim)
    norm = spec.experts.post_norm
    assert (norm.weight, norm.offset, norm.eps) == ("experts.post_expert_norm.weight", 1.0,
                                                     original.experts.post_expert_norm.eps)


def test_axk1_norm_of_the_block_output_after_the_shared_expert():
    layers = _check_family("axk1", 2)
    spec = layers[0].spec
    assert (spec.block_output, spec.expert_input, spec.expert_output) == (("post_mlp_layernorm",), (), ())
    assert spec.shared_expert == "shared_experts" and spec.block_hidden == HIDDEN


@pytest.mark.parametrize("eps", [None, 0.2])
def test_phimoe_sparsemixer_router(eps):
    """Phi-3.5-MoE's SparseMixer at its declared threshold (the default, and a wide one at which
    many probe tokens have several experts in each round's softmax); training runs the original."""
    layers = _check_family("phimoe", 2, **({} if eps is None else dict(router_jitter_noise=eps)))
    for layer in layers:
        routing = layer.spec.router.routing
        assert (routing.scoring, routing.mixer_eps) == ("sparsemixer", layer.original.router.router_jitter_noise)
        assert layer.spec.training_fallback  # sampled experts in training: the original runs there


@pytest.mark.parametrize("shared", [1, 2])
def test_inkling_shared_experts_weighted_by_the_router(shared):
    """Inkling: the router scores E routed and S shared ids, renormalises the k chosen and the S
    shared scores together and scales them by route_scale and a learnable global_scale (set away from
    1 here, so that the probe sees it); the shared experts module takes its S weights per token."""
    model, original, report, names = _fused("inkling_text", n_shared_experts=shared, scale_before=1.7)
    _assert_swapped_whole(report, 2)
    for name in names:
        layer, block = model.get_submodule(name), original.get_submodule(name)
        spec = layer.spec
        assert (spec.shared_expert, spec.shared_weighted) == ("shared_experts", True)
        routing = spec.router.routing
        assert (routing.num_experts, routing.shared_ids, routing.scaling) == (8, shared, block.gate.route_scale)
        assert (spec.router.weight_scale, spec.router.selection_bias) == ("gate.global_scale",
                                                                          "gate.e_score_correction_bias")
        assert layer.spec.gradient_fallback is None and layer.spec.training_fallback is None
        assert_block_equivalent(layer, block, _block_args(layer))


def test_muse_spark_experts_alone_with_their_post_expert_norm():
    """The experts module swapped alone (its block left to transformers) keeps the norm: outputs
    and gradients of the inputs, routing weights, expert weights and the norm weight."""
    model = _build("muse_spark_text")
    experts = next(m for m in model.modules() if type(m).__name__ == "MuseSparkExperts")
    original = copy.deepcopy(experts)
    _eager(original)
    fused = kernel_moe.optimize(experts)
    assert type(fused).__name__ == "FusedExperts" and fused.spec.experts.post_norm is not None
    g = torch.Generator().manual_seed(4)
    H, E = fused.spec.experts.hidden, fused.spec.num_experts
    x = torch.randn(11, H, generator=g)
    weights, ids = torch.randn(11, E, generator=g).softmax(-1).topk(2, dim=-1)
    outs = []
    for module in (fused, original):
        xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
        for p in module.parameters():
            p.grad = None
        out = module(xi, ids, wi)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
        outs.append((out.detach(), xi.grad, wi.grad, {n: p.grad for n, p in module.named_parameters()}))
    (out, gx, gw, gp), (ref, rgx, rgw, rgp) = outs
    torch.testing.assert_close(out, ref, **FP32)
    torch.testing.assert_close(gx, rgx, **GRAD)
    torch.testing.assert_close(gw, rgw, **GRAD)
    assert set(gp) == set(rgp)
    for name in gp:
        torch.testing.assert_close(gp[name], rgp[name], **GRAD, msg=name)


def test_muse_spark_through_the_transformers_experts_interface():
    """set_experts_implementation("kernel_moe") on MuseSpark: the interface function applies the
    post-expert norm itself (transformers applies it inside its own implementations only)."""
    from kernel_moe.adapters import transformers_interface

    assert transformers_interface.register()
    model = _build("muse_spark_text")
    original = copy.deepcopy(model)
    _eager(original)
    model.set_experts_implementation("kernel_moe")
    assert transformers_interface.prepare(model) == 2
    inputs = tiny_inputs(model, batch=2, seq=7, seed=17)
    with torch.no_grad():
        out, ref = first_tensor(model(**inputs)), first_tensor(original(**inputs))
    torch.testing.assert_close(out, ref, **FP32)


def test_llama4_routing_weights_scale_the_experts_inputs():
    layers = _check_family("llama4_text", 2)
    spec = layers[0].spec
    assert spec.scale_inputs and (_extra_kinds(spec), spec.output_shape) == (["logits"], "tokens")
    assert (spec.router.routing.scoring, spec.router.routing.renormalize) == ("sigmoid", False)
    assert spec.shared_expert == "shared_expert"


def test_longcat_identity_experts_are_added_outside_the_op():
    layers = _check_family("longcat_flash", 2)
    spec = layers[0].spec
    assert (spec.num_experts, spec.experts.num_experts, spec.weightless) == (10, 8, "identity")
    x = _block_args(layers[0], seq=24)[0]
    with torch.no_grad():
        _, ids = layers[0].original.router(x)[1:]
    assert bool((ids >= 8).any()), "the probe routes no token to an identity expert"


def test_dbrx_packed_weights_are_read_in_place():
    layers = _check_family("dbrx", 2)
    layer = layers[0]
    mlp = layer.experts.mlp
    assert isinstance(layer.spec.experts.up, PairedRowsWeight)
    assert layer.spec.experts.activation.glu == "interleaved"
    with torch.no_grad():
        w_up = layer.spec.experts.up.get(layer)
    # gate and up rows live in one storage the op reads as [E, 2I, H]: no copy per forward
    assert w_up.untyped_storage().data_ptr() == mlp.w1.untyped_storage().data_ptr() == (
        mlp.v1.untyped_storage().data_ptr())
    assert torch.equal(w_up[:, 0::2].reshape(-1, HIDDEN), mlp.w1) and torch.equal(w_up[:, 1::2].reshape(-1, HIDDEN),
                                                                                    mlp.v1)
    # .to() re-points them again; the module still computes the same
    x = _block_args(layer)[0]
    with torch.no_grad():
        before = layer(x)
        layer.double()
        assert layer.spec.experts.up.is_bound(layer)
        torch.testing.assert_close(layer(x.double()).float(), before, **FP32)


def test_switch_capacity_drops_what_the_router_drops():
    layers = _check_family("switch_transformers", 4)
    layer = layers[0]
    capacity = layer.spec.capacity
    assert (capacity.slots, capacity.per_sequence) == (layer.original.router.expert_capacity, True)
    assert layer.spec.training_fallback is not None  # dropout and router jitter in training
    args = _block_args(layer, seq=capacity.probe_tokens(8, 1))
    with torch.no_grad():
        ref = layer.original(*args)
        dropped = (ref == 0).all(dim=-1).sum().item()
        assert dropped > 0, "the probe overflows no expert"
        torch.testing.assert_close(layer(*args), ref, **FP32)


def test_ernie_vl_blocks_return_flattened_outputs():
    layers = _check_family("ernie4_5_vl_moe_text", 4)
    spec = layers[0].spec
    assert (_extra_kinds(spec), spec.output_shape) == (["logits"], "flat")
    # the modality-isolated block routes a 1-D selection of tokens through each
    x = torch.randn(5 * HIDDEN)
    with torch.no_grad():
        out, logits = layers[0](x)
        ref_out, ref_logits = layers[0].original(x)
    torch.testing.assert_close(out, ref_out, **FP32)
    torch.testing.assert_close(logits, ref_logits, **FP32)


def test_privacy_filter_scales_back_its_routed_output():
    layers = _check_family("openai_privacy_filter", 2)
    spec = layers[0].spec
    k = spec.router.routing.top_k
    assert (spec.routed_scale, spec.router.routing.scaling, _extra_kinds(spec)) == (k, 1.0 / k, ["weights"])



FAMILIES = {  # model type: MoE blocks of the tiny model (2 layers; Switch has 2 in the encoder and 2 in the decoder)
    "glm5_next_text": 2, "hy_v4": 2, "deepseek_v4": 2, "inkling2_text": 2, "nemotron_h": 1, "llama4_text": 2,
    "longcat_flash": 2, "dbrx": 2, "switch_transformers": 4, "ernie4_5_vl_moe_text": 4, "openai_privacy_filter": 2,
    "muse_spark_text": 2, "axk1": 2, "phimoe": 2, "inkling_text": 2,
}
GENERATIVE = {  # a family whose tiny model cannot generate: the class that does, and the type of its config
    "glm5_next_text": ("Glm5NextForConditionalGeneration", "glm5_next"),
    "switch_transformers": ("SwitchTransformersForConditionalGeneration", "switch_transformers"),
    "ernie4_5_vl_moe_text": ("Ernie4_5_VLMoeForConditionalGeneration", "ernie4_5_vl_moe"),
    "muse_spark_text": ("MuseSparkForConditionalGeneration", "muse_spark"),
}
NOT_GENERATIVE = {"openai_privacy_filter"}  # a token classifier


def _assert_swapped_whole(report, blocks: int) -> None:
    assert report.skipped == [], [(r.name, r.reason) for r in report.skipped]
    assert [r.new_class for r in report.swapped] == ["FusedMoE"] * blocks


def _generative_pair(model_type: str, model, original) -> tuple:
    """(optimized, original) models that generate: the tiny ones, or the family's generative class
    built from the tiny config of its own type (same recognition, reported whole again)."""
    if model.can_generate():
        return model, original
    import transformers

    cls_name, config_type = GENERATIVE[model_type]
    model = getattr(transformers, cls_name)(tiny_config(config_type))
    randomize_weights(model, seed=21)
    model.eval()
    original = copy.deepcopy(model)
    report = kernel_moe.optimize(model, return_report=True)[1]
    _assert_swapped_whole(report, FAMILIES[model_type])
    return model, original


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_whole_model_logits_and_greedy_generation_are_unchanged(model_type):
    """The report says every MoE block was swapped whole; the model's output (logits) equals the
    original's in fp32 and greedy generation gives the same tokens."""
    model, original, report, names = _fused(model_type)
    _assert_swapped_whole(report, FAMILIES[model_type])
    assert sorted(r.name for r in report.swapped) == sorted(names)
    module, ref_module = forward_module(model), forward_module(original)
    for batch, seq in ((2, 9), (1, 1), (3, 4)):
        inputs = tiny_inputs(model, batch=batch, seq=seq, seed=seq)
        with torch.no_grad():
            out, ref = first_tensor(module(**inputs)), first_tensor(ref_module(**inputs))
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, **FP32)
    if model_type in NOT_GENERATIVE:
        assert not model.can_generate()
        return
    model, original = _generative_pair(model_type, model, original)
    ids = tiny_inputs(model, batch=2, seq=5, seed=3)["input_ids"]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    if model.config.is_encoder_decoder:
        kwargs["decoder_start_token_id"] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = model.generate(ids, **kwargs), original.generate(ids, **kwargs)
    new_tokens = 9 if model.config.is_encoder_decoder else 13  # the start token or the prompt, then 8
    assert ours.shape == (2, new_tokens)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("model_type", ["dbrx", "longcat_flash", "llama4_text", "muse_spark_text"])
def test_quantized_experts_of_the_new_layouts(model_type):
    """quantize_experts on packed paired rows (DBRX), an up weight with rows of weightless experts
    (LongCat), input-scaled routing (Llama 4) and the post-expert norm (MuseSpark): the blocks stay whole and compute what the
    original computes with the dequantized weights (fp32 tolerance), and a full-precision
    checkpoint quantizes on load into exactly the buffers optimize() made."""
    config = kernel_moe.KernelConfig.for_moe(quantize_experts="int8", quantize_keep_original=True)
    model, report = kernel_moe.optimize(_build(model_type), config, return_report=True)
    _assert_swapped_whole(report, FAMILIES[model_type])
    assert all("int8" in r.details for r in report.swapped)
    for record in report.swapped:
        layer = model.get_submodule(record.name)
        q, ex = layer.quantized_experts, layer.spec.experts
        args = _block_args(layer)
        with torch.no_grad():
            # the kept original, its expert weights replaced (through their views) by the dequantized ones
            ex.up.get(layer)[: ex.num_experts].copy_(dequantize(q.up_weight, q.up_scale, q.format))
            ex.down.get(layer).copy_(dequantize(q.down_weight, q.down_scale, q.format))
            torch.testing.assert_close(_first(layer(*args)), _first(layer.original(*args)), **FP32)

    released = kernel_moe.KernelConfig.for_moe(quantize_experts="int8")
    original = _build(model_type)
    model = kernel_moe.optimize(copy.deepcopy(original), released)
    reloaded = kernel_moe.optimize(_build(model_type, seed=22), released)
    reloaded.load_state_dict(original.state_dict())  # the full-precision checkpoint
    quantized, again = model.state_dict(), reloaded.state_dict()
    assert set(quantized) == set(again)
    for key, value in quantized.items():
        assert torch.equal(value, again[key]), key
