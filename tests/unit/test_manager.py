"""UnifiedManager: swap, idempotency, restore, state_dict/Parameter identity, checkpoints,
dtype conversion, filter_fn, strict mode, expectations from the config and unsupported modules."""

from __future__ import annotations

import copy
import io
import logging
import re

import pytest
import torch
from torch import nn

import kernel_moe
from helpers import (
    TopKMoE,
    TwoBlockModel,
    assert_bf16_matches_fp32_reference,
    assert_fp32_close,
    assert_same_state,
    param_ids,
    parameter_storage_bytes,
    snapshot_state,
    stacked_tensors,
)
from kernel_moe import FusedMoE, KernelConfig, UnifiedManager, UnsupportedInputError, UnsupportedModuleError


def _model(seed: int = 0, **kw) -> TwoBlockModel:
    torch.manual_seed(seed)
    return TwoBlockModel(**kw).eval()


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(123))


class _Holder(nn.Module):
    """A model around one candidate block."""

    def __init__(self, block: nn.Module, hidden: int = 16) -> None:
        super().__init__()
        self.pre = nn.Linear(hidden, hidden)
        self.moe = block

    def forward(self, x):
        out = self.moe(self.pre(x))
        return out[0] if isinstance(out, tuple) else out


class _AuxLossMoE(TopKMoE):
    """Returns (output, scalar aux loss)."""

    def forward(self, x):
        out = super().forward(x)
        return out, out.pow(2).mean()


class _FourLinearExpert(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, inter)
        self.fc2 = nn.Linear(inter, inter)
        self.fc3 = nn.Linear(inter, inter)
        self.fc4 = nn.Linear(inter, hidden)

    def forward(self, x):
        return self.fc4(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


class _FourLinearMoE(TopKMoE):
    def __init__(self, hidden: int = 16, inter: int = 24, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__(hidden, inter, num_experts, top_k)
        self.experts = nn.ModuleList(_FourLinearExpert(hidden, inter) for _ in range(num_experts))


# --- swap, equality, idempotency, restore ---------------------------------------------------


def test_optimize_swaps_every_block_and_keeps_outputs():
    model = _model()
    original = copy.deepcopy(model)
    manager = UnifiedManager(KernelConfig.for_moe(top_k=2))
    manager.optimize(model)
    report = manager.report
    assert report.num_swapped == 2
    assert all(isinstance(b, FusedMoE) for b in model.blocks)
    with torch.no_grad():
        for shape in ((3, 7, 16), (11, 16), (1, 1, 16)):
            x = _x(*shape)
            assert_fp32_close(model(x), original(x))
    # With gradients enabled (the differentiable weight path) the outputs agree too.
    x = _x(2, 5, 16)
    assert_fp32_close(model(x), original(x))


def test_optimize_is_idempotent():
    model = _model()
    x = _x(2, 9, 16)
    kernel_moe.optimize(model)
    layers = list(model.blocks)
    with torch.no_grad():
        before = model(x)
    again = kernel_moe.optimize(model, return_report=True)[1]
    assert again.swapped == [] and again.skipped == []
    assert again.already_optimized == ["blocks.0", "blocks.1"]
    assert all(a is b for a, b in zip(model.blocks, layers))
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_restore_puts_the_original_modules_back():
    model = _model()
    originals = list(model.blocks)
    x = _x(2, 9, 16)
    with torch.no_grad():
        ref = model(x)
    assert kernel_moe.optimize(model) is model
    assert kernel_moe.restore(model) is model
    assert all(a is b for a, b in zip(model.blocks, originals))
    assert all(type(b) is TopKMoE for b in model.blocks)
    with torch.no_grad():
        assert_fp32_close(model(x), ref)
    assert kernel_moe.restore(model) is model and list(model.blocks) == originals
    # The restored model can be optimized again.
    assert kernel_moe.optimize(model, return_report=True)[1].num_swapped == 2
    with torch.no_grad():
        assert_fp32_close(model(x), ref)


def test_logs_one_info_summary_per_optimize(caplog):
    model = _model()
    with caplog.at_level(logging.INFO, logger="kernel_moe"):
        kernel_moe.optimize(model)
    infos = [r for r in caplog.records if r.name == "kernel_moe" and r.levelno == logging.INFO]
    assert len(infos) == 1 and "swapped 2" in infos[0].getMessage()


# --- state, Parameters, memory ----------------------------------------------------------------


def test_state_dict_and_parameter_objects_are_unchanged_by_optimize_and_restore():
    model = _model()
    snap = snapshot_state(model)
    ids = param_ids(model)
    buffers = {n: id(b) for n, b in model.named_buffers()}
    kernel_moe.optimize(model)
    assert_same_state(model, snap)
    assert param_ids(model) == ids
    assert {n: id(b) for n, b in model.named_buffers() if not n.endswith("routing_counts")} == buffers
    kernel_moe.restore(model)
    assert_same_state(model, snap)
    assert param_ids(model) == ids


def test_per_expert_parameters_are_repointed_without_doubling_memory():
    model = _model()
    before = parameter_storage_bytes(model)
    kernel_moe.optimize(model)
    stacks = stacked_tensors(model)
    assert stacks, "hand-written experts are expected to be re-pointed into stacked storage"
    assert parameter_storage_bytes(model, stacks) == before
    # Every expert weight is a view into its layer's stack.
    for layer in model.blocks:
        ptrs = {t.untyped_storage().data_ptr() for t in layer._stacked_weights.values()}
        for expert in layer.experts:
            for p in expert.parameters():
                assert p.untyped_storage().data_ptr() in ptrs


def test_checkpoint_saved_before_optimize_loads_into_optimized_model_and_back():
    source = _model(seed=1)
    x = _x(2, 6, 16)
    with torch.no_grad():
        ref = source(x)
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)

    target = _model(seed=2)
    kernel_moe.optimize(target)
    buf.seek(0)
    target.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    with torch.no_grad():
        assert_fp32_close(target(x), ref)

    # And the optimized model's checkpoint loads into a plain model.
    buf2 = io.BytesIO()
    torch.save(target.state_dict(), buf2)
    buf2.seek(0)
    plain = _model(seed=3)
    plain.load_state_dict(torch.load(buf2, weights_only=True), strict=True)
    with torch.no_grad():
        assert_fp32_close(plain(x), ref)


def test_load_state_dict_with_assign_replaces_parameters_and_is_seen():
    source = _model(seed=4)
    x = _x(3, 16)
    with torch.no_grad():
        ref = source(x)
    target = _model(seed=5)
    kernel_moe.optimize(target)
    target.load_state_dict({k: v.clone() for k, v in source.state_dict().items()}, assign=True)
    with torch.no_grad():
        assert_fp32_close(target(x), ref)


@pytest.mark.parametrize("convert", ["double", "to_float64"])
def test_float64_conversion_after_optimize_rebinds_weights(convert):
    model = _model()
    original = copy.deepcopy(model).double()
    fp32_bytes = parameter_storage_bytes(model)
    ids = param_ids(model)
    kernel_moe.optimize(model)
    model = model.double() if convert == "double" else model.to(torch.float64)
    assert param_ids(model) == ids
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for layer in model.blocks:
        assert all(t.dtype == torch.float64 for t in layer._stacked_weights.values())
    # No stale fp32 stack is kept alive and nothing is duplicated.
    assert parameter_storage_bytes(model, stacked_tensors(model)) == 2 * fp32_bytes
    x = _x(2, 5, 16).double()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-12, rtol=1e-12)


def test_bfloat16_conversion_after_optimize_matches_fp32_reference():
    model = _model()
    kernel_moe.optimize(model)
    model = model.to(torch.bfloat16)
    reference = _model().to(torch.bfloat16).float()  # same bf16-rounded weights, computed in fp32
    x = _x(4, 8, 16).bfloat16()
    assert_bf16_matches_fp32_reference(model, reference, x)


# --- filter_fn, strict, config expectations, backend ------------------------------------------


def test_filter_fn_receives_module_and_fqn_and_limits_swaps():
    model = _model()
    seen = []

    def only_second(module, fqn):
        seen.append((type(module).__name__, fqn))
        return fqn != "blocks.0"

    report = kernel_moe.optimize(model, filter_fn=only_second, return_report=True)[1]
    assert [r.name for r in report.swapped] == ["blocks.1"]
    assert type(model.blocks[0]) is TopKMoE and isinstance(model.blocks[1], FusedMoE)
    assert ("TopKMoE", "blocks.0") in seen and ("TwoBlockModel", "") in seen
    assert all(not fqn.startswith("blocks.1.") for _, fqn in seen)


@pytest.mark.parametrize(
    "config,reason",
    [
        (KernelConfig.for_moe(num_experts=8), "config expects num_experts=8"),
        (KernelConfig.for_moe(top_k=1), "config expects top_k=1"),
        (KernelConfig.for_moe(num_experts=4, top_k=3), "config expects top_k=3"),
    ],
)
def test_config_expectation_mismatch_skips_with_reason(config, reason):
    model = _model()
    snap = snapshot_state(model)
    manager = UnifiedManager(config)
    manager.optimize(model)
    report = manager.report
    assert report.swapped == []
    assert [r.name for r in report.skipped] == ["blocks.0", "blocks.1"]
    assert all(reason in r.reason for r in report.skipped)
    assert all(type(b) is TopKMoE for b in model.blocks)
    assert_same_state(model, snap)
    with pytest.raises(UnsupportedModuleError, match=re.escape(reason)):
        UnifiedManager(config).optimize(model, strict=True)


def test_matching_expectations_swap():
    model = _model()
    manager = UnifiedManager(KernelConfig.for_moe(num_experts=4, top_k=2))
    manager.optimize(model)
    assert manager.report.num_swapped == 2


@pytest.mark.parametrize(
    "block,reason",
    [
        (_AuxLossMoE(), "output 1 (shape [], float32) matches none"),
        (_FourLinearMoE(), "4 Linear layers"),
    ],
    ids=["returns_aux_loss", "four_linear_experts"],
)
def test_unsupported_block_is_skipped_untouched_and_strict_raises(block, reason):
    model = _Holder(block).eval()
    snap = snapshot_state(model)
    x = _x(2, 5, 16)
    with torch.no_grad():
        ref = model(x)
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.swapped == []
    assert [(r.name, r.module_class) for r in report.skipped] == [("moe", type(block).__name__)]
    assert reason in report.skipped[0].reason
    assert model.moe is block
    assert_same_state(model, snap)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    with pytest.raises(UnsupportedModuleError, match=re.escape(reason)):
        kernel_moe.optimize(model, strict=True)
    assert model.moe is block


def test_model_that_is_itself_a_block_comes_back_as_the_fused_layer():
    """004: ``optimized_moe_model = manager.optimize(moe_model)`` with an MoE block as the model."""
    block = TopKMoE().eval()
    manager = UnifiedManager()
    optimized = manager.optimize(block)
    assert isinstance(optimized, FusedMoE) and optimized.original is block
    assert [r.name for r in manager.report.swapped] == ["<root>"] and not manager.report.skipped
    x = _x(6, 16)
    with torch.no_grad():
        assert_fp32_close(optimized(x), block(x))
    assert manager.optimize(optimized) is optimized and manager.report.already_optimized == ["<root>"]
    assert kernel_moe.restore(optimized) is block
    layer = UnifiedManager().convert(block)
    assert isinstance(layer, FusedMoE) and layer.original is block
    fused, report = kernel_moe.optimize(TopKMoE().eval(), return_report=True)
    assert isinstance(fused, FusedMoE) and report.num_swapped == 1


def test_convert_of_non_moe_module_raises():
    with pytest.raises(UnsupportedModuleError, match="not recognized"):
        UnifiedManager().convert(nn.Linear(4, 4))
    with pytest.raises(UnsupportedModuleError, match="4 Linear layers"):
        UnifiedManager().convert(_FourLinearMoE())


def test_verify_false_swaps_without_probing():
    model = _model()
    original = copy.deepcopy(model)
    manager = UnifiedManager(KernelConfig.for_moe(verify=False))
    manager.optimize(model)
    report = manager.report
    assert report.num_swapped == 2
    x = _x(2, 5, 16)
    with torch.no_grad():
        assert_fp32_close(model(x), original(x))


def test_swapped_layer_is_built_with_the_config_and_the_original_training_flag():
    model = _model()
    config = KernelConfig.for_moe(top_k=2, capacity_factor=4.0, deterministic=False)
    manager = UnifiedManager(config)
    manager.optimize(model)
    report = manager.report
    layer = model.blocks[0]
    assert layer.kernel_config is config and layer.deterministic is False and layer.backend == "auto"
    assert layer.training is False  # the model is in eval mode, and so is what replaced its blocks
    assert report.swapped[0].details == layer.details()
    assert "capacity x4" in layer.details()
    with pytest.raises(ValueError, match="config must be a KernelConfig or None"):
        FusedMoE(layer.original, layer.spec, "cpu")  # type: ignore[arg-type]


def test_meta_parameters_are_skipped_with_reason():
    with torch.device("meta"):
        model = TwoBlockModel()
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.swapped == []
    assert all("meta" in r.reason for r in report.skipped) and len(report.skipped) == 2


@pytest.mark.parametrize("verify", [True, False])
def test_triton_backend_on_cpu_without_interpreter_raises_clear_error(monkeypatch, verify):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = _model()
    snap = snapshot_state(model)
    with pytest.raises(UnsupportedInputError, match="TRITON_INTERPRET"):
        UnifiedManager(KernelConfig.for_moe(backend="triton", verify=verify)).optimize(model)
    assert all(type(b) is TopKMoE for b in model.blocks)
    assert_same_state(model, snap)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="KernelConfig"):
        UnifiedManager(config={"top_k": 2})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nn.Module"):
        UnifiedManager().optimize("model")  # type: ignore[arg-type]


def test_optimize_a_frozen_handwritten_model():
    """Inference models are often frozen (requires_grad False): the probe reads weights by path."""
    model = TwoBlockModel()
    model.requires_grad_(False)
    original = copy.deepcopy(model)
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert report.num_swapped == 2 and not report.skipped
    x = torch.randn(3, 16)
    assert_fp32_close(model(x), original(x))
