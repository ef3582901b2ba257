"""kernel_moe::fused_experts forward against naive_moe_experts (the reference).

Covers token counts, expert counts, top-k, every activation and GLU layout, biases, weight
views with any strides, non-contiguous inputs, skewed routing, low precision, NaN inputs and
input validation. Every test runs twice: with the native CPU extension (where it builds) and
with the PyTorch path alone, so that both CPU paths stay covered.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import (as_fp32, assert_fp32_close, assert_low_precision_close, limit_for, op_inputs, run_op,
                     run_reference)
from kernel_moe import UnsupportedInputError
from kernel_moe.kernels import cpu as cpu_kernels
from kernel_moe.kernels.cpu import forward as cpu_forward
from kernel_moe.reference.moe import expert_mlp

H, I = 32, 24
EK = [(1, 1), (3, 1), (3, 2), (3, 3), (8, 1), (8, 2), (8, 8), (16, 1), (16, 2), (16, 16)]
ACTIVATIONS = [
    ("silu", "none"), ("silu", "concat"), ("silu", "interleaved"),
    ("gelu", "none"), ("gelu", "concat"), ("gelu", "interleaved"),
    ("gelu_tanh", "none"), ("gelu_tanh", "concat"), ("gelu_tanh", "interleaved"),
    ("relu", "none"), ("relu", "concat"), ("relu", "interleaved"),
    ("relu2", "none"), ("relu2", "concat"),
    ("gpt_oss", "concat"), ("gpt_oss", "interleaved"),
]


@pytest.fixture(autouse=True, params=["auto", "off"], ids=["native", "torch"])
def cpu_extension_setting(request, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, request.param)
    return request.param


@pytest.mark.parametrize("T", [0, 1, 7, 128, 1000])
@pytest.mark.parametrize("E,K", EK, ids=[f"E{e}K{k}" for e, k in EK])
def test_matches_reference_over_tokens_experts_and_top_k(T, E, K):
    inputs = op_inputs(T, H, I, E, K, seed=T + 31 * E + K)
    out = run_op(inputs)
    assert out.shape == (T, H) and out.dtype == torch.float32
    assert_fp32_close(out, run_reference(inputs))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation,glu", ACTIVATIONS, ids=[f"{a}-{g}" for a, g in ACTIVATIONS])
def test_every_activation_and_layout(activation, glu, bias):
    inputs = op_inputs(37, H, I, 5, 2, glu=glu, bias=bias, seed=3)
    inputs["x"] = inputs["x"] * 3  # reach the activations' non-linear ranges
    out = run_op(inputs, activation, glu)
    assert_fp32_close(out, run_reference(inputs, activation, glu))


@pytest.mark.parametrize("glu", ["concat", "interleaved"])
@pytest.mark.parametrize("alpha,limit", [(1.702, 7.0), (1.0, 0.5), (2.5, math.inf)])
def test_gpt_oss_alpha_and_limit(glu, alpha, limit):
    inputs = op_inputs(29, H, I, 4, 2, glu=glu, bias=True, seed=4)
    inputs["x"] = inputs["x"] * 4  # many gate/up values beyond the clamp limit
    out = run_op(inputs, "gpt_oss", glu, alpha, limit)
    ref = run_reference(inputs, "gpt_oss", glu, alpha, limit)
    assert_fp32_close(out, ref)
    if math.isfinite(limit):  # the limit really changes the result
        assert not torch.allclose(ref, run_reference(inputs, "gpt_oss", glu, alpha, math.inf), atol=1e-3)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("glu", ["concat", "interleaved"])
def test_clamped_swiglu_limit(activation, glu):
    """A gated activation with a limit clamps gate (above) and up (both sides) first (DeepSeek-V4,
    GLM-5-Next, HY-V4 clamp a plain SwiGLU)."""
    inputs = op_inputs(33, H, I, 4, 2, glu=glu, bias=True, seed=41)
    inputs["x"] = inputs["x"] * 4  # many gate/up values beyond the limit
    ref = run_reference(inputs, activation, glu, 1.702, 1.5)
    assert_fp32_close(run_op(inputs, activation, glu, 1.702, 1.5), ref)
    assert not torch.allclose(ref, run_reference(inputs, activation, glu), atol=1e-3)


@pytest.mark.parametrize("caps", [(2.0, 3.0), (1.5, math.inf), (math.inf, 0.7)])
@pytest.mark.parametrize("glu", ["concat", "interleaved"])
@pytest.mark.parametrize("T", [1, 9, 300])
def test_softcapped_swiglu(caps, glu, T):
    """cap(gate) * sigmoid(gate) * cap(up), cap(v) = c * tanh(v / c) (Inkling 2)."""
    inputs = op_inputs(T, H, I, 6, 2, glu=glu, seed=42 + T)
    inputs["x"] = inputs["x"] * 3
    inputs["softcaps"] = caps
    ref = run_reference(inputs, "silu", glu)
    assert_fp32_close(run_op(inputs, "silu", glu), ref)
    assert not torch.allclose(ref, run_reference(dict(inputs, softcaps=(math.inf, math.inf)), "silu", glu),
                              atol=1e-3)


@pytest.mark.parametrize("T", [0, 1, 6, 129])
@pytest.mark.parametrize("K", [1, 2])
def test_routing_weights_that_scale_the_inputs(T, K):
    """scale_inputs: out[t] = sum_j expert(w[t, j] * x[t]) (Llama 4), dropped slots included."""
    inputs = op_inputs(T, H, I, 5, K, bias=True, seed=43 + T)
    inputs["scale_inputs"] = True
    inputs["topk_weights"] = inputs["topk_weights"] * 3
    if T > 2:
        inputs["topk_ids"][2, 0] = -1
    ref = run_reference(inputs)
    assert_fp32_close(run_op(inputs), ref)
    if T:
        assert not torch.allclose(ref, run_reference(dict(inputs, scale_inputs=False)), atol=1e-3)


def test_invalid_activation_parameters_name_the_field():
    inputs = op_inputs(4, H, I, 2, 1, glu="none")
    with pytest.raises(UnsupportedInputError, match="limit=7.0 needs a gated layout"):
        run_op(inputs, "gelu", "none", 1.702, 7.0)
    inputs = op_inputs(4, H, I, 2, 1)
    inputs["softcaps"] = (2.0, math.inf)
    with pytest.raises(UnsupportedInputError, match="gated silu only"):
        run_op(inputs, "gelu", "concat")
    inputs["softcaps"] = (-1.0, math.inf)
    with pytest.raises(UnsupportedInputError, match="gate_softcap=-1.0 must be > 0"):
        run_op(inputs, "silu", "concat")


def test_transposed_weight_views_and_non_contiguous_inputs():
    base = op_inputs(23, H, I, 6, 2, bias=True, seed=5)
    inputs = dict(base)
    # Weights stored [E, H, N] / [E, I, H] and passed as transposed views.
    inputs["w_up"] = base["w_up"].transpose(1, 2).contiguous().transpose(1, 2)
    inputs["w_down"] = base["w_down"].transpose(1, 2).contiguous().transpose(1, 2)
    # Tokens as a transposed view, routing as strided views, biases as slices.
    inputs["x"] = base["x"].t().contiguous().t()
    inputs["topk_weights"] = torch.stack([base["topk_weights"], torch.zeros_like(base["topk_weights"])], -1)[..., 0]
    inputs["topk_ids"] = torch.stack([base["topk_ids"], torch.zeros_like(base["topk_ids"])], -1)[..., 0]
    inputs["b_up"] = torch.cat([base["b_up"], base["b_up"]], dim=1)[:, : base["b_up"].shape[1]]
    for key in ("w_up", "w_down", "x", "topk_weights", "topk_ids", "b_up"):
        assert not inputs[key].is_contiguous(), key
    assert_fp32_close(run_op(inputs), run_reference(base))


def test_x_sliced_from_a_wider_buffer():
    inputs = op_inputs(17, H, I, 4, 2, seed=6)
    wide = torch.randn(17, 3 * H)
    wide[:, H : 2 * H] = inputs["x"]
    ref = run_reference(inputs)
    inputs["x"] = wide[:, H : 2 * H]
    assert not inputs["x"].is_contiguous()
    assert_fp32_close(run_op(inputs), ref)


@pytest.mark.parametrize("K", [1, 2])
def test_all_tokens_to_one_expert_and_unused_experts(K):
    inputs = op_inputs(64, H, I, 8, K, routing="one", seed=7)
    assert_fp32_close(run_op(inputs), run_reference(inputs))
    few = op_inputs(64, H, I, 8, K, routing="few", seed=8)
    assert_fp32_close(run_op(few), run_reference(few))


@pytest.mark.parametrize("routing", ["random", "one", "few"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_chunks_that_split_experts_match_reference(monkeypatch, routing, bias):
    """The CPU forward processes sorted slots in chunks; chunk edges falling inside an
    expert's rows (and chunks holding several experts) must not change the result."""
    monkeypatch.setattr(cpu_forward, "MIN_CHUNK_ROWS", 5)
    monkeypatch.setattr(cpu_forward, "CHUNKS_PER_CALL", 1000)
    inputs = op_inputs(41, H, I, 6, 2, bias=bias, routing=routing, seed=12)
    assert_fp32_close(run_op(inputs, backend="cpu"), run_reference(inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("ids", [[[1, 6]], [[5, 2]], [[3, 4]], [[6, 4, 2]], [[0, 3], [6, 3]], [[2, 2]],
                                 [[7, 1], [4, 1], [1, 7]], [[2, 3], [4, 3], [2, 5]]])
@pytest.mark.parametrize("threads", [1, 2])
def test_few_rows_per_expert_as_strided_batched_gemms(ids, dtype, threads):
    """Small batches run experts as batched GEMMs over strided views of the stacked weights:
    equally spaced ids (one run with a step), padded rows (with more than one thread),
    repeated experts, biases."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_few_rows(ids, dtype)
    finally:
        torch.set_num_threads(before)


def _check_few_rows(ids, dtype):
    T, K = len(ids), len(ids[0])
    inputs = op_inputs(T, H, I, 8, K, bias=True, dtype=dtype, seed=14)
    assert inputs["topk_weights"].dtype == torch.float32
    inputs["topk_ids"] = torch.tensor(ids)
    if dtype == torch.float64:
        inputs["topk_weights"] = inputs["topk_weights"].double()
    out = run_op(inputs, backend="cpu")
    ref = run_reference(as_fp32(inputs) if dtype == torch.bfloat16 else inputs)
    if dtype == torch.bfloat16:
        assert_low_precision_close(out, ref)
    elif dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    else:
        assert_fp32_close(out, ref)


def test_expert_runs_cover_only_experts_with_slots():
    counts = [0, 3, 1, 0, 2, 5, 0, 1]
    assert cpu_forward._expert_runs(counts, torch.bfloat16) == [(1, 1, 2), (4, 1, 2), (7, 1, 1)]
    assert cpu_forward._expert_runs(counts, torch.float32) == [(1, 1, 2), (4, 1, 2), (7, 1, 1)]
    spaced = [0, 1, 0, 0, 2, 0, 0, 1]
    assert cpu_forward._expert_runs(spaced, torch.float32) == [(1, 3, 3)]
    assert cpu_forward._expert_runs(spaced, torch.bfloat16) == [(1, 1, 1), (4, 1, 1), (7, 1, 1)]


def test_chunk_bounds_tile_the_slots_and_keep_experts_whole_where_they_fit():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        E = int(torch.randint(1, 12, (1,), generator=g))
        counts = torch.randint(0, 40, (E,), generator=g).mul(torch.rand(E, generator=g) < 0.8).tolist()
        chunk = int(torch.randint(1, 60, (1,), generator=g))
        bounds = cpu_forward._chunk_bounds(counts, chunk)
        S = sum(counts)
        assert [b for b in bounds if b[0] < b[1]] == bounds
        assert [c for b in bounds for c in b][1:-1:2] == [c for b in bounds for c in b][2::2]  # contiguous
        assert (bounds[0][0], bounds[-1][1]) == (0, S) if S else bounds == []
        assert all(c1 - c0 <= chunk for c0, c1 in bounds)
        cuts = {c0 for c0, _ in bounds}
        start = 0
        for n in counts:  # an expert that fits in a chunk is never cut
            if n <= chunk:
                assert not any(start < c < start + n for c in cuts), (counts, chunk, bounds)
            start += n


@pytest.mark.parametrize("T", [20, 40], ids=["host-sort", "tensor-sort"])
def test_out_of_range_expert_ids_drop_their_slot(T):
    """The contract's rule: an id outside [0, E) contributes nothing (capacity overflow, an
    expert held elsewhere); a token whose every slot is dropped gets zeros."""
    assert (2 * 20 <= cpu_forward.HOST_SORT_MAX_SLOTS) and (2 * 40 > cpu_forward.HOST_SORT_MAX_SLOTS)
    inputs = op_inputs(T, H, I, 4, 2, seed=13)
    inputs["topk_ids"][3, 1] = -1
    inputs["topk_ids"][5, 0] = 4
    inputs["topk_ids"][7] = torch.tensor([9, -3])
    inputs["x"][7] = float("nan")  # a dropped slot adds nothing, not even a NaN
    kept = dict(inputs, topk_weights=inputs["topk_weights"].clone(), topk_ids=inputs["topk_ids"].clamp(0, 3))
    kept["topk_weights"][3, 1] = kept["topk_weights"][5, 0] = 0.0
    kept["topk_weights"][7] = 0.0
    kept["x"] = inputs["x"].nan_to_num(0.0)
    out = run_op(inputs)
    assert torch.equal(out[7], torch.zeros(H))
    assert_fp32_close(out, run_reference(kept))


def test_int32_ids_and_repeated_expert_in_a_row():
    inputs = op_inputs(12, H, I, 4, 3, seed=9)
    inputs["topk_ids"][:, 1] = inputs["topk_ids"][:, 0]  # the same expert twice for a token
    ref = run_reference(inputs)
    inputs["topk_ids"] = inputs["topk_ids"].to(torch.int32)
    assert_fp32_close(run_op(inputs), ref)


def test_zero_routing_weights_give_zero_output():
    inputs = op_inputs(10, H, I, 4, 2, seed=10)
    inputs["topk_weights"] = torch.zeros_like(inputs["topk_weights"])
    assert torch.equal(run_op(inputs), torch.zeros(10, H))


def test_float64_matches_reference_tightly():
    inputs = op_inputs(50, H, I, 6, 2, bias=True, dtype=torch.float64, seed=11)
    inputs["topk_weights"] = inputs["topk_weights"].double()
    out = run_op(inputs)
    assert out.dtype == torch.float64
    # naive_moe_experts accumulates in fp32, so the float64 truth is summed here per slot.
    i = inputs
    ref = torch.zeros(50, H, dtype=torch.float64)
    for t in range(50):
        for j in range(2):
            e = int(i["topk_ids"][t, j])
            y = expert_mlp(i["x"][t : t + 1], i["w_up"][e], i["w_down"][e], i["b_up"][e], i["b_down"][e])
            ref[t] += i["topk_weights"][t, j] * y[0]
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T", [1, 7, 128])
@pytest.mark.parametrize("weights_dtype", ["fp32", "same"])
def test_low_precision_against_fp32_reference(dtype, T, weights_dtype):
    inputs = op_inputs(T, H, I, 8, 2, bias=True, dtype=dtype, seed=12 + T)
    if weights_dtype == "same":
        inputs["topk_weights"] = inputs["topk_weights"].to(dtype)
    out = run_op(inputs)
    assert out.dtype == dtype
    assert_low_precision_close(out, run_reference(as_fp32(inputs)))


@pytest.mark.parametrize("activation,glu", [("silu", "concat"), ("gelu", "none"), ("gpt_oss", "interleaved")])
def test_bf16_activations_against_fp32_reference(activation, glu):
    inputs = op_inputs(96, H, I, 6, 2, glu=glu, bias=True, dtype=torch.bfloat16, seed=13)
    out = run_op(inputs, activation, glu, 1.702, limit_for(glu))
    assert_low_precision_close(out, run_reference(as_fp32(inputs), activation, glu, 1.702, limit_for(glu)))


def test_nan_in_input_propagates_without_crash():
    inputs = op_inputs(16, H, I, 4, 2, seed=14)
    ref_clean = run_reference(inputs)
    inputs["x"][5, 0] = float("nan")
    out = run_op(inputs)
    assert torch.isnan(out[5]).all()
    keep = torch.arange(16) != 5
    assert_fp32_close(out[keep], ref_clean[keep])


def test_output_is_fresh_and_deterministic():
    inputs = op_inputs(40, H, I, 8, 2, seed=15)
    x_before = inputs["x"].clone()
    a = run_op(inputs)
    b = run_op(inputs)
    assert torch.equal(a, b)
    assert a.data_ptr() != inputs["x"].data_ptr()
    assert torch.equal(inputs["x"], x_before)


def test_backends_torch_and_auto_agree_on_cpu():
    inputs = op_inputs(33, H, I, 5, 2, seed=16)
    assert torch.equal(run_op(inputs, backend="cpu"), run_op(inputs, backend="auto"))


def test_triton_backend_on_cpu_without_interpreter_raises_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = op_inputs(4, H, I, 2, 1)
    with pytest.raises(UnsupportedInputError, match="TRITON_INTERPRET"):
        run_op(inputs, backend="triton")


def _bad(**changes):
    inputs = op_inputs(6, H, I, 4, 2, bias=True)
    args = dict(activation="silu", glu="concat", backend="auto")
    for k, v in changes.items():
        (args if k in args else inputs)[k] = v(inputs) if callable(v) else v
    return inputs, args


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(x=lambda i: i["x"].unsqueeze(0)), "x must be 2-D"),
        (dict(x=lambda i: i["x"].long()), "dtype"),
        (dict(topk_ids=lambda i: i["topk_ids"].float()), "topk_ids dtype"),
        (dict(topk_ids=lambda i: i["topk_ids"][:3]), "topk_ids must be"),
        (dict(topk_weights=lambda i: i["topk_weights"][:, :1]), "topk_weights shape"),
        (dict(w_up=lambda i: i["w_up"][:, :, :-1]), "H="),
        (dict(w_up=lambda i: i["w_up"][:, :-1]), "not even"),
        (dict(w_down=lambda i: i["w_down"][:, :, :-2]), "w_down must be"),
        (dict(w_up=lambda i: i["w_up"][0]), "3-D"),
        (dict(b_up=lambda i: i["b_up"][:, :-2]), "b_up must be"),
        (dict(b_down=lambda i: i["b_down"][:-1]), "b_down must be"),
        (dict(activation="swish"), "activation='swish'"),
        (dict(glu="split"), "glu='split'"),
        (dict(activation="gpt_oss", glu="none", w_up=lambda i: i["w_up"][:, :I], b_up=None), "gpt_oss"),
        (dict(backend="cuda"), "backend='cuda'"),
        (dict(topk_ids=None, topk_weights=None), "dense call"),
        (dict(topk_ids=None), "both be given"),
        (dict(expert_map=lambda i: torch.zeros(8)), "expert_map must be"),
    ],
    ids=["x3d", "x_int", "ids_float", "ids_rows", "weights_shape", "w_up_hidden", "odd_n", "w_down_shape",
         "w_up_2d", "b_up_shape", "b_down_shape", "activation", "glu", "gpt_oss_none", "backend", "dense_many",
         "half_routing", "map_dtype"],
)
def test_invalid_inputs_raise_unsupported_input_error(changes, match):
    inputs, args = _bad(**changes)
    with pytest.raises(UnsupportedInputError, match=match):
        run_op(inputs, args["activation"], args["glu"], backend=args["backend"])
