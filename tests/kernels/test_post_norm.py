"""The post-expert norm of the experts contract (``StackedExperts.post_norm``: each expert output
scaled by s [H], then RMS-normalised, before its routing weight) on both backends: the op with
backend="triton" (interpreter on CPU) and backend="cpu" against
kernel_moe.reference.moe.naive_post_norm_experts, forward (1e-5) and gradients of x, the routing
weights, the expert weights and biases and the scale s (1e-4, by autograd through the reference),
with dropped slots carrying NaN weights, k = 1, T = 0 and a dense call; bf16 against the fp32
reference; the checks of the new fields.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_moe.errors import UnsupportedInputError  # noqa: E402
from kernel_moe.kernels.contract import Activation, StackedExperts  # noqa: E402
from kernel_moe.ops.experts import run_experts  # noqa: E402
from kernel_moe.reference.moe import naive_post_norm_experts  # noqa: E402

H, I, E = 40, 24, 5
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)
BACKENDS = ["cpu", "triton"]


def _case(T: int, K: int, bias: bool, seed: int, dtype=torch.float32) -> dict:
    """Inputs with a dropped slot (id -1) on token 0 and an out-of-range id on token 3 (T > 3),
    both with NaN routing weights (never read), and a scale s away from 1."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    logits = torch.randn(T, E, generator=g)
    weights, ids = logits.softmax(-1).topk(K, dim=-1)
    weights = weights.to(dtype)
    if T > 0 and K > 1:
        ids[0, K - 1] = -1
    if T > 3:
        ids[3, 0] = E + 1
    weights[(ids < 0) | (ids >= E)] = float("nan")
    return dict(x=rnd(T, H), weights=weights, ids=ids, w_up=rnd(E, 2 * I, H, scale=0.3),
                w_down=rnd(E, H, I, scale=0.3), b_up=rnd(E, 2 * I, scale=0.1) if bias else None,
                b_down=rnd(E, H, scale=0.1) if bias else None, scale=(1.0 + rnd(H, scale=0.3)))


def _experts(c: dict, eps: float = 1e-6) -> StackedExperts:
    return StackedExperts(c["w_up"], c["w_down"], c["b_up"], c["b_down"], Activation("silu"), post_norm=c["scale"],
                          post_norm_eps=eps)


def _leaves(c: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v) for k, v in c.items()}


def _grads(out: torch.Tensor, c: dict, g: torch.Tensor) -> dict:
    names = [k for k, v in c.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    got = torch.autograd.grad(out, [c[k] for k in names], g, allow_unused=True)
    return dict(zip(names, got))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, K, bias", [(1, 1, False), (7, 2, True), (33, 3, False)])
def test_forward_and_gradients_match_the_reference(backend, T, K, bias):
    c = _case(T, K, bias, seed=T + K)
    ours, ref = _leaves(c), _leaves(c)
    out = run_experts(ours["x"], ours["weights"], ours["ids"], _experts(ours), backend)
    want = naive_post_norm_experts(ref["x"], ref["weights"].nan_to_num(0.0), ref["ids"], _experts(ref))
    assert out.shape == (T, H) and torch.isfinite(out).all()
    torch.testing.assert_close(out, want, **FP32_TOL)
    g = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    got, expected = _grads(out, ours, g), _grads(want, ref, g)
    for name, grad in got.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, expected[name].nan_to_num(0.0), **GRAD_TOL, msg=name)
    dropped = (c["ids"] < 0) | (c["ids"] >= E)
    assert (got["weights"][dropped] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_norm_changes_the_result(backend):
    """The same call without the norm, or with the norm applied after the scale instead of before
    it (a standard RMSNorm), gives something else: the feature is not a no-op on these inputs."""
    c = _case(9, 2, False, seed=4)
    out = run_experts(c["x"], c["weights"], c["ids"], _experts(c), backend)
    plain = run_experts(c["x"], c["weights"], c["ids"], _experts(c)._replace(post_norm=None), backend)
    ones = run_experts(c["x"], c["weights"], c["ids"], _experts(c)._replace(post_norm=torch.ones(H)), backend)
    assert not torch.allclose(out, plain, atol=1e-3)
    assert not torch.allclose(out, ones, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens_and_a_dense_call(backend):
    c = _case(0, 2, False, seed=1)
    assert run_experts(c["x"], c["weights"], c["ids"], _experts(c), backend).shape == (0, H)
    d = _case(6, 1, True, seed=2)
    one = {k: (v[:1] if k in ("w_up", "w_down", "b_up", "b_down") else v) for k, v in d.items()}
    ours, ref = _leaves(one), _leaves(one)
    out = run_experts(ours["x"], None, None, _experts(ours), backend)
    want = naive_post_norm_experts(ref["x"], torch.ones(6, 1), torch.zeros(6, 1, dtype=torch.long), _experts(ref))
    torch.testing.assert_close(out, want, **FP32_TOL)
    g = torch.randn(6, H, generator=torch.Generator().manual_seed(8))
    got, expected = _grads(out, ours, g), _grads(want, ref, g)
    for name in ("x", "w_up", "w_down", "b_up", "b_down", "scale"):
        torch.testing.assert_close(got[name], expected[name], **GRAD_TOL, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_against_the_fp32_reference(backend):
    c = _case(17, 2, True, seed=6, dtype=torch.bfloat16)
    out = run_experts(c["x"], c["weights"], c["ids"], _experts(c), backend)
    f32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in c.items()}
    want = naive_post_norm_experts(f32["x"], f32["weights"].nan_to_num(0.0), f32["ids"], _experts(f32))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_nan_input_propagates_to_its_token_only():
    c = _case(5, 2, False, seed=9)
    c["x"][2, 3] = float("nan")
    out = run_experts(c["x"], c["weights"], c["ids"], _experts(c), "cpu")
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("bad, message", [
    (dict(post_norm=torch.ones(H + 1)), "post_norm must be a floating"),
    (dict(post_norm_eps=-1.0), "post_norm_eps"),
    (dict(scale_inputs=True), "post_norm with scale_inputs"),
])
def test_bad_post_norm_fields_raise(bad, message):
    c = _case(4, 2, False, seed=0)
    with pytest.raises(UnsupportedInputError, match=message):
        run_experts(c["x"], c["weights"], c["ids"], _experts(c)._replace(**bad), "cpu")
