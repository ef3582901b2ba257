"""Every transformers MoE family builds as a tiny random model and runs a forward pass.

The catalogue (:func:`moe_model_types`) is found from the installed transformers, so this file
follows whatever version is installed. A type the installed version cannot build tiny is skipped
with the reason; a type whose forward fails inside transformers itself, as recorded in
``upstream_failures.py`` for the installed version, is reported as an expected failure (and
fails once that version range runs it); anything else that breaks fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.integration.hf_tiny import (
    NUM_EXPERTS,
    TinyModelError,
    build_tiny_model,
    first_tensor,
    forward_module,
    modeling_module,
    moe_classes,
    moe_model_types,
    tiny_config,
    tiny_inputs,
)
from tests.integration.upstream_failures import UPSTREAM_FAILURES, UpstreamFailure, known_upstream_failure

CORE_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"}
MAX_TINY_PARAMS = 16_000_000


def test_catalogue_has_the_core_families():
    types = moe_model_types()
    assert CORE_FAMILIES <= set(types), sorted(CORE_FAMILIES - set(types))
    assert types == sorted(set(types))


def test_catalogue_excludes_dense_models():
    types = set(moe_model_types())
    assert not {"llama", "mistral", "qwen2", "gpt2", "bert"} & types


def test_tiny_config_of_unknown_type_is_none():
    assert tiny_config("no_such_model_type") is None


def test_tiny_config_is_small_and_sparse_from_layer_zero():
    config = tiny_config("deepseek_v3")
    assert config.hidden_size <= 64 and config.num_hidden_layers == 2
    assert config.n_routed_experts == NUM_EXPERTS and config.num_experts_per_tok == 2
    assert config.first_k_dense_replace == 0
    assert config.n_group == 2 and config.topk_group == 1
    assert config._attn_implementation == "eager"
    qwen = tiny_config("qwen2_moe")
    assert qwen.decoder_sparse_step == 1 and qwen.mlp_only_layers == []


def test_tiny_config_overrides_merge():
    config = tiny_config("mixtral", num_local_experts=4, hidden_size=32)
    assert config.num_local_experts == 4 and config.hidden_size == 32


def test_build_is_seeded_and_takes_a_dtype():
    a = build_tiny_model("mixtral", seed=0)
    b = build_tiny_model("mixtral", seed=0)
    c = build_tiny_model("mixtral", seed=1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))
    half = build_tiny_model("mixtral", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert not half.training


def test_low_precision_keeps_what_from_pretrained_keeps_in_fp32():
    model = build_tiny_model("deepseek_v3", dtype=torch.bfloat16)
    mlp = model.model.layers[0].mlp
    assert mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert mlp.gate.e_score_correction_bias.dtype == torch.float32  # _keep_in_fp32_modules_strict


def test_random_weights_reach_router_and_selection_bias():
    model = build_tiny_model("deepseek_v3")
    gate = model.model.layers[0].mlp.gate
    assert gate.weight.std() > 0.05
    assert gate.e_score_correction_bias.abs().sum() > 0


@pytest.mark.parametrize("model_type", moe_model_types())
def test_tiny_model_builds_and_runs(model_type: str):
    try:
        model = build_tiny_model(model_type)
    except TinyModelError as exc:
        pytest.skip(str(exc))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < MAX_TINY_PARAMS, f"{model_type}: {n_params} parameters is not tiny"

    classes = tuple(moe_classes(modeling_module(model_type)))
    moe_modules = [m for m in model.modules() if isinstance(m, classes)]
    assert moe_modules, f"{model_type}: no MoE module in the tiny model"
    for module in moe_modules:
        if hasattr(module, "has_gate"):  # use_experts_implementation experts
            assert module.num_experts == NUM_EXPERTS, type(module).__name__

    called: list[torch.Tensor] = []

    def record(_module: nn.Module, _args, output) -> None:
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(tensor, torch.Tensor):
            called.append(tensor.detach())

    handles = [m.register_forward_hook(record) for m in moe_modules]
    known = known_upstream_failure(model_type)
    try:
        with torch.no_grad():
            output = forward_module(model)(**tiny_inputs(model))
    except Exception as exc:
        if known is not None and known.matches(exc):
            pytest.xfail(known.describe())
        raise
    finally:
        for handle in handles:
            handle.remove()
    if known is not None:
        pytest.fail(f"{model_type} runs with this transformers, but upstream_failures.py records "
                    f"{known.describe()}: remove the entry or narrow its version range")

    main = first_tensor(output)
    assert torch.isfinite(main).all(), f"{model_type}: non-finite output"
    assert main.float().std() > 0, f"{model_type}: constant output"
    assert called, f"{model_type}: the forward pass ran no MoE module"
    assert any(t.float().abs().sum() > 0 for t in called), f"{model_type}: MoE outputs are all zero"


def test_upstream_failure_table_is_well_formed():
    assert len({(f.model_type, f.versions) for f in UPSTREAM_FAILURES}) == len(UPSTREAM_FAILURES)
    for entry in UPSTREAM_FAILURES:
        assert ":" in entry.error and entry.where, entry
    doge = known_upstream_failure("doge", "5.17.0")
    assert doge is not None and known_upstream_failure("doge", "5.18.0") is None
    assert known_upstream_failure("llama4", "5.23.0") is None and known_upstream_failure("mixtral", "5.24.0") is None
    entry = UpstreamFailure("x", ">=1", "TypeError: bad", "here")
    assert entry.matches(TypeError("bad input")) and not entry.matches(ValueError("bad"))
