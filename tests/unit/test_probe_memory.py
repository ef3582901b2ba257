"""The proof's memory measures keep its verdicts: chunked comparison, gradient passes restricted
to their tensors, and the experts op's backward skipping weight gradients nobody asked for."""

from __future__ import annotations

import math

import pytest
import torch

import kernel_moe
import kernel_moe.adapters.probe as probe
import kernel_moe.kernels.cpu.backend as cpu_backend
from tests.helpers import TopKMoE
from tests.integration.test_gradient_proof import DECOYS, PlainMoE, _build


def _full_mismatch(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """The comparison made on whole float64 copies: what the chunked one must reproduce."""
    a, b = out.double(), ref.double()
    if not torch.isfinite(b).all():
        return "reference output has non-finite values on the probe"
    scale = b.abs().max().item()
    if scale == 0.0:
        return "reference output is all zeros on the probe, so equivalence cannot be shown"
    if ref.dtype in (torch.float32, torch.float64):
        err = (a - b).abs().max().item() / scale
        return None if err <= 1e-4 else f"max relative error {err:.2e} > 1e-4"
    err = ((a - b).norm() / b.norm()).item()
    return None if err <= 2e-2 else f"relative error {err:.2e} > 2e-2"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noise", [0.0, 1e-6, 3e-5, 1e-3, 5e-2])
def test_chunked_mismatch_gives_the_whole_tensor_verdict(monkeypatch, dtype, noise):
    monkeypatch.setattr(probe, "CHUNK", 7)
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(5, 13, generator=g).to(dtype)
    out = (ref.double() + noise * torch.randn(5, 13, generator=g, dtype=torch.float64)).to(dtype)
    got, want = probe.mismatch(out, ref), _full_mismatch(out, ref)
    assert (got is None) == (want is None)
    if got is not None:
        assert got.split()[:-3] == want.split()[:-3]
        assert float(got.split()[-3]) == pytest.approx(float(want.split()[-3]), rel=1e-2)


@pytest.mark.parametrize("where", [0, 30, 64])
def test_chunked_mismatch_sees_a_nan_in_any_chunk(monkeypatch, where):
    monkeypatch.setattr(probe, "CHUNK", 8)
    ref = torch.randn(65)
    out = ref.clone()
    out[where] = math.nan
    assert probe.mismatch(out, ref) is not None
    ref_bad = ref.clone()
    ref_bad[where] = math.inf
    assert probe.mismatch(ref, ref_bad) == "reference output has non-finite values on the probe"
    assert probe.mismatch(torch.zeros(65), torch.zeros(65)).startswith("reference output is all zeros")


def test_large_parameters_get_passes_of_their_own(monkeypatch):
    monkeypatch.setattr(probe, "SEPARATE_BYTES", 100)
    params = [("a", torch.nn.Parameter(torch.zeros(2))), ("big", torch.nn.Parameter(torch.zeros(40))),
              ("b", torch.nn.Parameter(torch.zeros(3))), ("c", torch.nn.Parameter(torch.zeros(3)))]
    assert probe._gradient_passes(1, params) == [(True, [0]), (False, [1]), (False, [2, 3])]
    assert probe._gradient_passes(0, params[1:2]) == [(False, [0])]


@pytest.mark.parametrize("name", sorted(DECOYS) + ["plain"])
def test_one_pass_per_parameter_gives_the_same_verdict(monkeypatch, name):
    """Every parameter in a pass of its own proves exactly what one pass over all proves."""
    def reasons():
        model, _ = _build(PlainMoE if name == "plain" else DECOYS[name])
        kernel_moe.optimize(model)
        return model.moe.spec.gradient_fallback

    default = reasons()
    assert (default is None) == (name == "plain")
    monkeypatch.setattr(probe, "SEPARATE_BYTES", 0)
    assert reasons() == default


def _spy(monkeypatch) -> list:
    asked = []
    backward = cpu_backend.CPUBackend.backward

    def spy(self, *args):
        grads = backward(self, *args)
        asked.append((grads.w_up is not None, grads.w_down is not None))
        return grads

    monkeypatch.setattr(cpu_backend.CPUBackend, "backward", spy)
    return asked


def test_backward_computes_only_the_weight_gradients_asked_for(monkeypatch):
    torch.manual_seed(0)
    layer = kernel_moe.UnifiedManager(kernel_moe.KernelConfig.for_moe()).convert(TopKMoE(16, 24, 4, 2))
    params = dict(layer.named_parameters())
    x = torch.randn(6, 16, requires_grad=True)
    g = torch.randn(6, 16)
    asked = _spy(monkeypatch)
    full = torch.autograd.grad(layer(x), [x, params["experts.1.w1.weight"], params["experts.1.w2.weight"]], g)
    assert asked[-1] == (True, True)
    (gx,) = torch.autograd.grad(layer(x), [x], g)
    assert asked[-1] == (False, False)
    torch.testing.assert_close(gx, full[0], rtol=0, atol=0)
    (gw1,) = torch.autograd.grad(layer(x), [params["experts.1.w1.weight"]], g)
    assert asked[-1] == (True, False)
    torch.testing.assert_close(gw1, full[1], rtol=0, atol=0)
    (gw2,) = torch.autograd.grad(layer(x), [params["experts.1.w2.weight"]], g)
    assert asked[-1] == (False, True)
    torch.testing.assert_close(gw2, full[2], rtol=0, atol=0)
    for p in layer.parameters():
        p.requires_grad_(False)
    layer(x).backward(g)
    assert asked[-1] == (False, False)
