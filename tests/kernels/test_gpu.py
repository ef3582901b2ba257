"""Kernel tests at real sizes on a CUDA GPU with compiled Triton.

Run with ``TRITON_INTERPRET=0 pytest tests/kernels -m gpu`` (the kernel conftest turns the
interpreter on by default); skipped without CUDA.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from kernel_moe.kernels.contract import Activation, StackedExperts  # noqa: E402
from kernel_moe.kernels.triton.common import device_name_of  # noqa: E402
from kernel_moe.kernels.triton.forward import fused_experts_triton  # noqa: E402
from kernel_moe.kernels.triton.routing import align_by_expert, topk_gating  # noqa: E402
from kernel_moe.kernels.triton.tile_configs import get_tile_config  # noqa: E402
from kernel_moe.kernels import triton_interpreter_enabled  # noqa: E402
from kernel_moe.reference.moe import naive_moe_experts  # noqa: E402
from kernel_moe.routing.topk import RoutingSpec, route  # noqa: E402

_INTERP = triton_interpreter_enabled()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(_INTERP, reason="compiled Triton needed: run with TRITON_INTERPRET=0"),
]

LOW_TOL = dict(rtol=2e-2, atol=2e-2)
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _run(inputs, deterministic=True, activation="silu", glu="concat", alpha=1.702, limit=math.inf):
    """fused_experts_triton on make_moe inputs."""
    experts = StackedExperts(inputs["w_up_ENH"], inputs["w_down_EHI"], inputs["b_up_EN"], inputs["b_down_EH"],
                             Activation(activation, glu, alpha, limit))
    return fused_experts_triton(inputs["x_TH"], inputs["topk_weights_TK"], inputs["topk_ids_TK"], experts,
                                deterministic=deterministic)


def _reference(inputs, activation="silu", glu="concat", alpha=1.702, limit=math.inf):
    return naive_moe_experts(
        **{k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()},
        activation=Activation(activation, glu, alpha, limit),
    )


@pytest.mark.parametrize("T", [1, 16, 333, 4096])
def test_mixtral_like_bf16(kt, T):
    inputs = kt.make_moe(T, 1024, 2048, 8, 2, dtype=torch.bfloat16, device="cuda", seed=T)
    out = _run(inputs)
    ref = _reference(inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, **LOW_TOL)
    assert kt.sqnr_db(out, ref) > 30.0


def test_decode_default_config_uses_split_k():
    x = torch.empty(1, 1024, device="cuda", dtype=torch.bfloat16)
    cfg = get_tile_config(8, 4096, 1024, torch.bfloat16, device_name_of(x), 1, top_k=2)
    assert cfg["BLOCK_M"] == 16 and cfg["down"]["SPLIT_K"] > 1


@pytest.mark.parametrize("T", [1, 100, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fine_grained_gpt_oss_bias(kt, T, dtype):
    inputs = kt.make_moe(T, 512, 384, 64, 8, glu="interleaved", dtype=dtype, bias=True, device="cuda", seed=T + 1)
    kw = dict(activation="gpt_oss", glu="interleaved", alpha=1.702, limit=7.0)
    out = _run(inputs, **kw)
    ref = _reference(inputs, **kw)
    torch.testing.assert_close(out.float(), ref, **LOW_TOL)
    assert kt.sqnr_db(out, ref) > 30.0


@pytest.mark.parametrize("glu", ["concat", "none"])
def test_fp32_full_precision(kt, glu):
    inputs = kt.make_moe(257, 1024, 768, 8, 2, glu=glu, bias=True, device="cuda", seed=3)
    kw = dict(activation="gelu", glu=glu)
    torch.testing.assert_close(_run(inputs, **kw), _reference(inputs, **kw), **FP32_TOL)


def test_transposed_weights_bf16(kt):
    inputs = kt.make_moe(512, 1024, 2048, 8, 2, dtype=torch.bfloat16, device="cuda", seed=4)
    ref = _run(inputs)
    strided = dict(inputs)
    strided["w_up_ENH"] = inputs["w_up_ENH"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["w_down_EHI"] = inputs["w_down_EHI"].transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(_run(strided), ref, **LOW_TOL)


def test_deterministic_and_atomic_paths(kt):
    inputs = kt.make_moe(4096, 1024, 1024, 16, 4, dtype=torch.bfloat16, device="cuda", seed=5)
    a = _run(inputs)
    b = _run(inputs)
    assert torch.equal(a, b)
    c = _run(inputs, deterministic=False)
    torch.testing.assert_close(c.float(), a.float(), **LOW_TOL)


def test_offsets_past_int32_range(kt):
    """Token index * stride and expert index * stride beyond 2**31 elements."""
    H, I, E, K, T = 128, 64, 8, 2, 4
    small = kt.make_moe(T, H, I, E, K, dtype=torch.bfloat16, device="cuda", seed=6)
    big = torch.zeros(2**32 + 2**22, dtype=torch.bfloat16, device="cuda")
    tok_stride, exp_stride = 2**30 + 7, 2**29 + 3
    x = torch.as_strided(big, (T, H), (tok_stride, 1))
    x.copy_(small["x_TH"])
    w_up = torch.as_strided(big, (E, 2 * I, H), (exp_stride, H, 1), storage_offset=2**21)
    w_up.copy_(small["w_up_ENH"])
    assert (T - 1) * tok_stride > 2**31 and (E - 1) * exp_stride > 2**31
    out = _run(dict(small, x_TH=x, w_up_ENH=w_up))
    torch.testing.assert_close(out.float(), _reference(small), **LOW_TOL)


def test_no_host_sync_under_cuda_graph(kt):
    inputs = kt.make_moe(64, 1024, 1024, 8, 2, dtype=torch.bfloat16, device="cuda", seed=7)
    logits = torch.randn(64, 8, device="cuda")
    _run(inputs)  # compile outside the capture
    topk_gating(logits, 2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = topk_gating(logits, 2)
        out = _run(dict(inputs, topk_weights_TK=w, topk_ids_TK=ids))
    graph.replay()
    torch.cuda.synchronize()
    ref = _run(dict(inputs, topk_weights_TK=w.clone(), topk_ids_TK=ids.clone()))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("T, E, K", [(4096, 128, 8), (16384, 8, 2), (3, 256, 8)])
def test_routing_kernels_at_scale(T, E, K):
    logits = torch.randn(T, E, device="cuda")
    w, ids = topk_gating(logits, K, renormalize=True)
    ref_w, ref_ids = route(logits, RoutingSpec(E, K, renormalize=True))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    r = align_by_expert(ids, E, 64)
    flat = ids.reshape(-1)
    assert torch.equal(r.counts_E.long(), torch.bincount(flat, minlength=E))
    assert torch.equal(r.sorted_slots_S.long(), torch.argsort(flat, stable=True))
    assert torch.equal(r.inverse_S.long()[r.sorted_slots_S.long()], torch.arange(T * K, device="cuda"))
