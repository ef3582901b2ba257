"""The stage ranges of the fused layer and the CPU kernels (kernel_moe.kernels.annotate): nothing
without a profiler, named ranges under one, forward and backward, on every CPU path, and no graph
break in ``torch.compile(fullgraph=True)`` of the optimized layer, profiler running or not."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.profiler import profile

import kernel_moe
from kernel_moe.bench.memory import without_profiler_log_lines
from kernel_moe.bench.models import NaiveMoE
from kernel_moe.kernels import cpu as cpu_kernels
from kernel_moe.kernels.annotate import COMBINE, DISPATCH, DOWN, FUSED, GATING, ROUTER, UP, stage

H = 32


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _layers(top_k: int = 2):
    torch.manual_seed(0)
    holder = torch.nn.Sequential(NaiveMoE(H, 48, 4, top_k)).eval()
    original = copy.deepcopy(holder[0])
    kernel_moe.optimize(holder)
    assert type(holder[0]).__name__ == "FusedMoE"
    return holder[0], original


@contextlib.contextmanager
def _profiled():
    prof = profile()
    with without_profiler_log_lines():
        prof.__enter__()
    try:
        yield prof
    finally:
        with without_profiler_log_lines():
            prof.__exit__(None, None, None)


def _range_names(prof) -> set[str]:
    return {e.name for e in prof.events() if e.name.startswith("kernel_moe.")}


def test_without_a_profiler_stage_is_one_shared_no_op():
    assert stage(UP) is stage(DOWN)
    with stage(UP) as entered:
        assert entered is None


def test_under_a_profiler_stage_opens_a_range_of_that_name():
    with _profiled() as prof:
        with stage(COMBINE):
            torch.ones(3).mul(2)
    assert _range_names(prof) == {COMBINE}
    assert stage(COMBINE) is stage(UP)  # the profiler is gone again


@pytest.mark.parametrize("profiling", [False, True], ids=["plain", "under_profiler"])
def test_the_optimized_layer_compiles_whole_with_or_without_a_profiler(profiling):
    layer, original = _layers()
    x = torch.randn(2, 5, H)
    with _profiled() if profiling else contextlib.nullcontext(), torch.no_grad():
        explained = torch._dynamo.explain(layer)(x)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        out = compiled(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch.testing.assert_close(out, original(x), atol=1e-5, rtol=1e-5)


def _forward_ranges(tokens: int, monkeypatch, native: str) -> set[str]:
    monkeypatch.setenv(cpu_kernels.ENV, native)
    layer, original = _layers()
    x = torch.randn(1, tokens, H)
    with torch.no_grad():
        layer(x)
        with _profiled() as prof:
            out = layer(x)
    torch.testing.assert_close(out, original(x), atol=1e-5, rtol=1e-5)
    return _range_names(prof)


@pytest.mark.parametrize("tokens", [1, 3, 700], ids=["single_token", "small_batch", "chunked"])
def test_every_forward_path_of_the_pytorch_backend_names_up_down_and_combine(tokens, monkeypatch):
    names = _forward_ranges(tokens, monkeypatch, "off")
    assert {ROUTER, GATING, UP, DOWN, COMBINE} <= names
    assert FUSED not in names


def _native_or_skip():
    if cpu_kernels.extension_setting() == "off" or cpu_kernels.cpu_extension() is None:
        pytest.skip("native CPU kernels not available")


@pytest.mark.parametrize("tokens", [1, 64], ids=["matrix_vector", "fused"])
def test_each_native_forward_is_one_stage(tokens, monkeypatch):
    """Decode (the native matrix-vector forward) and batches (the native fused forward): one native call each."""
    _native_or_skip()
    names = _forward_ranges(tokens, monkeypatch, cpu_kernels.extension_setting())
    assert names == {ROUTER, GATING, DISPATCH, FUSED}


def test_the_backward_names_dispatch_up_down_and_combine():
    layer, _ = _layers()
    x = torch.randn(1, 12, H, requires_grad=True)
    out = layer(x)
    with _profiled() as prof:
        out.square().sum().backward()
    assert {DISPATCH, UP, DOWN, COMBINE} <= _range_names(prof)
    assert x.grad is not None and layer.experts[0].up_proj.weight.grad is not None


def test_capacity_and_expert_choice_routing_are_gating():
    torch.manual_seed(0)
    for config in (kernel_moe.KernelConfig.for_moe(capacity_factor=1.0),
                   kernel_moe.KernelConfig.for_moe(routing="expert_choice")):
        holder = torch.nn.Sequential(NaiveMoE(H, 48, 4, 2)).eval()
        kernel_moe.optimize(holder, config)
        with torch.no_grad(), _profiled() as prof:
            holder(torch.randn(1, 16, H))
        names = [e.name for e in prof.events()]
        assert names.count(GATING) == 1, config
        gating = next(e for e in prof.events() if e.name == GATING)
        inner = {c.name for c in gating.cpu_children}
        assert inner, config  # the routing ops run inside the range
