"""KernelConfig: validation of every field, frozen instances, for_moe/for_ffn and replace()."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from kernel_moe import KernelConfig

BAD_VALUES = [
    ("num_experts", 0),
    ("num_experts", -3),
    ("num_experts", 2.0),
    ("num_experts", True),
    ("num_experts", "8"),
    ("top_k", 0),
    ("top_k", -1),
    ("top_k", 1.5),
    ("top_k", False),
    ("capacity_factor", 0),
    ("capacity_factor", 0.0),
    ("capacity_factor", -1.25),
    ("capacity_factor", math.nan),
    ("capacity_factor", math.inf),
    ("capacity_factor", "1.0"),
    ("capacity_factor", True),
    ("min_capacity", -1),
    ("min_capacity", 1.5),
    ("capacity_priority", "random"),
    ("routing", "expert"),
    ("routing", None),
    ("load_balancing", "aux"),
    ("load_balancing", ""),
    ("load_balancing", None),
    ("aux_loss_weight", -0.01),
    ("aux_loss_weight", math.nan),
    ("z_loss_weight", -1.0),
    ("bias_update_rate", -1e-3),
    ("router_jitter", -0.1),
    ("router_jitter", 1.0),
    ("router_jitter", math.nan),
    ("router_jitter", "0.1"),
    ("expert_parallel", 1),
    ("expert_parallel", "no"),
    ("expert_parallel_mode", "dropless"),
    ("expert_parallel_mode", "padded"),  # needs expert_parallel=True
    ("expert_parallel_capacity_factor", 0.0),
    ("expert_parallel_capacity_factor", math.inf),
    ("backend", "cuda"),
    ("backend", "Triton"),
    ("backend", None),
    ("swap_moe", "yes"),
    ("swap_moe", 1),
    ("swap_ffn", 0),
    ("verify", None),
    ("deterministic", "true"),
    ("verify_tokens", 0),
    ("verify_tokens", 2.5),
]


def _assert_names(exc: pytest.ExceptionInfo, field: str, value: object) -> None:
    message = str(exc.value)
    assert field in message, message
    assert repr(value) in message, message


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_value_raises_value_error_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as exc:
        KernelConfig(**{field: value})
    _assert_names(exc, field, value)


@pytest.mark.parametrize("field,value", [(f, v) for f, v in BAD_VALUES if f in (
    "top_k", "capacity_factor", "load_balancing", "router_jitter", "expert_parallel", "backend")])
def test_for_moe_validates_its_arguments(field, value):
    with pytest.raises(ValueError) as exc:
        KernelConfig.for_moe(**{field: value})
    _assert_names(exc, field, value)


@pytest.mark.parametrize("num_experts,top_k", [(4, 5), (1, 2), (8, 9)])
def test_top_k_above_num_experts_raises(num_experts, top_k):
    with pytest.raises(ValueError) as exc:
        KernelConfig.for_moe(num_experts=num_experts, top_k=top_k)
    _assert_names(exc, "top_k", top_k)
    assert str(num_experts) in str(exc.value)


def test_expert_parallel_is_accepted_with_its_dispatch_mode():
    cfg = KernelConfig.for_moe(expert_parallel=True)
    assert (cfg.expert_parallel_mode, cfg.expert_parallel_capacity_factor) == ("exact", 2.0)
    cfg = KernelConfig.for_moe(expert_parallel=True, expert_parallel_mode="padded", expert_parallel_capacity_factor=1.5)
    assert (cfg.expert_parallel_mode, cfg.expert_parallel_capacity_factor) == ("padded", 1.5)
    with pytest.raises(ValueError) as exc:
        KernelConfig.for_moe(expert_parallel=True, quantize_experts="int8")
    _assert_names(exc, "quantize_experts", "int8")


def test_disabling_both_swap_kinds_raises():
    with pytest.raises(ValueError, match="swap_moe"):
        KernelConfig(swap_moe=False, swap_ffn=False)


@pytest.mark.parametrize("factory", [KernelConfig.for_moe, KernelConfig.for_ffn])
def test_unknown_keyword_raises_value_error_naming_it(factory):
    with pytest.raises(ValueError, match=re.escape("'topk'")):
        factory(topk=2)
    with pytest.raises(ValueError, match="capacity"):
        factory(capacity=1.0)


def test_defaults_are_dropless_unbalanced_auto_and_verified():
    cfg = KernelConfig.for_moe()
    assert cfg == KernelConfig()
    assert cfg.num_experts is None and cfg.top_k is None
    assert cfg.capacity_factor is None
    assert cfg.load_balancing == "none"
    assert cfg.router_jitter == 0.0
    assert cfg.expert_parallel is False
    assert cfg.backend == "auto"
    assert cfg.swap_moe is True and cfg.swap_ffn is False
    assert cfg.verify is True


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_experts=8, top_k=8),
        dict(num_experts=1, top_k=1),
        dict(top_k=2, capacity_factor=1.25),
        dict(capacity_factor=1),
        dict(load_balancing="auxiliary_loss"),
        dict(load_balancing="dynamic"),
        dict(router_jitter=0.01),
        dict(backend="triton"),
        dict(backend="cpu"),
        dict(verify=False, verify_tokens=3),
        dict(capacity_priority="position", min_capacity=4),
    ],
)
def test_valid_values_are_kept(kwargs):
    cfg = KernelConfig.for_moe(**kwargs)
    for k, v in kwargs.items():
        assert getattr(cfg, k) == v


def test_for_ffn_swaps_ffn_only():
    cfg = KernelConfig.for_ffn()
    assert cfg.swap_ffn is True and cfg.swap_moe is False
    assert KernelConfig.for_ffn(swap_moe=True).swap_moe is True


def test_config_is_frozen_and_hashable():
    cfg = KernelConfig.for_moe(top_k=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backend = "cpu"  # type: ignore[misc]
    assert cfg.top_k == 2
    assert hash(cfg) == hash(KernelConfig.for_moe(top_k=2))
    assert cfg != KernelConfig.for_moe(top_k=1)


def test_replace_returns_a_validated_copy():
    cfg = KernelConfig.for_moe(num_experts=8, top_k=2)
    new = cfg.replace(top_k=4, backend="cpu")
    assert (new.num_experts, new.top_k, new.backend) == (8, 4, "cpu")
    assert (cfg.top_k, cfg.backend) == (2, "auto")
    with pytest.raises(ValueError) as exc:
        cfg.replace(top_k=9)
    _assert_names(exc, "top_k", 9)
    with pytest.raises(ValueError) as exc:
        cfg.replace(backend="cuda")
    _assert_names(exc, "backend", "cuda")
    with pytest.raises(ValueError, match="'nonsense'"):
        cfg.replace(nonsense=1)


def test_backend_error_lists_allowed_values():
    with pytest.raises(ValueError) as exc:
        KernelConfig.for_moe(backend="cuda")
    for allowed in ("auto", "triton", "cpu"):
        assert allowed in str(exc.value)


def test_backend_torch_is_a_deprecated_name_of_cpu():
    with pytest.warns(DeprecationWarning, match="'cpu'"):
        cfg = KernelConfig.for_moe(backend="torch")
    assert cfg.backend == "cpu"
