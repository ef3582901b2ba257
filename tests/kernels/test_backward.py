"""fused_experts_backward_triton against autograd through
kernel_moe.reference.moe.naive_moe_experts (interpreter on CPU), the op-level backward with
backend="triton", and real sizes on a GPU (``-m gpu``).

Shapes stay small (H=40, I=24: neither a multiple of 16) so that the interpreter is fast.
Gradient tolerance: fp32 atol/rtol 1e-4; bf16/fp16 against an fp32 reference 2e-2 plus an
SQNR floor.
"""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from kernel_moe.kernels.contract import Activation, StackedExperts  # noqa: E402
from kernel_moe.kernels.triton import backward as bw  # noqa: E402
from kernel_moe.kernels.triton.backward import fused_experts_backward_triton  # noqa: E402
from kernel_moe.kernels.triton.tile_configs import default_backward_config  # noqa: E402
from kernel_moe.kernels import triton_interpreter_enabled  # noqa: E402
from kernel_moe.reference.moe import naive_moe_experts  # noqa: E402

H, I = 40, 24
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)
LOW_TOL = dict(rtol=2e-2, atol=2e-2)
MIN_SQNR_DB = 30.0
NAMES = ("grad_x", "grad_topk_weights", "grad_w_up", "grad_w_down", "grad_b_up", "grad_b_down")
ARG_ORDER = ("x_TH", "topk_weights_TK", "topk_ids_TK", "w_up_ENH", "w_down_EHI", "b_up_EN", "b_down_EH")
ACT_GLU = [
    (act, glu)
    for act in ("silu", "gelu", "gelu_tanh", "relu", "gpt_oss")
    for glu in ("none", "concat", "interleaved")
    if not (act == "gpt_oss" and glu == "none")
]
_INTERP = triton_interpreter_enabled()


def _act(activation="silu", glu="concat", alpha=1.702, limit=math.inf):
    return dict(activation=activation, glu=glu, alpha=alpha, limit=limit)


def _grad_out(T, dtype=torch.float32, device="cpu", seed=99, hidden=H):
    return torch.randn(T, hidden, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def _triton(grad_out, inputs, kw, **extra):
    """fused_experts_backward_triton on make_moe inputs (an ExpertsGrads, in the order of NAMES)."""
    x, weights, ids, experts = _call_args(inputs, kw)
    return fused_experts_backward_triton(grad_out, x, weights, ids, experts, **extra)


def _call_args(inputs, kw):
    activation = Activation(kw["activation"], kw["glu"], kw["alpha"], kw["limit"])
    experts = StackedExperts(inputs["w_up_ENH"], inputs["w_down_EHI"], inputs["b_up_EN"], inputs["b_down_EH"], activation)
    return inputs["x_TH"], inputs["topk_weights_TK"], inputs["topk_ids_TK"], experts


def _autograd(grad_out, inputs, kw):
    """Gradients of naive_moe_experts by autograd, all in fp32 (None for a missing bias)."""
    leaves = {
        k: v.detach().float().clone().requires_grad_(True)
        for k, v in inputs.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    }
    out = naive_moe_experts(**{**inputs, **leaves}, activation=Activation(kw["activation"], kw["glu"], kw["alpha"],
                                                                          kw["limit"]))
    if out.requires_grad:
        out.backward(grad_out.float())
    else:  # no token reaches an expert (T == 0): every gradient is zero
        for v in leaves.values():
            v.grad = torch.zeros_like(v)
    return tuple(
        leaves[k].grad if k in leaves else None
        for k in ("x_TH", "topk_weights_TK", "w_up_ENH", "w_down_EHI", "b_up_EN", "b_down_EH")
    )


def _input_dtypes(inputs):
    """The dtype each gradient must have: its input's (None for a missing bias)."""
    keys = ("x_TH", "topk_weights_TK", "w_up_ENH", "w_down_EHI", "b_up_EN", "b_down_EH")
    return [None if inputs[k] is None else inputs[k].dtype for k in keys]


def _assert_grads(got, want, tol=GRAD_TOL, dtypes=None):
    """Gradient by gradient: both None (no bias) or the same shape, ``dtypes`` (default: want's)
    and values within ``tol``."""
    if len(got) == 7:  # ExpertsGrads: the post-expert norm's gradient last, None without a norm
        assert got[6] is None
        got = tuple(got[:6])
    assert len(got) == len(want) == 6
    for name, a, b, dtype in zip(NAMES, got, want, dtypes or [None if t is None else t.dtype for t in want]):
        assert (a is None) == (b is None), (name, a is None, b is None)
        if a is None:
            continue
        assert a.shape == b.shape, (name, tuple(a.shape), tuple(b.shape))
        assert a.dtype == dtype, (name, a.dtype, dtype)
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, name=name: f"{name}: {m}")


def _assert_low_precision(kt, got, want_fp32, min_sqnr=MIN_SQNR_DB):
    for name, a, b in zip(NAMES, got, want_fp32):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b, **LOW_TOL, msg=lambda m, name=name: f"{name}: {m}")
        if b.numel() and b.abs().max() > 0:
            assert kt.sqnr_db(a, b) > min_sqnr, (name, kt.sqnr_db(a, b))


def _check_fp32(inputs, kw, **extra):
    g = _grad_out(*inputs["x_TH"].shape[:1], hidden=inputs["x_TH"].shape[1])
    got = _triton(g, inputs, kw, **extra)
    _assert_grads(got, _autograd(g, inputs, kw), dtypes=_input_dtypes(inputs))
    return got


# --------------------------------------------------------------------------------------
# kernel level, interpreter
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0, 1, 5, 64])
@pytest.mark.parametrize("E, K", [(1, 1), (4, 1), (4, 2), (4, 4), (13, 2), (13, 4)])
def test_sweep_fp32(kt, T, E, K):
    inputs = kt.make_moe(T, H, I, E, K, seed=T * 100 + E * 10 + K)
    _check_fp32(inputs, _act())


@pytest.mark.parametrize("activation, glu", ACT_GLU)
def test_activation_layouts_with_bias(kt, activation, glu):
    inputs = kt.make_moe(33, H, I, 4, 2, glu=glu, bias=True, seed=11)
    inputs["x_TH"] = inputs["x_TH"] * 2  # pre-activations on both sides of relu's kink and gelu's knee
    _check_fp32(inputs, _act(activation, glu, limit=3.0 if activation == "gpt_oss" else math.inf))


@pytest.mark.parametrize("glu", ["concat", "interleaved"])
def test_gpt_oss_clamp_and_alpha(kt, glu):
    inputs = kt.make_moe(33, H, I, 4, 2, glu=glu, bias=True, seed=12)
    inputs["w_up_ENH"] = inputs["w_up_ENH"] * 4.0  # push pre-activations past the limit
    kw = _act("gpt_oss", glu, alpha=1.3, limit=1.5)
    got = _check_fp32(inputs, kw)
    unclamped = _autograd(_grad_out(33), inputs, _act("gpt_oss", glu, alpha=1.3))
    assert not torch.allclose(got[2], unclamped[2], **GRAD_TOL)  # the clamp bites the gradient of w_up


@pytest.mark.parametrize("activation, glu", [("silu", "concat"), ("gpt_oss", "interleaved")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_against_fp32_reference(kt, dtype, activation, glu):
    inputs = kt.make_moe(64, H, I, 8, 2, glu=glu, dtype=dtype, bias=True, seed=13)
    kw = _act(activation, glu, limit=4.0 if activation == "gpt_oss" else math.inf)
    g = _grad_out(64, dtype)
    got = _triton(g, inputs, kw)
    for a, dtype in zip(got, _input_dtypes(inputs)):
        assert a.dtype == dtype
    _assert_low_precision(kt, got, _autograd(g, kt.as_fp32(inputs), kw))


def test_mixed_dtypes(kt):
    """bf16 tokens, fp32 weights, bf16 routing weights, fp16 down bias: gradients in each input's dtype."""
    inputs = kt.make_moe(64, H, I, 8, 2, bias=True, seed=14)
    inputs["x_TH"] = inputs["x_TH"].bfloat16()
    inputs["topk_weights_TK"] = inputs["topk_weights_TK"].bfloat16()
    inputs["b_down_EH"] = inputs["b_down_EH"].half()
    kw = _act()
    g = _grad_out(64, torch.bfloat16)
    got = _triton(g, inputs, kw)
    assert got[6:] == (None,)  # no post-expert norm
    assert [t.dtype for t in got[:6]] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32,
                                      torch.float32, torch.float16]  # fmt: skip
    _assert_low_precision(kt, got, _autograd(g, kt.as_fp32(inputs), kw))


@pytest.mark.parametrize("skew", ["one", "few"])
def test_skewed_routing_and_idle_experts(kt, skew):
    inputs = kt.make_moe(64, H, I, 13, 2, bias=True, seed=17, skew=skew)
    counts = torch.bincount(inputs["topk_ids_TK"].reshape(-1), minlength=13)
    idle = counts == 0
    assert idle.any()
    if skew == "one":
        assert counts[0] == 64
    got = _check_fp32(inputs, _act())
    for t in got[2:6]:
        assert (t[idle] == 0).all()  # every element of an idle expert's gradient is written


@pytest.mark.parametrize("glu", ["concat", "interleaved", "none"])
def test_transposed_weights_and_strided_inputs(kt, glu):
    inputs = kt.make_moe(40, H, I, 5, 2, glu=glu, bias=True, seed=16)
    kw = _act(glu=glu)
    g = _grad_out(40)
    want = _autograd(g, inputs, kw)
    strided = dict(inputs)
    strided["w_up_ENH"] = inputs["w_up_ENH"].transpose(1, 2).contiguous().transpose(1, 2)  # stored [E, H, N]
    strided["w_down_EHI"] = inputs["w_down_EHI"].transpose(1, 2).contiguous().transpose(1, 2)  # stored [E, I, H]
    wide = torch.zeros(40, 2 * H)
    wide[:, ::2] = inputs["x_TH"]
    strided["x_TH"] = wide[:, ::2]  # column stride 2
    strided["topk_ids_TK"] = inputs["topk_ids_TK"].t().contiguous().t()
    strided["topk_weights_TK"] = inputs["topk_weights_TK"].t().contiguous().t()
    strided["b_up_EN"] = inputs["b_up_EN"].t().contiguous().t()
    strided["b_down_EH"] = inputs["b_down_EH"].t().contiguous().t()
    g_t = g.t().contiguous().t()
    for name in ("w_up_ENH", "w_down_EHI", "x_TH", "topk_ids_TK", "topk_weights_TK", "b_up_EN", "b_down_EH"):
        assert not strided[name].is_contiguous(), name
    assert not g_t.is_contiguous()
    _assert_grads(_triton(g_t, strided, kw), want, dtypes=_input_dtypes(inputs))


@pytest.mark.parametrize("K, split", [(1, 1), (2, 1), (1, 2)])
def test_dropped_slots_get_no_gradient(kt, K, split):
    """An id outside [0, E) drops its slot (as in the forward kernels and the reference loop):
    a zero routing-weight gradient, nothing added to grad_x or to any expert's gradient, even
    with a NaN routing weight on the dropped slot or an int64 id whose low 32 bits name an
    expert; ``split`` > 1 runs grad_x through the split-K partials."""
    inputs = kt.make_moe(33, H, I, 8, K, bias=True, seed=22)
    ids = inputs["topk_ids_TK"].clone()
    ids[::3, 0] = -1
    ids[1::4, K - 1] = 8
    ids[2::8, 0] = 2**32 + 1  # expert 1 if the low 32 bits were read
    dropped = (ids < 0) | (ids >= 8)
    weights = inputs["topk_weights_TK"].clone()
    weights[dropped] = float("nan")
    inputs = dict(inputs, topk_ids_TK=ids, topk_weights_TK=weights)
    kw = _act()
    g = _grad_out(33)
    extra = {}
    if split > 1:
        config = default_backward_config(8, 2 * I, H, torch.float32, "interpreter", 33, top_k=K)
        config["down"].update(BLOCK_K=16, SPLIT_K=split)
        extra = dict(config=config)
    got = _triton(g, inputs, kw, **extra)
    assert (got.topk_weights[dropped] == 0).all()
    for name, t in zip(NAMES, got):
        assert t is None or torch.isfinite(t).all(), name
    if K == 1:
        assert (got.x[dropped[:, 0]] == 0).all()
    want = _autograd(g, inputs, kw)
    assert torch.isfinite(want[2]).all()  # the reference reads no dropped slot either
    _assert_grads(got, want, dtypes=_input_dtypes(inputs))


@pytest.mark.parametrize("T", [0, 1, 37])
@pytest.mark.parametrize("activation, glu, bias", [("silu", "concat", True), ("gpt_oss", "interleaved", False)])
def test_dense_call(kt, T, activation, glu, bias):
    """Routing None (one expert, weight 1): the gradients of the dense FFN, no routing-weight
    gradient."""
    inputs = kt.make_moe(T, H, I, 1, 1, glu=glu, bias=bias, seed=26)
    kw = _act(activation, glu, limit=3.0 if activation == "gpt_oss" else math.inf)
    g = _grad_out(T)
    x, _, _, experts = _call_args(inputs, kw)
    got = fused_experts_backward_triton(g, x, None, None, experts)
    assert got.topk_weights is None
    unit = dict(inputs, topk_weights_TK=torch.ones(T, 1), topk_ids_TK=torch.zeros(T, 1, dtype=torch.long))
    want = _autograd(g, unit, kw)
    _assert_grads(got._replace(topk_weights=want[1]), want, dtypes=_input_dtypes(unit))


def test_nan_propagates_to_its_token(kt):
    inputs = kt.make_moe(33, H, I, 4, 2, seed=18)
    inputs["x_TH"][7, 3] = float("nan")
    kw = _act()
    g = _grad_out(33)
    got = _triton(g, inputs, kw)
    want = _autograd(g, inputs, kw)
    assert torch.isnan(got[0][7]).all() and torch.isnan(got[1][7]).all()
    keep = torch.arange(33) != 7
    assert torch.isfinite(got[0][keep]).all()
    torch.testing.assert_close(got[0][keep], want[0][keep], **GRAD_TOL)
    torch.testing.assert_close(got[1][keep], want[1][keep], **GRAD_TOL)
    torch.testing.assert_close(got[3], want[3], **GRAD_TOL, equal_nan=True)


def test_deterministic_is_bitwise_reproducible(kt):
    inputs = kt.make_moe(64, H, I, 13, 4, dtype=torch.bfloat16, bias=True, seed=20)
    g = _grad_out(64, torch.bfloat16)
    first, second = _triton(g, inputs, _act()), _triton(g, inputs, _act())
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("T, hidden, glu", [(5, H, "interleaved"), (64, 48, "concat")])
def test_small_tiles_split_k_and_several_intermediate_tiles(kt, T, hidden, glu):
    """Several I tiles (routing-weight gradient summed over tiles, the down-bias term in tile
    0 only), several weight-gradient tiles, slot steps wider (T=5) and narrower (T=64, layout
    blocks of 32) than the layout's blocks, H a multiple of the H step (T=64), split-K in the
    grad_x GEMM."""
    inputs = kt.make_moe(T, hidden, I, 4, 2, glu=glu, bias=True, seed=21)
    config = default_backward_config(4, 2 * I, hidden, torch.float32, "interpreter", T, top_k=2)
    config["act"].update(BLOCK_N=16, BLOCK_K=16)
    config["dw"].update(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64 if T == 5 else 16)
    config["down"].update(BLOCK_K=16, SPLIT_K=2)
    if T == 64:
        config["BLOCK_M"] = 32
    _check_fp32(inputs, _act("gpt_oss" if glu == "interleaved" else "silu", glu, limit=2.0), config=config)


def test_empty_batch_launches_nothing(kt, monkeypatch):
    inputs = kt.make_moe(0, H, I, 4, 2, bias=True)

    def fail(*args, **kwargs):
        raise AssertionError("no kernel may run for T == 0")

    monkeypatch.setattr(bw, "align_by_expert", fail)
    got = _triton(_grad_out(0), inputs, _act())
    _assert_grads(got, _autograd(_grad_out(0), inputs, _act()), tol=dict(rtol=0, atol=0), dtypes=_input_dtypes(inputs))


def test_invalid_inputs_raise_value_error(kt):
    inputs = kt.make_moe(4, H, I, 4, 2)
    g = _grad_out(4)
    with pytest.raises(ValueError, match="grad_out"):
        _triton(g[:, :-1], inputs, _act())
    with pytest.raises(ValueError, match="w_down"):
        _triton(g, inputs, _act(glu="none"))  # N = 2I but glu none: w_down would have to be [E, H, 2I]
    with pytest.raises(ValueError, match="swish"):
        _triton(g, inputs, _act("swish"))
    with pytest.raises(ValueError, match="grad_out dtype torch.float64"):
        _triton(g.double(), inputs, _act())
    config = default_backward_config(4, 2 * I, H, torch.float32, "interpreter", 4)
    del config["dw"]
    with pytest.raises(ValueError, match="dw"):
        _triton(g, inputs, _act(), config=config)
    config = default_backward_config(4, 2 * I, H, torch.float32, "interpreter", 4)
    config["act"]["BLOCK_N"] = 24
    with pytest.raises(ValueError, match=r"act\.BLOCK_N=24"):
        _triton(g, inputs, _act(), config=config)


# --------------------------------------------------------------------------------------
# op level: torch.ops.kernel_moe.fused_experts / fused_ffn with backend="triton"
# --------------------------------------------------------------------------------------


@pytest.fixture
def triton_backward_calls(monkeypatch):
    """Calls of the Triton backend's backward: backend="triton" must run it (not the CPU one)."""
    from kernel_moe.kernels.triton.backend import TritonBackend

    calls = []
    original = TritonBackend.backward

    def spy(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TritonBackend, "backward", spy)
    return calls


def _op_grads(inputs, kw, backend, g):
    import kernel_moe.ops  # noqa: F401  (registers the ops)

    leaves = {
        k: v.detach().clone().requires_grad_(True)
        for k, v in inputs.items()
        if v is not None and v.is_floating_point()
    }
    i = {**inputs, **leaves}
    out = torch.ops.kernel_moe.fused_experts(
        i["x_TH"], i["topk_weights_TK"], i["topk_ids_TK"], i["w_up_ENH"], i["w_down_EHI"], i["b_up_EN"],
        i["b_down_EH"], None, None, None, kw["activation"], kw["glu"], kw["alpha"], kw["limit"], math.inf, math.inf,
        False, "full", backend,
    )  # fmt: skip
    out.backward(g)
    return out, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize(
    "activation, glu, bias", [("silu", "concat", True), ("gpt_oss", "interleaved", True), ("gelu", "none", False)]
)
def test_op_backward_triton_matches_cpu(kt, triton_backward_calls, activation, glu, bias):
    inputs = kt.make_moe(19, H, I, 5, 2, glu=glu, bias=bias, seed=30)
    kw = _act(activation, glu, limit=3.0 if activation == "gpt_oss" else math.inf)
    g = _grad_out(19)
    out_ref, want = _op_grads(inputs, kw, "cpu", g)
    assert not triton_backward_calls
    out, got = _op_grads(inputs, kw, "triton", g)
    assert triton_backward_calls, "backend='triton' did not run the Triton backward"
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert set(got) == set(want)
    for k in want:
        assert got[k] is not None and got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k], want[k], **GRAD_TOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("T, bias, transposed", [(7, True, False), (5, False, True), (0, True, False)])
def test_opcheck_backward_op_triton(kt, T, bias, transposed):
    """Schema, fake implementation (shapes, dtypes, strides) and dispatch of the backward op on
    the Triton path."""
    import kernel_moe.ops  # noqa: F401  (registers the ops)

    inputs = kt.make_moe(T, H, I, 4, 2, glu="interleaved", bias=bias, seed=32)
    if transposed:
        inputs["w_up_ENH"] = inputs["w_up_ENH"].transpose(1, 2).contiguous().transpose(1, 2)
        inputs["w_down_EHI"] = inputs["w_down_EHI"].transpose(1, 2).contiguous().transpose(1, 2)
    args = (_grad_out(T),) + tuple(inputs[k] for k in ARG_ORDER) + (None, None, None, "gpt_oss", "interleaved",
                                                                      1.702, 5.0, math.inf, math.inf, False, "full",
                                                                      "triton")
    result = torch.library.opcheck(torch.ops.kernel_moe.fused_experts_backward.default, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("glu, bias", [("concat", True), ("none", False)])
def test_ffn_op_backward_triton_matches_autograd(triton_backward_calls, glu, bias):
    import torch.nn.functional as F

    import kernel_moe.ops  # noqa: F401  (registers the ops)
    from kernel_moe.reference.activations import apply_activation

    gen = torch.Generator().manual_seed(31)
    N = 2 * I if glu != "none" else I
    base = dict(
        x=torch.randn(21, H, generator=gen),
        w_up=torch.randn(N, H, generator=gen) / math.sqrt(H),
        w_down=torch.randn(H, I, generator=gen) / math.sqrt(I),
        b_up=torch.randn(N, generator=gen) * 0.1 if bias else None,
        b_down=torch.randn(H, generator=gen) * 0.1 if bias else None,
    )
    g = torch.randn(21, H, generator=gen)

    def grads(fn):
        leaves = {k: v.clone().requires_grad_(True) for k, v in base.items() if v is not None}
        out = fn({**base, **leaves})
        out.backward(g)
        return out, {k: v.grad for k, v in leaves.items()}

    def reference(i):
        h = F.linear(i["x"], i["w_up"], i["b_up"])
        return F.linear(apply_activation(h, "gelu", glu), i["w_down"], i["b_down"])

    def op(i):
        return torch.ops.kernel_moe.fused_ffn(
            i["x"], i["w_up"], i["w_down"], i["b_up"], i["b_down"], "gelu", glu, 1.702, math.inf, "triton"
        )

    out_ref, want = grads(reference)
    out, got = grads(op)
    assert triton_backward_calls, "backend='triton' did not run the Triton backward"
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k], want[k], **GRAD_TOL, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------------------
# compile for sm_90 without a GPU (what only the compiler rejects)
# --------------------------------------------------------------------------------------

_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
_COMPILE_SCRIPT = textwrap.dedent(
    """
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernel_moe.kernels.triton import backward as B
    from kernel_moe.kernels.triton import tile_configs

    def build(fn, types, consts, contiguous=(), **opts):
        # ints named in `contiguous` are 1 (specialised to constants); pointers 16-byte aligned
        sig, cst, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts or name in contiguous:
                sig[name], cst[(i,)] = "constexpr", consts.get(name, 1)
            else:
                assert not fn.params[i].is_constexpr, f"{fn.__name__}: constexpr {name} not given"
                sig[name] = types.get(name, "i32")
                if sig[name].startswith("*"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=sig, constexprs=cst, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        assert kernel.asm.get("cubin"), fn.__name__
        assert kernel.metadata.shared <= 232448, (fn.__name__, consts, opts, kernel.metadata.shared)  # H100 per block

    ACT_UNIT = ("stride_xh", "stride_gh", "stride_uh", "stride_ubn", "stride_di", "stride_dbh", "stride_rk")
    SCALARS = {"alpha": "fp32", "limit": "fp32", "gate_softcap": "fp32", "up_softcap": "fp32"}
    # the default configs on an H100 for E=8, N=28672, H=4096 at T=64 and T=4096, as launched
    for T, dt in ((64, "bf16"), (4096, "bf16"), (4096, "fp32")):
        torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt]
        cfg = tile_configs.default_backward_config(8, 28672, 4096, torch_dtype, "NVIDIA H100 80GB HBM3", T)
        act, dw, bm = cfg["act"], cfg["dw"], cfg["BLOCK_M"]
        size = 2 if dt == "bf16" else 4
        types = {"x_ptr": "*" + dt, "g_ptr": "*" + dt, "w_up_ptr": "*" + dt, "b_up_ptr": "*" + dt,
                 "w_down_ptr": "*" + dt, "b_down_ptr": "*" + dt, "rw_ptr": "*fp32", "a_ptr": "*" + dt,
                 "dh_ptr": "*" + dt, "dot_ptr": "*fp32", "padded_slots_ptr": "*i32", "block_expert_ptr": "*i32",
                 "us_ptr": "*" + dt, "ds_ptr": "*" + dt, **SCALARS}
        dot = tl.bfloat16 if dt == "bf16" else tl.float32
        consts = dict(ACTIVATION=0, GATED=True, GATE_STEP=1, CLAMPED=False, SOFTCAPPED=False, HAS_BIAS_UP=False,
                      HAS_BIAS_DOWN=False, UP_DTYPE=dot, DOWN_DTYPE=dot, UPCAST=False, TF32=False, EVEN_K=True,
                      BLOCK_M=bm, BLOCK_N=act["BLOCK_N"], BLOCK_K=act["BLOCK_K"], GROUP_M=act["GROUP_M"], W_FORMAT=0)
        stages = B._fit_stages(act["num_stages"], (2 * bm + 3 * act["BLOCK_N"]) * act["BLOCK_K"] * size)
        build(B._moe_bwd_act_kernel, types, consts, ACT_UNIT, num_warps=act["num_warps"], num_stages=stages)
        types = {"l_ptr": "*" + dt, "r_ptr": "*" + dt, "rw_ptr": "*fp32", "out_ptr": "*" + dt, "bias_ptr": "*" + dt,
                 "padded_slots_ptr": "*i32", "padded_offsets_ptr": "*i32"}
        consts = dict(L_GATHER=True, R_GATHER=False, HAS_BIAS=False, DOT_DTYPE=dot, UPCAST=False, TF32=False,
                      **{k: dw[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")})
        stages = B._fit_stages(dw["num_stages"], (dw["BLOCK_M"] + dw["BLOCK_N"]) * dw["BLOCK_K"] * size)
        build(B._moe_bwd_dw_kernel, types, consts, ("stride_lr", "stride_rc", "stride_oc", "stride_wk"),
              num_warps=dw["num_warps"], num_stages=stages)
    for act, gated, step, dt, wt, tf32, unit, clamped, capped in (
        (0, True, 1, "bf16", "bf16", False, True, False, False),
        (4, True, 2, "fp16", "fp16", False, True, True, False),
        (1, False, 1, "fp32", "fp32", True, False, False, False),
        (0, True, 2, "bf16", "bf16", False, True, True, True),  # clamped softcapped SwiGLU
        (5, True, 1, "fp16", "fp16", False, True, True, False),  # clamped relu2-GLU
        (5, False, 1, "fp32", "fp32", False, False, False, False),
    ):
        dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dt]
        types = {"x_ptr": "*" + dt, "g_ptr": "*" + dt, "w_up_ptr": "*" + wt, "b_up_ptr": "*" + wt,
                 "w_down_ptr": "*" + wt, "b_down_ptr": "*" + wt, "rw_ptr": "*fp32", "a_ptr": "*" + dt,
                 "dh_ptr": "*" + dt, "dot_ptr": "*fp32", "padded_slots_ptr": "*i32", "block_expert_ptr": "*i32",
                 "stride_ue": "i64", "stride_de": "i64", "us_ptr": "*fp32", "ds_ptr": "*fp32", **SCALARS}
        consts = dict(ACTIVATION=act, GATED=gated, GATE_STEP=step, CLAMPED=clamped, SOFTCAPPED=capped,
                      HAS_BIAS_UP=gated, HAS_BIAS_DOWN=act != 0, UP_DTYPE=dot, DOWN_DTYPE=dot, UPCAST=False, TF32=tf32,
                      EVEN_K=act == 0, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, W_FORMAT=0)
        build(B._moe_bwd_act_kernel, types, consts, ACT_UNIT if unit else (), num_warps=4, num_stages=3)
    for fmt, wt in ((1, "i8"), (2, "u8"), (3, "u8")):  # quantized weights dequantized in the K-loop
        types = {"x_ptr": "*bf16", "g_ptr": "*bf16", "w_up_ptr": "*" + wt, "b_up_ptr": "*bf16",
                 "w_down_ptr": "*" + wt, "b_down_ptr": "*bf16", "rw_ptr": "*fp32", "a_ptr": "*bf16",
                 "dh_ptr": "*bf16", "dot_ptr": "*fp32", "padded_slots_ptr": "*i32", "block_expert_ptr": "*i32",
                 "stride_ue": "i64", "stride_de": "i64", "us_ptr": "*fp32", "ds_ptr": "*fp32", **SCALARS}
        consts = dict(ACTIVATION=0, GATED=True, GATE_STEP=1, CLAMPED=False, SOFTCAPPED=False, HAS_BIAS_UP=True,
                      HAS_BIAS_DOWN=True, UP_DTYPE=tl.bfloat16, DOWN_DTYPE=tl.bfloat16, UPCAST=False, TF32=False,
                      EVEN_K=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, W_FORMAT=fmt)
        build(B._moe_bwd_act_kernel, types, consts, ACT_UNIT, num_warps=4, num_stages=3)
    for l_gather, dt, out, bias, unit in ((True, "bf16", "bf16", True, True), (False, "bf16", "fp32", False, True),
                                          (False, "fp32", "fp32", True, False)):
        types = {"l_ptr": "*" + dt, "r_ptr": "*" + dt, "rw_ptr": "*fp32", "out_ptr": "*" + out, "bias_ptr": "*" + out,
                 "padded_slots_ptr": "*i32", "padded_offsets_ptr": "*i32", "stride_oe": "i64"}
        consts = dict(L_GATHER=l_gather, R_GATHER=not l_gather, HAS_BIAS=bias, DOT_DTYPE=tl.bfloat16 if dt == "bf16"
                      else tl.float32, UPCAST=False, TF32=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
        unit_strides = ("stride_lr", "stride_rc", "stride_oc", "stride_br", "stride_wk") if unit else ()
        build(B._moe_bwd_dw_kernel, types, consts, unit_strides, num_warps=8, num_stages=3)
    print("compiled")
    """
)


@pytest.mark.skipif(not _PTXAS.exists(), reason="triton without its bundled NVIDIA backend / ptxas")
def test_backward_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=root
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


# --------------------------------------------------------------------------------------
# real sizes on a CUDA GPU, compiled Triton
# --------------------------------------------------------------------------------------


def _gpu_inputs(kt, T, hidden, inter, E, K, **kw):
    inputs = kt.make_moe(T, hidden, inter, E, K, device="cuda", **kw)
    g = torch.randn(T, hidden, generator=torch.Generator().manual_seed(T + 1)).to("cuda", inputs["x_TH"].dtype)
    return inputs, g


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(_INTERP, reason="compiled Triton needed: run with TRITON_INTERPRET=0")
class TestGPU:
    @pytest.fixture(autouse=True)
    def _no_tf32(self):
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = old

    @pytest.mark.parametrize("T", [1, 333, 4096])
    def test_mixtral_like_bf16(self, kt, T):
        inputs, g = _gpu_inputs(kt, T, 1024, 2048, 8, 2, dtype=torch.bfloat16, seed=T)
        kw = _act()
        _assert_low_precision(kt, _triton(g, inputs, kw), _autograd(g, kt.as_fp32(inputs), kw))

    @pytest.mark.parametrize("T", [1, 2048])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    def test_fine_grained_gpt_oss_bias(self, kt, T, dtype):
        inputs, g = _gpu_inputs(kt, T, 512, 384, 64, 8, glu="interleaved", dtype=dtype, bias=True, seed=T + 2)
        kw = _act("gpt_oss", "interleaved", limit=7.0)
        _assert_low_precision(kt, _triton(g, inputs, kw), _autograd(g, kt.as_fp32(inputs), kw))

    @pytest.mark.parametrize("glu", ["concat", "none"])
    def test_fp32_full_precision(self, kt, glu):
        inputs, g = _gpu_inputs(kt, 257, 1024, 768, 8, 2, glu=glu, bias=True, seed=3)
        kw = _act("gelu", glu)
        _assert_grads(_triton(g, inputs, kw), _autograd(g, inputs, kw), dtypes=_input_dtypes(inputs))

    def test_transposed_weights_bf16(self, kt):
        inputs, g = _gpu_inputs(kt, 512, 1024, 2048, 8, 2, dtype=torch.bfloat16, seed=4)
        want = _triton(g, inputs, _act())
        strided = dict(inputs)
        strided["w_up_ENH"] = inputs["w_up_ENH"].transpose(1, 2).contiguous().transpose(1, 2)
        strided["w_down_EHI"] = inputs["w_down_EHI"].transpose(1, 2).contiguous().transpose(1, 2)
        _assert_grads(_triton(g, strided, _act()), want, tol=LOW_TOL)

    def test_deterministic_bitwise(self, kt):
        inputs, g = _gpu_inputs(kt, 4096, 1024, 1024, 16, 4, dtype=torch.bfloat16, bias=True, seed=5)
        first, second = _triton(g, inputs, _act()), _triton(g, inputs, _act())
        for name, a, b in zip(NAMES, first, second):
            assert torch.equal(a, b), name

    def test_offsets_past_int32_range(self, kt):
        """Token index * stride and expert index * stride beyond 2**31 elements."""
        hidden, inter, E, K, T = 128, 64, 8, 2, 4
        small, g = _gpu_inputs(kt, T, hidden, inter, E, K, dtype=torch.bfloat16, seed=6)
        big = torch.zeros(2**32 + 2**22, dtype=torch.bfloat16, device="cuda")
        tok_stride, exp_stride = 2**30 + 7, 2**29 + 3
        x = torch.as_strided(big, (T, hidden), (tok_stride, 1))
        x.copy_(small["x_TH"])
        w_up = torch.as_strided(big, (E, 2 * inter, hidden), (exp_stride, hidden, 1), storage_offset=2**21)
        w_up.copy_(small["w_up_ENH"])
        assert (T - 1) * tok_stride > 2**31 and (E - 1) * exp_stride > 2**31
        got = _triton(g, dict(small, x_TH=x, w_up_ENH=w_up), _act())
        _assert_low_precision(kt, got, _autograd(g, kt.as_fp32(small), _act()))

    def test_no_host_sync_under_cuda_graph(self, kt):
        inputs, g = _gpu_inputs(kt, 64, 1024, 1024, 8, 2, dtype=torch.bfloat16, bias=True, seed=7)
        _triton(g, inputs, _act())  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = _triton(g, inputs, _act())
        graph.replay()
        torch.cuda.synchronize()
        want = _triton(g, inputs, _act())
        for name, a, b in zip(NAMES, got, want):
            assert torch.equal(a, b), name

    @pytest.mark.parametrize("activation, glu", [("silu", "concat"), ("gpt_oss", "interleaved")])
    def test_op_backward_matches_cpu(self, kt, activation, glu):
        inputs, g = _gpu_inputs(kt, 300, 256, 192, 8, 2, glu=glu, bias=True, seed=8)
        kw = _act(activation, glu, limit=5.0 if activation == "gpt_oss" else math.inf)
        out_ref, want = _op_grads(inputs, kw, "cpu", g)
        out, got = _op_grads(inputs, kw, "triton", g)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        for k in want:
            torch.testing.assert_close(got[k], want[k], **GRAD_TOL, msg=lambda m, k=k: f"{k}: {m}")
