"""fused_experts_triton against kernel_moe.reference.moe.naive_moe_experts (interpreter on CPU).

Shapes stay small (H=40, I=24: neither a multiple of 16) so that the interpreter is fast;
the full T x E x K sweep runs for fp32 / silu / concat, the rest are targeted cases.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from kernel_moe.errors import UnsupportedInputError  # noqa: E402
from kernel_moe.kernels.contract import Activation  # noqa: E402
from kernel_moe.kernels.triton import forward as fm  # noqa: E402
from kernel_moe.kernels.triton.forward import fused_experts_triton  # noqa: E402
from kernel_moe.kernels.triton.tile_configs import get_tile_config  # noqa: E402
from kernel_moe.reference.moe import expert_mlp, naive_moe_experts  # noqa: E402

H, I = 40, 24
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
LOW_TOL = dict(rtol=2e-2, atol=2e-2)
MIN_SQNR_DB = 30.0
ACT_GLU = [
    (act, glu)
    for act in ("silu", "gelu", "gelu_tanh", "relu", "gpt_oss")
    for glu in ("none", "concat", "interleaved")
    if not (act == "gpt_oss" and glu == "none")
]


def _reference(inputs, activation="silu", glu="concat", alpha=1.702, limit=math.inf):
    return naive_moe_experts(**inputs, activation=Activation(activation, glu, alpha, limit))


def _run(kt, inputs, deterministic=True, config=None, **act):
    """fused_experts_triton on make_moe inputs; ``act``: activation, glu, alpha, limit."""
    return fused_experts_triton(*kt.call_args(inputs, **act), deterministic=deterministic, config=config)


@pytest.mark.parametrize("T", [0, 1, 5, 64, 300])
@pytest.mark.parametrize("E, K", [(1, 1), (4, 1), (4, 2), (4, 4), (8, 2), (13, 1), (13, 2), (13, 4)])
def test_sweep_fp32(kt, T, E, K):
    inputs = kt.make_moe(T, H, I, E, K, seed=T * 100 + E * 10 + K)
    out = _run(kt, inputs)
    assert out.shape == (T, H) and out.dtype == torch.float32
    torch.testing.assert_close(out, _reference(inputs), **FP32_TOL)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation, glu", ACT_GLU)
def test_activation_layouts(kt, activation, glu, bias):
    inputs = kt.make_moe(64, H, I, 8, 2, glu=glu, bias=bias, seed=11)
    kw = dict(activation=activation, glu=glu)
    out = _run(kt, inputs, **kw)
    torch.testing.assert_close(out, _reference(inputs, **kw), **FP32_TOL)


@pytest.mark.parametrize("glu", ["concat", "interleaved"])
def test_gpt_oss_clamp_and_alpha(kt, glu):
    inputs = kt.make_moe(64, H, I, 8, 2, glu=glu, bias=True, seed=12)
    inputs["w_up_ENH"] = inputs["w_up_ENH"] * 4.0  # push pre-activations past the limit
    kw = dict(activation="gpt_oss", glu=glu, alpha=1.3, limit=1.5)
    out = _run(kt, inputs, **kw)
    ref = _reference(inputs, **kw)
    assert not torch.allclose(ref, _reference(inputs, activation="gpt_oss", glu=glu, alpha=1.3))  # the clamp bites
    torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize("T, E, K", [(5, 4, 2), (300, 13, 4)])
@pytest.mark.parametrize("activation, glu", [("silu", "concat"), ("gelu", "none"), ("gpt_oss", "interleaved")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_against_fp32_reference(kt, dtype, activation, glu, T, E, K):
    inputs = kt.make_moe(T, H, I, E, K, glu=glu, dtype=dtype, bias=True, seed=13)
    kw = dict(activation=activation, glu=glu)
    out = _run(kt, inputs, **kw)
    assert out.dtype == dtype
    ref = _reference(kt.as_fp32(inputs), **kw)
    torch.testing.assert_close(out.float(), ref, **LOW_TOL)
    assert kt.sqnr_db(out, ref) > MIN_SQNR_DB


def test_mixed_dtypes_bf16_tokens_fp32_weights(kt):
    inputs = kt.make_moe(64, H, I, 8, 2, bias=True, seed=14)
    inputs["x_TH"] = inputs["x_TH"].bfloat16()
    inputs["b_down_EH"] = inputs["b_down_EH"].half()
    out = _run(kt, inputs)
    assert out.dtype == torch.bfloat16
    ref = _reference(kt.as_fp32(inputs))
    torch.testing.assert_close(out.float(), ref, **LOW_TOL)
    assert kt.sqnr_db(out, ref) > MIN_SQNR_DB


def test_bf16_routing_weights(kt):
    inputs = kt.make_moe(64, H, I, 8, 2, seed=15)
    inputs["topk_weights_TK"] = inputs["topk_weights_TK"].bfloat16()
    out = _run(kt, inputs)
    torch.testing.assert_close(out, _reference(inputs), **FP32_TOL)


@pytest.mark.parametrize("glu", ["concat", "interleaved", "none"])
def test_transposed_weights_and_strided_inputs(kt, glu):
    inputs = kt.make_moe(64, H, I, 8, 2, glu=glu, bias=True, seed=16)
    ref = _reference(inputs, glu=glu)
    strided = dict(inputs)
    strided["w_up_ENH"] = inputs["w_up_ENH"].transpose(1, 2).contiguous().transpose(1, 2)  # stored [E, H, N]
    strided["w_down_EHI"] = inputs["w_down_EHI"].transpose(1, 2).contiguous().transpose(1, 2)  # stored [E, I, H]
    wide = torch.zeros(64, 2 * H)
    wide[:, ::2] = inputs["x_TH"]
    strided["x_TH"] = wide[:, ::2]  # column stride 2
    strided["topk_ids_TK"] = inputs["topk_ids_TK"].t().contiguous().t()
    strided["topk_weights_TK"] = inputs["topk_weights_TK"].t().contiguous().t()
    strided["b_up_EN"] = inputs["b_up_EN"].t().contiguous().t()
    for name in ("w_up_ENH", "w_down_EHI", "x_TH", "topk_ids_TK", "b_up_EN"):
        assert not strided[name].is_contiguous(), name
    out = _run(kt, strided, glu=glu)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    x_t = inputs["x_TH"].t().contiguous().t()  # column-major tokens
    torch.testing.assert_close(_run(kt, dict(inputs, x_TH=x_t), glu=glu), ref, **FP32_TOL)


@pytest.mark.parametrize("skew", ["one", "few"])
@pytest.mark.parametrize("K", [1, 2])
def test_skewed_routing(kt, skew, K):
    inputs = kt.make_moe(300, H, I, 13, K, seed=17, skew=skew)
    counts = torch.bincount(inputs["topk_ids_TK"].reshape(-1), minlength=13)
    assert (counts == 0).any()
    if skew == "one":
        assert counts[0] == 300
    torch.testing.assert_close(_run(kt, inputs), _reference(inputs), **FP32_TOL)


def test_nan_propagates_to_its_token_only(kt):
    inputs = kt.make_moe(64, H, I, 8, 2, seed=18)
    inputs["x_TH"][7, 3] = float("nan")
    out = _run(kt, inputs)
    ref = _reference(inputs)
    assert torch.isnan(out[7]).all()
    keep = torch.arange(64) != 7
    assert torch.isfinite(out[keep]).all()
    torch.testing.assert_close(out[keep], ref[keep], **FP32_TOL)


@pytest.mark.parametrize(
    "K, deterministic, split", [(1, True, 1), (1, False, 1), (2, True, 1), (2, False, 1), (1, True, 2), (2, True, 2)]
)
def test_dropped_slots_contribute_nothing(kt, K, deterministic, split):
    """An id outside [0, E) drops its slot, as in the reference loop over experts, on every
    output path (direct store, atomics, per-slot partials with and without split-K): nothing
    reaches the output, not even a NaN routing weight of the dropped slot, and no int64 id
    aliases an expert once narrowed to int32."""
    inputs = kt.make_moe(64, H, I, 8, K, seed=22)
    ids = inputs["topk_ids_TK"].clone()
    ids[::3, 0] = -1
    ids[1::4, K - 1] = 8
    ids[2::8, 0] = 2**32 + 1  # expert 1 if the low 32 bits were read
    ids[5, 0] = -(2**40)
    dropped = (ids < 0) | (ids >= 8)
    weights = inputs["topk_weights_TK"].clone()
    weights[dropped] = float("nan")
    inputs = dict(inputs, topk_ids_TK=ids, topk_weights_TK=weights)
    config = None
    if split > 1:
        config = get_tile_config(8, 2 * I, H, torch.float32, "interpreter", 64)
        config["down"].update(BLOCK_K=16, SPLIT_K=split)
    out = _run(kt, inputs, deterministic=deterministic, config=config)
    ref = _reference(inputs)
    assert torch.isfinite(out).all()
    if K == 1:
        assert (out[dropped[:, 0]] == 0).all()
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_expert_map_gives_local_ids(kt):
    """An expert map (expert parallelism) is applied by the entry point: ids the map sends to
    -1 or past E are dropped, the others run their local expert."""
    inputs = kt.make_moe(40, H, I, 4, 2, bias=True, seed=23)
    expert_map = torch.tensor([2, -1, 0, 1, -1, 3, 7])  # G = 7 routed ids onto E = 4 local experts
    g = torch.Generator().manual_seed(24)
    routed = torch.stack([torch.randperm(7, generator=g)[:2] for _ in range(40)])
    routed[3, 1] = 9  # outside [0, G)
    local = torch.where((routed >= 0) & (routed < 7), expert_map[routed.clamp(0, 6)], torch.full_like(routed, -1))
    experts = kt.stacked(inputs, expert_map=expert_map)
    out = fused_experts_triton(inputs["x_TH"], inputs["topk_weights_TK"], routed, experts)
    torch.testing.assert_close(out, _reference(dict(inputs, topk_ids_TK=local)), **FP32_TOL)


@pytest.mark.parametrize("T", [0, 1, 37])
@pytest.mark.parametrize("activation, glu, bias", [("silu", "concat", True), ("gelu", "none", False)])
def test_dense_call(kt, T, activation, glu, bias):
    """Routing None: one expert, weight 1 for every token (the dense FFN), routing made on the device."""
    inputs = kt.make_moe(T, H, I, 1, 1, glu=glu, bias=bias, seed=25)
    experts = kt.stacked(inputs, activation=activation, glu=glu)
    out = fused_experts_triton(inputs["x_TH"], None, None, experts)
    assert out.shape == (T, H) and out.dtype == torch.float32
    want = expert_mlp(inputs["x_TH"], inputs["w_up_ENH"][0], inputs["w_down_EHI"][0],
                      None if not bias else inputs["b_up_EN"][0], None if not bias else inputs["b_down_EH"][0],
                      Activation(activation, glu))  # fmt: skip
    torch.testing.assert_close(out, want, **FP32_TOL)
    with pytest.raises(ValueError, match="one expert"):
        fused_experts_triton(inputs["x_TH"], None, None, experts._replace(
            w_up=experts.w_up.expand(2, -1, -1), w_down=experts.w_down.expand(2, -1, -1), b_up=None, b_down=None))


def test_atomic_path_matches(kt):
    inputs = kt.make_moe(64, H, I, 8, 2, bias=True, seed=19)
    out = _run(kt, inputs, deterministic=False)
    torch.testing.assert_close(out, _reference(inputs), **FP32_TOL)


def test_deterministic_is_bitwise_reproducible(kt):
    inputs = kt.make_moe(300, H, I, 13, 4, dtype=torch.bfloat16, seed=20)
    assert torch.equal(_run(kt, inputs), _run(kt, inputs))


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("K", [1, 2])
def test_split_k_decode_config(kt, split, K):
    """The decode path: narrow up tiles, a wider BLOCK_K, split-K on the down projection."""
    inputs = kt.make_moe(5, H, 70, 8, K, bias=True, seed=21)
    config = get_tile_config(8, 140, H, torch.float32, "interpreter", 5)
    config["up"].update(BLOCK_N=16, BLOCK_K=16)
    config["down"].update(BLOCK_K=16, SPLIT_K=split)
    for deterministic in (True, False):
        out = _run(kt, inputs, config=config, deterministic=deterministic)
        torch.testing.assert_close(out, _reference(inputs), **FP32_TOL)


def test_default_config_switches_to_split_k_for_decode():
    cfg = get_tile_config(8, 2 * 14336, 4096, torch.bfloat16, "NVIDIA H100 80GB HBM3", 1, top_k=2)
    assert cfg["BLOCK_M"] == 16 and cfg["down"]["SPLIT_K"] > 1


def test_empty_batch_launches_nothing(kt, monkeypatch):
    inputs = kt.make_moe(0, H, I, 4, 2)

    def fail(*args, **kwargs):
        raise AssertionError("no kernel may run for T == 0")

    monkeypatch.setattr(fm, "align_by_expert", fail)
    out = _run(kt, inputs)
    assert out.shape == (0, H) and out.dtype == torch.float32


def test_invalid_inputs_raise_value_error(kt):
    inputs = kt.make_moe(4, H, I, 4, 2)
    with pytest.raises(ValueError, match="w_down"):
        _run(kt, inputs, glu="none")  # N = 2I but glu none: w_down would have to be [E, H, 2I]
    with pytest.raises(ValueError, match="swish"):
        _run(kt, inputs, activation="swish")
    with pytest.raises(ValueError, match="H=39"):
        _run(kt, dict(inputs, x_TH=inputs["x_TH"][:, :-1]))
    with pytest.raises(ValueError, match="topk_ids"):
        _run(kt, dict(inputs, topk_ids_TK=inputs["topk_ids_TK"].float()))
    with pytest.raises(ValueError, match="BLOCK_M"):
        _run(kt, inputs, config={"BLOCK_M": 16})
    with pytest.raises(ValueError, match="b_up"):
        _run(kt, dict(inputs, b_up_EN=torch.zeros(4, 3)))
    with pytest.raises(ValueError, match="both"):
        fused_experts_triton(inputs["x_TH"], None, inputs["topk_ids_TK"], kt.stacked(inputs))
    with pytest.raises(ValueError, match="weight_format='int8'"):
        fused_experts_triton(*kt.call_args(inputs, weight_format="int8"))


@pytest.mark.parametrize("name", ["x_TH", "w_up_ENH", "b_down_EH", "topk_weights_TK"])
def test_float64_is_rejected(kt, name):
    """The contract allows float64; the Triton kernels do not: UnsupportedInputError naming the
    input, its dtype and what is allowed."""
    inputs = kt.make_moe(4, H, I, 4, 2, bias=True)
    inputs[name] = inputs[name].double()
    short = name.rsplit("_", 1)[0]
    with pytest.raises(UnsupportedInputError, match=rf"{short} dtype torch.float64.*allowed: float32, bfloat16, float16"):
        _run(kt, inputs)
