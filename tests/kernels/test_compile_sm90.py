"""Compile representative specialisations of every kernel for sm_90 (Triton frontend + the
bundled ptxas) in a subprocess without the interpreter: catches what only the compiler
rejects, on machines without a GPU."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

SCRIPT = textwrap.dedent(
    """
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernel_moe.kernels.triton import forward as F
    from kernel_moe.kernels.triton import projection as PJ
    from kernel_moe.kernels.triton import routing as R

    TARGET = GPUTarget("cuda", 90, 32)
    I32 = "*i32"

    def build(fn, types, consts, ones=(), div16=(), **opts):
        # Compile like the JIT would: `ones` are ints equal to 1 (specialised to constants),
        # `div16` ints divisible by 16; pointers are 16-byte aligned.
        sig, cst, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts or name in ones:
                sig[name], cst[(i,)] = "constexpr", consts.get(name, 1)
            else:
                assert fn.params[i].is_constexpr is False, f"{fn.__name__}: constexpr {name} not given"
                sig[name] = types.get(name, "i32")
                if name in div16 or sig[name].startswith("*"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=sig, constexprs=cst, attrs=attrs)
        kernel = triton.compile(src, target=TARGET, options=opts)
        assert kernel.asm.get("cubin"), fn.__name__

    build(R._topk_gating_kernel, {"logits_ptr": "*bf16", "weights_ptr": "*fp32", "ids_ptr": "*i64", "scaling": "fp32"},
          dict(TOP_K=8, SOFTMAX=False, TOPK_FIRST=False, RENORMALIZE=True, BLOCK_T=16, BLOCK_E=256, BLOCK_K=8))
    build(R._align_single_kernel, {"ids_ptr": "*i64", "counts_ptr": I32, "offsets_ptr": I32, "sorted_ptr": I32,
          "inverse_ptr": I32, "padded_ptr": I32, "padded_offsets_ptr": I32, "block_expert_ptr": I32},
          dict(BLOCK_M=16, BLOCK_S=128, BLOCK_E=128, CHUNK=16))
    build(R._align_histogram_kernel, {"ids_ptr": "*i64", "block_counts_ptr": I32}, dict(BLOCK_S=64, BLOCK_E=128))
    build(R._align_scan_kernel, {"block_counts_ptr": I32, "counts_ptr": I32}, dict(CHUNK_B=512, BLOCK_E=16))
    build(R._align_layout_kernel, {"counts_ptr": I32, "offsets_ptr": I32, "padded_offsets_ptr": I32,
          "block_expert_ptr": I32, "padded_ptr": I32}, dict(BLOCK_M=64, BLOCK_E=128, CHUNK=64))
    build(R._align_scatter_kernel, {"ids_ptr": "*i32", "block_base_ptr": I32, "offsets_ptr": I32,
          "padded_offsets_ptr": I32, "sorted_ptr": I32, "inverse_ptr": I32, "padded_ptr": I32},
          dict(BLOCK_S=64, BLOCK_E=128))
    UP_ONES = ("stride_xh", "stride_wh", "stride_bn")  # contiguous tokens, weights and bias
    UP_DIV = ("H", "I", "up_offset", "stride_xt", "stride_we", "stride_wn", "stride_be", "stride_om")
    UP_CASES = (  # (activation code, gated, gate step, clamped, softcapped, x dtype, w dtype, dot dtype, tf32,
        #             contiguous)
        (0, True, 1, False, False, "bf16", "bf16", tl.bfloat16, False, True),
        (4, True, 2, True, False, "fp16", "fp16", tl.float16, False, True),
        (2, False, 1, False, False, "bf16", "fp32", tl.float32, True, False),
        (0, True, 2, True, True, "bf16", "bf16", tl.bfloat16, False, True),  # clamped softcapped SwiGLU
        (5, True, 1, True, False, "fp16", "fp16", tl.float16, False, True),  # clamped relu2-GLU
        (5, False, 1, False, False, "fp32", "fp32", tl.float32, False, False),
    )
    SCALARS = {"alpha": "fp32", "limit": "fp32", "gate_softcap": "fp32", "up_softcap": "fp32"}
    for act, gated, step, clamped, capped, x, w, dot, tf32, contiguous in UP_CASES:
        types = {"x_ptr": "*" + x, "w_ptr": "*" + w, "bias_ptr": "*" + w, "out_ptr": "*" + x,
                 "padded_slots_ptr": I32, "block_expert_ptr": I32, "ws_ptr": "*fp32", "stride_we": "i64", **SCALARS}
        consts = dict(ACTIVATION=act, GATED=gated, GATE_STEP=step, CLAMPED=clamped, SOFTCAPPED=capped, HAS_BIAS=gated,
                      DOT_DTYPE=dot, UPCAST=False, TF32=tf32, EVEN_K=act == 0, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64,
                      GROUP_M=8, W_FORMAT=0)
        spec = dict(ones=UP_ONES, div16=UP_DIV) if contiguous else {}
        build(F._moe_up_kernel, types, consts, num_warps=4, num_stages=3, **spec)
    for fmt, w in ((1, "*i8"), (2, "*u8"), (3, "*u8")):  # int8, fp8 (as its bytes), int4 dequantized in the K-loop
        types = {"x_ptr": "*bf16", "w_ptr": w, "bias_ptr": "*bf16", "out_ptr": "*bf16", "padded_slots_ptr": I32,
                 "block_expert_ptr": I32, "ws_ptr": "*fp32", "stride_we": "i64", **SCALARS}
        consts = dict(ACTIVATION=0, GATED=True, GATE_STEP=1, CLAMPED=False, SOFTCAPPED=False, HAS_BIAS=False,
                      DOT_DTYPE=tl.bfloat16, UPCAST=False, TF32=False, EVEN_K=True, BLOCK_M=16, BLOCK_N=64,
                      BLOCK_K=128, GROUP_M=8, W_FORMAT=fmt)
        build(F._moe_up_kernel, types, consts, num_warps=4, num_stages=3, ones=UP_ONES, div16=UP_DIV)
        types = {"a_ptr": "*bf16", "w_ptr": w, "bias_ptr": "*bf16", "rw_ptr": "*fp32", "out_ptr": "*fp32",
                 "padded_slots_ptr": I32, "block_expert_ptr": I32, "ws_ptr": "*fp32"}
        consts = dict(OUT_MODE=0, HAS_BIAS=False, DOT_DTYPE=tl.bfloat16, UPCAST=False, TF32=False, SPLIT_K=4,
                      BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, W_FORMAT=fmt, W_T=fmt == 3)
        build(F._moe_down_kernel, types, consts, num_warps=8, num_stages=3)
    DOWN_ONES = ("stride_wi", "stride_bh", "stride_rk", "stride_oh")
    DOWN_DIV = ("H", "I", "stride_am", "stride_we", "stride_wh", "stride_be", "k_per_split", "stride_ot")
    for mode in (0, 1, 2):
        types = {"a_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "rw_ptr": "*fp32",
                 "out_ptr": "*fp32" if mode < 2 else "*bf16", "padded_slots_ptr": I32, "block_expert_ptr": I32,
                 "ws_ptr": "*bf16"}
        consts = dict(OUT_MODE=mode, HAS_BIAS=mode == 0, DOT_DTYPE=tl.bfloat16, UPCAST=False, TF32=False,
                      SPLIT_K=4 if mode == 0 else 1, BLOCK_M=16 if mode == 0 else 128, BLOCK_N=128, BLOCK_K=64,
                      GROUP_M=8, W_FORMAT=0, W_T=False)
        spec = dict(ones=DOWN_ONES, div16=DOWN_DIV) if mode != 1 else {}
        build(F._moe_down_kernel, types, consts, num_warps=8, num_stages=3, **spec)
    build(F._moe_reduce_kernel, {"part_ptr": "*fp32", "ids_ptr": "*i64", "out_ptr": "*bf16", "split_stride": "i64"},
          dict(SPLIT_K=2, BLOCK_T=16, BLOCK_H=256))
    # expert projection (attention experts): gather half (x dtype out), combine half (fp32 partials),
    # the backward's transposed weight read, and the weight-gradient kernel
    for x, w, out, dot, weighted, bias, even in (("bf16", "bf16", "bf16", tl.bfloat16, False, False, True),
                                                 ("bf16", "bf16", "fp32", tl.bfloat16, True, True, False),
                                                 ("fp32", "fp32", "fp32", tl.float32, False, False, False),
                                                 ("fp16", "fp16", "fp32", tl.float16, True, False, True)):
        types = {"x_ptr": "*" + x, "w_ptr": "*" + w, "bias_ptr": "*" + w, "rw_ptr": "*fp32", "out_ptr": "*" + out,
                 "padded_slots_ptr": I32, "block_expert_ptr": I32}
        consts = dict(HAS_BIAS=bias, WEIGHTED=weighted, DOT_DTYPE=dot, UPCAST=False, TF32=False, EVEN_K=even,
                      BLOCK_M=64 if even else 16, BLOCK_N=64, BLOCK_K=32 if even else 64, GROUP_M=8)
        build(PJ._projection_kernel, types, consts, num_warps=4, num_stages=3)
    for g, dot, weighted, bias in (("bf16", tl.bfloat16, True, True), ("fp32", tl.float32, False, False)):
        types = {"g_ptr": "*" + g, "x_ptr": "*" + g, "rw_ptr": "*fp32", "out_ptr": "*" + g, "bias_ptr": "*" + g,
                 "padded_slots_ptr": I32, "padded_offsets_ptr": I32}
        consts = dict(WEIGHTED=weighted, HAS_BIAS=bias, DOT_DTYPE=dot, UPCAST=False, TF32=False, BLOCK_M=64,
                      BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
        build(PJ._projection_dw_kernel, types, consts, num_warps=4, num_stages=3)
    print("compiled")
    """
)


@pytest.mark.skipif(not _PTXAS.exists(), reason="triton without its bundled NVIDIA backend / ptxas")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=root
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
