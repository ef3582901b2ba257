"""kernel_moe.kernels.triton.backend.BACKEND under the experts contract (interpreter on CPU):
what select_backend returns, routed / dense / dropped calls forward and backward, what the
Triton kernels reject beyond the contract, the package layout and the deprecated names."""

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import kernel_moe.kernels  # noqa: E402
from kernel_moe.errors import UnsupportedInputError  # noqa: E402
from kernel_moe.kernels import select_backend  # noqa: E402
from kernel_moe.kernels.contract import Activation, ExpertsBackend, ExpertsGrads  # noqa: E402
from kernel_moe.kernels.triton.backend import BACKEND  # noqa: E402
from kernel_moe.kernels.triton.backward import fused_experts_backward_triton  # noqa: E402
from kernel_moe.kernels.triton.forward import fused_experts_triton  # noqa: E402
from kernel_moe.reference.moe import naive_moe_experts  # noqa: E402

H, I = 40, 24
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)


def _grad_out(T, seed=98):
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed))


def test_select_backend_returns_the_triton_backend():
    backend = select_backend("triton", torch.device("cpu"))  # TRITON_INTERPRET=1 from the conftest
    assert backend is BACKEND and backend.name == "triton"
    for method in ("forward", "backward"):
        want = list(inspect.signature(getattr(ExpertsBackend, method)).parameters)[1:]
        assert list(inspect.signature(getattr(backend, method)).parameters) == want, method


@pytest.mark.parametrize("deterministic", [True, False])
def test_forward_and_backward_of_a_routed_call(kt, deterministic):
    inputs = kt.make_moe(29, H, I, 6, 2, bias=True, seed=40)
    x, weights, ids, experts = kt.call_args(inputs, activation="gelu_tanh")
    out = BACKEND.forward(x, weights, ids, experts, deterministic)
    torch.testing.assert_close(out, naive_moe_experts(**inputs, activation=Activation("gelu_tanh")), **FP32_TOL)
    g = _grad_out(29)
    grads = BACKEND.backward(g, x, weights, ids, experts)
    assert isinstance(grads, ExpertsGrads)
    want = fused_experts_backward_triton(g, x, weights, ids, experts)
    for name, a, b in zip(ExpertsGrads._fields, grads, want):
        assert (a is None and b is None) or torch.equal(a, b), name  # post_norm: None without a norm


@pytest.mark.parametrize("wanted", [(False, False), (True, False), (False, True)])
def test_backward_returns_only_the_weight_gradients_asked_for(kt, wanted):
    """Weight gradients nobody asked for come back None; every other gradient is unchanged."""
    inputs = kt.make_moe(19, H, I, 5, 2, bias=True, seed=43)
    x, weights, ids, experts = kt.call_args(inputs)
    g = _grad_out(19)
    full = BACKEND.backward(g, x, weights, ids, experts)
    some = BACKEND.backward(g, x, weights, ids, experts, wanted)
    assert (some.w_up is not None, some.w_down is not None) == wanted
    for name, a, b in zip(ExpertsGrads._fields, some, full):
        if a is not None:
            torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_backend_takes_local_ids_and_leaves_the_map_alone(kt):
    """The op applies local_ids; the backend must not apply the map a second time."""
    inputs = kt.make_moe(17, H, I, 4, 2, seed=41)
    x, weights, ids, experts = kt.call_args(inputs)
    mapped = experts._replace(expert_map=torch.tensor([3, 2, 1, 0]))
    torch.testing.assert_close(BACKEND.forward(x, weights, ids, mapped, True), naive_moe_experts(**inputs), **FP32_TOL)


def test_dense_call(kt):
    """Routing None: one expert, weight 1; no routing-weight gradient."""
    inputs = kt.make_moe(21, H, I, 1, 1, bias=True, seed=42)
    x, _, _, experts = kt.call_args(inputs)
    unit = dict(inputs, topk_weights_TK=torch.ones(21, 1), topk_ids_TK=torch.zeros(21, 1, dtype=torch.long))
    torch.testing.assert_close(BACKEND.forward(x, None, None, experts, True), naive_moe_experts(**unit), **FP32_TOL)
    g = _grad_out(21)
    grads = BACKEND.backward(g, x, None, None, experts)
    routed = BACKEND.backward(g, x, unit["topk_weights_TK"], unit["topk_ids_TK"], experts)
    assert grads.topk_weights is None
    for name, a, b in zip(ExpertsGrads._fields, grads, routed):
        if name != "topk_weights":
            torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("K", [1, 3])
def test_dropped_slots_forward_and_backward(kt, K):
    """Dropped slots (local id -1 from the expert map, or any id outside [0, E)) contribute
    nothing and get zero gradients: the call equals the same call with those slots' weights
    set to zero and their ids pointed at an expert."""
    inputs = kt.make_moe(26, H, I, 5, K, bias=True, seed=43)
    x, weights, ids, experts = kt.call_args(inputs)
    ids = ids.clone()
    ids[::2, 0] = -1
    ids[1::3, K - 1] = 5
    dropped = (ids < 0) | (ids >= 5)
    nan_weights = weights.masked_fill(dropped, float("nan"))
    out = BACKEND.forward(x, nan_weights, ids, experts, True)
    zero_weights = weights.masked_fill(dropped, 0.0)
    kept_ids = ids.masked_fill(dropped, 0)
    torch.testing.assert_close(out, BACKEND.forward(x, zero_weights, kept_ids, experts, True), **FP32_TOL)
    g = _grad_out(26)
    grads = BACKEND.backward(g, x, nan_weights, ids, experts)
    assert (grads.topk_weights[dropped] == 0).all()
    # with weight 0 a slot still has a routing-weight gradient, but adds nothing elsewhere
    same = BACKEND.backward(g, x, zero_weights, kept_ids, experts)
    for name, a, b in zip(ExpertsGrads._fields, grads, same):
        if name != "topk_weights":
            torch.testing.assert_close(a, b, **GRAD_TOL, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(grads.topk_weights[~dropped], same.topk_weights[~dropped], **GRAD_TOL)


@pytest.mark.parametrize("name", ["x", "w_up", "w_down", "b_up", "topk_weights", "grad_out"])
def test_float64_is_rejected(kt, name):
    inputs = kt.make_moe(4, H, I, 4, 2, bias=True, seed=44)
    x, weights, ids, experts = kt.call_args(inputs)
    g = _grad_out(4)
    if name == "x":
        x = x.double()
    elif name == "topk_weights":
        weights = weights.double()
    elif name == "grad_out":
        g = g.double()
    else:
        experts = experts._replace(**{name: getattr(experts, name).double()})
    message = rf"{name} dtype torch\.float64.*allowed: float32, bfloat16, float16"
    if name != "grad_out":
        with pytest.raises(UnsupportedInputError, match=message):
            BACKEND.forward(x, weights, ids, experts, True)
    with pytest.raises(UnsupportedInputError, match=message):
        BACKEND.backward(g, x, weights, ids, experts)


def test_importing_the_package_does_not_import_triton():
    code = ("import sys, kernel_moe, kernel_moe.kernels, kernel_moe.kernels.triton, "
            "kernel_moe.kernels.triton.tile_configs; assert 'triton' not in sys.modules, 'triton imported'")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


_DEPRECATED = {
    "topk_gating": "routing",
    "align_by_expert": "routing",
    "AlignedRouting": "routing",
    "fused_experts_triton": "forward",
    "moe_up_projection": "forward",
    "moe_down_projection": "forward",
    "fused_experts_backward_triton": "backward",
    "default_backward_config": "tile_configs",
    "config_file_name": "tile_configs.tile_config_file_name",
    "default_kernel_config": "tile_configs.default_tile_config",
    "get_kernel_config": "tile_configs.get_tile_config",
    "validate_kernel_config": "tile_configs.validate_tile_config",
}


@pytest.mark.parametrize("old", sorted(_DEPRECATED))
def test_deprecated_top_level_names_resolve(old):
    """The names that lived at kernel_moe.kernels' top level reach the moved objects."""
    module, _, new = _DEPRECATED[old].partition(".")
    target = getattr(importlib.import_module(f"kernel_moe.kernels.triton.{module}"), new or old)
    assert getattr(kernel_moe.kernels, old) is target
    assert fused_experts_triton is kernel_moe.kernels.fused_experts_triton
