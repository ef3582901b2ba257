"""The activation features of the experts contract on the Triton backend (interpreter on CPU):
``relu2``, the clamp ``limit`` of every gated activation and the softcapped SwiGLU.

The Triton forward against kernel_moe.reference.moe.naive_moe_experts and the Triton backward
against autograd through it (fp32, the suite's tolerances: 1e-5 outputs, 1e-4 gradients), gated
concat and interleaved, with and without biases, T in {1, 7, 33}, with dropped slots; the op
with backend="triton" against backend="cpu"; the compile-time flags that keep each feature free
when unused.

Shapes as in the other kernel tests (H=40, I=24: neither a multiple of 16).
"""

import dataclasses
import math

import pytest
import torch

pytest.importorskip("triton")

from helpers import op_inputs, run_op  # noqa: E402
from kernel_moe.kernels.contract import ACTIVATION_KINDS, Activation, StackedExperts  # noqa: E402
from kernel_moe.kernels.triton import backward as bw  # noqa: E402
from kernel_moe.kernels.triton import common  # noqa: E402
from kernel_moe.kernels.triton import forward as fw  # noqa: E402
from kernel_moe.kernels.triton.backend import TritonBackend  # noqa: E402
from kernel_moe.reference.moe import naive_moe_experts  # noqa: E402

H, I, E, K = 40, 24, 4, 2
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)
LOW_TOL = dict(rtol=2e-2, atol=2e-2)
INF = math.inf
LIMIT = 1.5
# feature -> Activation fields (glu added per test); pre-activations are ~N(0, 2^2), so the
# clamp at 1.5 and the caps bite on many features
FEATURES = {
    "relu2": dict(kind="relu2"),
    "clamped-silu": dict(kind="silu", limit=LIMIT),
    "clamped-relu2": dict(kind="relu2", limit=LIMIT),
    "softcapped": dict(kind="silu", gate_softcap=2.0, up_softcap=3.0),
    "softcapped-clamped": dict(kind="silu", limit=LIMIT, gate_softcap=2.0, up_softcap=1.2),
}
GATED_FEATURES = [(f, glu) for f in FEATURES for glu in ("concat", "interleaved")] + [("relu2", "none")]
WITHOUT = dict(limit=INF, gate_softcap=INF, up_softcap=INF)  # the same activation without clamp and caps


def _inputs(kt, T, glu, bias, seed, dtype=torch.float32, scale=2.0):
    """make_moe inputs with pre-activations of scale ``scale``, a dropped slot (id -1) on token
    0, an out-of-range id (E) on token 5 when T > 5, and NaN routing weights on the dropped
    slots (never read)."""
    inputs = kt.make_moe(T, H, I, E, K, glu=glu, bias=bias, seed=seed, dtype=dtype)
    inputs["x_TH"] = inputs["x_TH"] * scale
    ids, weights = inputs["topk_ids_TK"].clone(), inputs["topk_weights_TK"].clone()
    ids[0, K - 1] = -1
    if T > 5:
        ids[5, 0] = E
    weights[(ids < 0) | (ids >= E)] = float("nan")
    return dict(inputs, topk_ids_TK=ids, topk_weights_TK=weights)


def _experts(inputs, act):
    return StackedExperts(inputs["w_up_ENH"], inputs["w_down_EHI"], inputs["b_up_EN"], inputs["b_down_EH"], act)


def _triton_forward(inputs, act):
    return fw.fused_experts_triton(inputs["x_TH"], inputs["topk_weights_TK"], inputs["topk_ids_TK"],
                                   _experts(inputs, act))


def _triton_backward(g, inputs, act):
    return bw.fused_experts_backward_triton(g, inputs["x_TH"], inputs["topk_weights_TK"], inputs["topk_ids_TK"],
                                            _experts(inputs, act))


def _autograd(g, inputs, act):
    """(out, gradients of x, topk_weights, w_up, w_down, b_up, b_down) of naive_moe_experts in
    fp32 by autograd (None for a missing bias)."""
    leaves = {k: v.detach().float().requires_grad_(True) for k, v in inputs.items()
              if v is not None and v.is_floating_point()}
    out = naive_moe_experts(**{**inputs, **leaves}, activation=act)
    out.backward(g.float())
    keys = ("x_TH", "topk_weights_TK", "w_up_ENH", "w_down_EHI", "b_up_EN", "b_down_EH")
    return out.detach(), tuple(leaves[k].grad if k in leaves else None for k in keys)


def _assert_grads(got, want, tol=GRAD_TOL):
    for name, a, b in zip(("x", "topk_weights", "w_up", "w_down", "b_up", "b_down"), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape, name
            torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, name=name: f"{name}: {m}")


def _grad_out(T, dtype=torch.float32):
    return torch.randn(T, H, generator=torch.Generator().manual_seed(T + 7)).to(dtype)


# --------------------------------------------------------------------------------------
# kernel level: forward and backward against the reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("feature, glu", GATED_FEATURES)
def test_forward_matches_reference(kt, feature, glu, bias, T):
    inputs = _inputs(kt, T, glu, bias, seed=T * 10 + bias)
    act = Activation(glu=glu, **FEATURES[feature])
    ref = naive_moe_experts(**inputs, activation=act)
    out = _triton_forward(inputs, act)
    assert out.shape == (T, H) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert (out[0] != 0).any()  # token 0 keeps its first slot
    if T == 33 and feature != "relu2":  # the inputs reach the clamp / the caps
        assert not torch.allclose(ref, naive_moe_experts(**inputs, activation=dataclasses.replace(act, **WITHOUT)))


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("feature, glu", GATED_FEATURES)
def test_backward_matches_autograd(kt, feature, glu, bias, T):
    inputs = _inputs(kt, T, glu, bias, seed=T * 10 + bias + 1)
    act = Activation(glu=glu, **FEATURES[feature])
    g = _grad_out(T)
    got = _triton_backward(g, inputs, act)
    _, want = _autograd(g, inputs, act)
    _assert_grads(got, want)
    dropped = (inputs["topk_ids_TK"] < 0) | (inputs["topk_ids_TK"] >= E)
    assert (got.topk_weights[dropped] == 0).all()
    if T == 33 and feature != "relu2":  # the clamp / the caps change the gradient of w_up
        _, plain = _autograd(g, inputs, dataclasses.replace(act, **WITHOUT))
        assert not torch.allclose(want[2], plain[2], **GRAD_TOL)


@pytest.mark.parametrize("glu", ["concat", "interleaved"])
@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh", "relu", "relu2"])
def test_clamp_of_every_gated_activation(kt, kind, glu):
    """The limit is no longer GPT-OSS's alone: forward and backward of each gated kind clamped."""
    inputs = _inputs(kt, 33, glu, True, seed=5)
    act = Activation(kind, glu, limit=LIMIT)
    g = _grad_out(33)
    ref, want = _autograd(g, inputs, act)
    torch.testing.assert_close(_triton_forward(inputs, act), ref, **FP32_TOL)
    _assert_grads(_triton_backward(g, inputs, act), want)
    assert not torch.allclose(ref, naive_moe_experts(**inputs, activation=Activation(kind, glu)))


@pytest.mark.parametrize("glu", ["concat", "interleaved"])
@pytest.mark.parametrize("caps", [(1.5, INF), (INF, 0.7)], ids=["gate-cap", "up-cap"])
def test_one_sided_softcaps(kt, caps, glu):
    """A cap of inf is none: only the other half is capped."""
    inputs = _inputs(kt, 33, glu, True, seed=6)
    act = Activation("silu", glu, gate_softcap=caps[0], up_softcap=caps[1])
    g = _grad_out(33)
    ref, want = _autograd(g, inputs, act)
    torch.testing.assert_close(_triton_forward(inputs, act), ref, **FP32_TOL)
    _assert_grads(_triton_backward(g, inputs, act), want)


@pytest.mark.parametrize("feature, glu", [("softcapped-clamped", "concat"), ("clamped-relu2", "interleaved")])
def test_bf16_against_fp32_reference(kt, feature, glu):
    """bf16 with an fp32 reference of the same inputs, at the scale of the suite's bf16 tests."""
    inputs = _inputs(kt, 33, glu, True, seed=8, dtype=torch.bfloat16, scale=1.0)
    act = Activation(glu=glu, **FEATURES[feature])
    g = _grad_out(33, torch.bfloat16)
    ref, want = _autograd(g, kt.as_fp32(inputs), act)
    out = _triton_forward(inputs, act)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, **LOW_TOL)
    assert kt.sqnr_db(out, ref) > 30.0
    got = _triton_backward(g, inputs, act)
    _assert_grads(got, want, tol=LOW_TOL)
    for a, b in zip(got, want):
        assert kt.sqnr_db(a, b) > 30.0


# --------------------------------------------------------------------------------------
# op level: backend="triton" against backend="cpu"
# --------------------------------------------------------------------------------------


@pytest.fixture
def triton_calls(monkeypatch):
    """Names of the Triton backend's methods called: backend="triton" must run them."""
    calls = []
    for name in ("forward", "backward"):
        original = getattr(TritonBackend, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TritonBackend, name, spy)
    return calls


def _op(inputs, backend, act):
    """Output and gradients of torch.ops.kernel_moe.fused_experts on op_inputs."""
    import kernel_moe.ops  # noqa: F401  (registers the ops)

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    i = {**inputs, **leaves, "softcaps": (act.gate_softcap, act.up_softcap)}
    out = run_op(i, act.kind, act.glu, act.alpha, act.limit, backend=backend)
    out.backward(_grad_out(out.shape[0]))
    return out, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("feature, glu", [("relu2", "none"), ("relu2", "concat"), ("clamped-silu", "interleaved"),
                                          ("softcapped", "concat"), ("softcapped-clamped", "interleaved")])
def test_op_triton_matches_cpu(triton_calls, feature, glu):
    inputs = op_inputs(19, H, I, 5, 2, glu=glu, bias=True, seed=30)
    inputs["x"] = inputs["x"] * 2
    inputs["topk_ids"][3, 1] = -1
    act = Activation(glu=glu, **FEATURES[feature])
    out_cpu, want = _op(inputs, "cpu", act)
    assert not triton_calls
    out, got = _op(inputs, "triton", act)
    assert triton_calls == ["forward", "backward"], triton_calls
    torch.testing.assert_close(out, out_cpu, **FP32_TOL)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k], want[k], **GRAD_TOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("kind", ["silu", "gpt_oss"])
def test_op_clamp_gradient_at_the_limit(triton_calls, kind):
    """Pre-activations exactly at -limit, limit (and beyond): the clamp's gradient is 1 inside
    the closed interval and 0 outside, on both backends. One-hot tokens make each
    pre-activation a weight entry exactly."""
    T, E1 = 2 * H, 3
    gen = torch.Generator().manual_seed(31)
    values = torch.tensor([-2.0, -LIMIT, -0.5, 0.5, LIMIT, 2.0])
    inputs = dict(
        x=torch.eye(H).repeat(2, 1),
        topk_weights=torch.rand(T, 2, generator=gen) + 0.1,
        topk_ids=torch.stack([torch.arange(T) % E1, (torch.arange(T) + 1) % E1], dim=1),
        w_up=values[torch.randint(0, len(values), (E1, 2 * I, H), generator=gen)],
        w_down=torch.randn(E1, H, I, generator=gen) / math.sqrt(I),
        b_up=None,
        b_down=None,
    )
    act = Activation(kind, "concat", limit=LIMIT)
    out_cpu, want = _op(inputs, "cpu", act)
    out, got = _op(inputs, "triton", act)
    assert triton_calls == ["forward", "backward"]
    torch.testing.assert_close(out, out_cpu, **FP32_TOL)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **GRAD_TOL, msg=lambda m, k=k: f"{k}: {m}")
    # gate clamped above, up on both sides: entries at +-limit get a gradient, entries beyond none
    w, d = inputs["w_up"], got["w_up"]
    gate_w, gate_d, up_w, up_d = w[:, :I], d[:, :I], w[:, I:], d[:, I:]
    assert (gate_d[gate_w == 2.0] == 0).all() and (up_d[up_w.abs() == 2.0] == 0).all()
    assert (gate_d[gate_w.abs() == LIMIT] != 0).all() and (up_d[up_w.abs() == LIMIT] != 0).all()

# --------------------------------------------------------------------------------------
# launch arguments
# --------------------------------------------------------------------------------------


def test_every_activation_field_reaches_the_kernels():
    """The kernels read kind and glu (activation_constexprs) and alpha, limit and the softcaps
    (activation_scalars): a new Activation field would be silently ignored until the kernels
    implement it; implement it there, then add it here."""
    assert set(common.ACTIVATION_CODES) == set(ACTIVATION_KINDS)
    assert [f.name for f in dataclasses.fields(Activation)] == ["kind", "glu", "alpha", "limit", "gate_softcap",
                                                                "up_softcap"]
    act = Activation("silu", "concat", alpha=1.25, limit=3.0, gate_softcap=2.0, up_softcap=4.0)
    assert common.activation_scalars(act) == (1.25, 3.0, 2.0, 4.0)
    for kernel in (fw._moe_up_kernel, bw._moe_bwd_act_kernel):
        names = kernel.arg_names
        start = names.index("alpha")
        assert names[start : start + 4] == ["alpha", "limit", "gate_softcap", "up_softcap"], kernel
        assert {"CLAMPED", "SOFTCAPPED"} <= set(names), kernel


@pytest.mark.parametrize(
    "act, clamped, capped",
    [
        (Activation(), False, False),  # plain SwiGLU: neither the clamp nor the caps are compiled
        (Activation("gelu", "none"), False, False),
        (Activation("gpt_oss", "interleaved"), False, False),
        (Activation("gpt_oss", "interleaved", limit=7.0), True, False),
        (Activation("relu2", "concat", limit=LIMIT), True, False),
        (Activation("silu", "concat", gate_softcap=2.0), False, True),
        (Activation("silu", "concat", limit=LIMIT, up_softcap=2.0), True, True),
    ],
)
def test_features_are_compile_time_flags(act, clamped, capped):
    flags = common.activation_constexprs(act)
    assert (flags["CLAMPED"], flags["SOFTCAPPED"]) == (clamped, capped)
    assert flags["ACTIVATION"] == common.ACTIVATION_CODES[act.kind]
