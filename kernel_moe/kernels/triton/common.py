"""What the Triton forward and backward kernels share: ``@triton.jit`` device helpers and the
launch utilities around them.

Legend: T tokens, H hidden, E experts, K experts per token (top-k), I expert intermediate
size, N up-projection features (2*I when gated, else I), S = T*K slots (slot s = t*K + j),
P padded rows of the expert-aligned layout (see :mod:`kernel_moe.kernels.triton.routing`).

Device helpers: :func:`grouped_pid` (program-id swizzle for L2 reuse), :func:`mma` (the dot
with fp32 accumulation every GEMM uses), :func:`sigmoid`, :func:`tanh`, :func:`pointwise`,
:func:`softcap`, :func:`clamp_gate_up` and :func:`activate` (the activations of
:class:`~kernel_moe.kernels.contract.Activation`: kind, clamp limit, softcaps), :func:`block_tile`
(a program's block of the aligned layout, its expert and column tile), :func:`block_rows`
(the rows of that block), :func:`add_up_bias` (the up-projection bias in the epilogue) and
:func:`slot_weight` (a slot's routing weight).

Launch utilities: dtype maps, the TF32 switch, the launch device, the device key of tuned
tables, the launch arguments of the activation (scalars and compile-time flags) and of a GEMM's
tile, the routing of a dense call, and the check of what the kernels support beyond the contract.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from kernel_moe.errors import UnsupportedInputError
from kernel_moe.kernels import triton_interpreter_enabled
from kernel_moe.kernels.contract import Activation, StackedExperts
from kernel_moe.kernels.triton.tile_configs import INTERPRETER_DEVICE

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "gpt_oss": 4, "relu2": 5}
_INF = tl.constexpr(float("inf"))  # a softcap of inf is no cap (see softcap)
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_WEIGHT_FORMATS = ("full", "int8", "fp8", "int4")
_GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")

# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n), GROUP_M row-blocks at a time, so that
    programs running together share weight tiles (pid_n) in L2."""
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    return pid_m, pid_n


@triton.jit
def mma(a, b, acc, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr):
    """acc += a @ b with fp32 accumulation. Operands are cast to DOT_DTYPE; fp32 operands use
    IEEE precision unless TF32 (torch.backends.cuda.matmul.allow_tf32). UPCAST computes
    16-bit products in fp32 (the interpreter's dot does not handle bf16)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_DTYPE == tl.float32:
        if TF32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@triton.jit
def sigmoid(x):
    """Logistic function of an fp32 tile (saturates to 0 / 1 without NaN)."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    """Hyperbolic tangent of an fp32 tile, as 2 sigmoid(2x) - 1 (saturates to -1 / 1)."""
    return 2.0 * sigmoid(2.0 * x) - 1.0


@triton.jit
def pointwise(g, ACTIVATION: tl.constexpr):
    """silu / gelu (erf) / gelu_tanh / relu / relu2 in fp32 (code in ACTIVATION_CODES); NaN
    propagates."""
    if ACTIVATION == 0:
        return g * sigmoid(g)
    elif ACTIVATION == 1:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACTIVATION == 2:
        return 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    elif ACTIVATION == 5:
        r = tl.where(g < 0.0, 0.0, g)
        return r * r
    else:
        return tl.where(g < 0.0, 0.0, g)


@triton.jit
def softcap(v, cap):
    """(cap * tanh(v / cap), its derivative 1 - tanh(v / cap)**2) of an fp32 tile for a scalar
    ``cap``; a cap of inf is none: (v, 1) (and no inf * 0 is formed on the way)."""
    capped = cap < _INF
    c = tl.where(capped, cap, 1.0)
    t = tanh(v / c)
    return tl.where(capped, c * t, v), tl.where(capped, 1.0 - t * t, 1.0)


@triton.jit
def clamp_gate_up(gate, up, limit, CLAMPED: tl.constexpr):
    """(min(gate, limit), clamp(up, -limit, limit)) of fp32 tiles when CLAMPED (a finite
    limit), else (gate, up) untouched; NaN propagates."""
    if CLAMPED:
        gate = tl.where(gate > limit, limit, gate)
        up = tl.where(up > limit, limit, tl.where(up < -limit, -limit, up))
    return gate, up


@triton.jit
def activate(gate, up, alpha, gate_cap, up_cap, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
             SOFTCAPPED: tl.constexpr):
    """Expert activation of fp32 tiles of gate and up features already clamped
    (:func:`clamp_gate_up`), with the formulas of kernel_moe.kernels.contract.Activation:
    act(gate) when not GATED; GPT-OSS's ``(up + 1) * gate * sigmoid(alpha * gate)``; softcapped
    SwiGLU ``cap(gate, gate_cap) * sigmoid(gate) * cap(up, up_cap)`` when SOFTCAPPED; else
    ``act(gate) * up``."""
    if not GATED:
        return pointwise(gate, ACTIVATION)
    elif SOFTCAPPED:
        capped_gate, _ = softcap(gate, gate_cap)
        capped_up, _ = softcap(up, up_cap)
        return capped_gate * sigmoid(gate) * capped_up
    elif ACTIVATION == 4:
        return (up + 1.0) * (gate * sigmoid(gate * alpha))
    else:
        return pointwise(gate, ACTIVATION) * up


@triton.jit
def block_tile(
    block_expert_ptr,  # [B] int32 expert of each block of BLOCK_M rows (-1 = unused)
    num_blocks,
    num_cols,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """This program's tile of a grid over (blocks of the aligned layout x tiles of BLOCK_N of
    ``num_cols`` columns) on axis 0, ordered by :func:`grouped_pid`: (pid_m, pid_n, expert of
    the block, -1 past the used ones: the kernel returns at once; cols [BLOCK_N], col_ok)."""
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_blocks, tl.cdiv(num_cols, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_n, expert, cols, cols < num_cols


@triton.jit
def add_up_bias(
    acc_g,  # [BLOCK_M, BLOCK_N] fp32 gate (or only) features
    acc_u,  # [BLOCK_M, BLOCK_N] fp32 up features (unused when not GATED)
    bias_ptr,  # [E, N] up-projection bias, strides (stride_be, stride_bn)
    expert,
    gate_rows,
    col_ok,
    up_offset,
    stride_be,
    stride_bn,
    GATED: tl.constexpr,
):
    """(acc_g + b_up[expert] at the gate features ``gate_rows``, acc_u + b_up[expert] at the up
    features ``gate_rows + up_offset``), in fp32."""
    b_base = bias_ptr + expert.to(tl.int64) * stride_be
    acc_g += tl.load(b_base + gate_rows * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        acc_u += tl.load(b_base + (gate_rows + up_offset) * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc_g, acc_u


@triton.jit
def block_rows(
    padded_slots_ptr,  # [P] int32 slot id of each padded row (S = padding)
    pid_m,
    S,
    TOP_K,
    BLOCK_M: tl.constexpr,
):
    """The BLOCK_M rows of block ``pid_m`` of the aligned layout: (padded rows int64, slot ids,
    row is a real slot, token of each row int64)."""
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] padded rows
    slots = tl.load(padded_slots_ptr + rows)
    row_ok = slots < S
    tokens = (slots // TOP_K).to(tl.int64)
    return rows, slots, row_ok, tokens


@triton.jit
def slot_weight(
    rw_ptr,  # [T, TOP_K] routing weights (any float dtype), strides (stride_rt, stride_rk)
    tokens,
    slots,
    ok,
    TOP_K,
    stride_rt,
    stride_rk,
):
    """Routing weight of each slot in ``slots`` (token ``tokens``) in fp32; 0 where not ``ok``."""
    rw = tl.load(rw_ptr + tokens * stride_rt + (slots % TOP_K) * stride_rk, mask=ok, other=0.0)
    return rw.to(tl.float32)


# --------------------------------------------------------------------------------------
# launch utilities
# --------------------------------------------------------------------------------------


def allow_tf32() -> bool:
    """fp32 GEMMs follow torch's switch (off by default): TF32 only where torch would use it."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dot_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype a GEMM of operands of these dtypes runs in (their promotion)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def gemm_launch_args(tile: dict) -> dict:
    """Launch keywords every GEMM kernel takes: the tile entry's BLOCK_N, BLOCK_K, GROUP_M,
    num_warps and num_stages, and the precision switches UPCAST (16-bit products in fp32 under
    the interpreter) and TF32 (see :func:`allow_tf32`)."""
    args = {key: tile[key] for key in _GEMM_KEYS}
    args.update(UPCAST=triton_interpreter_enabled(), TF32=allow_tf32())
    return args


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def launch_device(t: torch.Tensor):
    """Context that makes ``t``'s GPU current for a launch (no-op on CPU)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=16)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name_of(t: torch.Tensor) -> str:
    """The key of tuned configs for the device that runs ``t``'s kernels."""
    if triton_interpreter_enabled() or t.device.type != "cuda":
        return INTERPRETER_DEVICE
    return _cuda_device_name(t.device.index if t.device.index is not None else torch.cuda.current_device())


def operand(t: torch.Tensor | None, placeholder: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """An optional 2-D operand as a launch sees it: (tensor, stride 0, stride 1), or the
    placeholder (any tensor of the call, never read) and strides (0, 0) when ``t`` is None."""
    if t is None:
        return placeholder, 0, 0
    return t, t.stride(0), t.stride(1)


def activation_constexprs(activation: Activation) -> dict:
    """The activation's compile-time launch arguments: ACTIVATION (its code), GATED, GATE_STEP
    (2 interleaved, else 1), CLAMPED (a finite limit) and SOFTCAPPED (a finite softcap), so
    that a call without a clamp or softcaps compiles neither."""
    return dict(
        ACTIVATION=ACTIVATION_CODES[activation.kind],
        GATED=activation.gated,
        GATE_STEP=2 if activation.glu == "interleaved" else 1,
        CLAMPED=activation.gated and activation.limit != math.inf,
        SOFTCAPPED=activation.softcapped,
    )


def activation_scalars(activation: Activation) -> tuple[float, float, float, float]:
    """The activation's scalar launch arguments, in the kernels' order: alpha, limit,
    gate_softcap, up_softcap (inf: no clamp, no cap)."""
    return (float(activation.alpha), float(activation.limit), float(activation.gate_softcap),
            float(activation.up_softcap))


def up_offset(activation: Activation, intermediate: int) -> int:
    """Distance from an intermediate column's gate feature to its up feature in w_up's N axis
    (concat: I; interleaved: 1)."""
    return intermediate if activation.glu == "concat" else 1


def unit_weights(T: int, K: int, device: torch.device) -> torch.Tensor:
    """Routing weight 1 for every slot: a [T, K] fp32 view of one scalar (strides (0, 0))."""
    return torch.ones((), dtype=torch.float32, device=device).expand(T, K)


def dense_routing(x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing of a dense call (one expert, weight 1): [T, 1] fp32 ones and int32 zeros,
    views of scalars made on x's device (nothing per token, nothing read on the host)."""
    T = x_TH.shape[0]
    ids_T1 = torch.zeros((), dtype=torch.int32, device=x_TH.device).expand(T, 1)
    return unit_weights(T, 1, x_TH.device), ids_T1


def check_supported(experts: StackedExperts, **tensors: torch.Tensor | None) -> None:
    """What the Triton kernels take beyond the contract: an activation kind with a kernel code
    (every kind of the contract has one), a weight format they read (all of the contract's), and
    float32, bfloat16 or float16 for full-precision weights, the biases and every floating tensor
    in ``tensors`` (by name: x, topk_weights, grad_out). Raises UnsupportedInputError naming the
    value."""
    if experts.activation.kind not in ACTIVATION_CODES:
        raise UnsupportedInputError(f"the triton backend does not support activation={experts.activation.kind!r}; "
                                    f"allowed: {', '.join(ACTIVATION_CODES)}")
    if experts.weight_format not in SUPPORTED_WEIGHT_FORMATS:
        raise UnsupportedInputError(f"the triton backend does not support weight_format={experts.weight_format!r}; "
                                    f"allowed: {', '.join(SUPPORTED_WEIGHT_FORMATS)}")
    weights = {} if experts.quantized else dict(w_up=experts.w_up, w_down=experts.w_down)
    named = dict(weights, b_up=experts.b_up, b_down=experts.b_down, **tensors)
    for name, t in named.items():
        if t is not None and t.is_floating_point() and t.dtype not in TL_DTYPES:
            raise UnsupportedInputError(f"the triton backend does not support {name} dtype {t.dtype}; allowed: "
                                        "float32, bfloat16, float16")
