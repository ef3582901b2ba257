"""Fused MoE expert kernels: grouped up-projection with the activation in its epilogue,
grouped down-projection with the routing weight in its epilogue, and the reduction over K.

Legend: T tokens, H hidden, E experts, K experts per token (top-k), I expert intermediate
size, N up-projection features (2*I when gated, else I), S = T*K slots (slot s = t*K + j),
B blocks of BLOCK_M rows of the expert-aligned layout, P = B*BLOCK_M padded rows.

Data flow (no permuted copy of the tokens is ever made):

1. :func:`~kernel_moe.kernels.routing.align_by_expert` sorts the slots by expert and pads
   each expert's run to a multiple of BLOCK_M (sentinel S).
2. ``_moe_up_kernel``: for each block of padded rows (one expert) and tile of I columns,
   the token rows of x are gathered in the A-load through the padded slot ids, multiplied by
   w_up[e] (gate and up tiles in the same program when gated), bias and activation applied
   in fp32, and the [P, I] intermediate stored in padded order.
3. ``_moe_down_kernel``: intermediate rows times w_down[e], bias, times the routing weight
   of the slot; written per slot ([SPLIT_K, S, H] fp32, deterministic), straight into the
   output when K == 1, or atomically added into an fp32 [T, H] buffer.
4. ``_moe_reduce_kernel``: sums the per-slot partials over K (and splits) in a fixed order.

The decode path (few slots per expert) is the same kernels with BLOCK_M 16, narrow
up-projection tiles and split-K on the down projection so that many programs stream the
weights; :func:`~kernel_moe.kernels.block_config.get_kernel_config` selects it.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from kernel_moe.errors import UnsupportedInputError
from kernel_moe.kernels.block_config import INTERPRETER_DEVICE, get_kernel_config, validate_kernel_config
from kernel_moe.kernels.routing import AlignedRouting, _launch_device, align_by_expert
from kernel_moe.reference.activations import check_activation

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "gpt_oss": 4}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
OUT_PARTIAL, OUT_ATOMIC, OUT_DIRECT = 0, 1, 2


def interpreting() -> bool:
    """True when Triton runs through its numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=16)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name_of(t: torch.Tensor) -> str:
    """The key of tuned configs for the device that runs ``t``'s kernels."""
    if interpreting() or t.device.type != "cuda":
        return INTERPRETER_DEVICE
    return _cuda_device_name(t.device.index if t.device.index is not None else torch.cuda.current_device())


# --------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
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
def _mma(a, b, acc, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr):
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
def _sigmoid(x):
    """Logistic function of an fp32 tile (saturates to 0 / 1 without NaN)."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _pointwise(g, ACTIVATION: tl.constexpr):
    """silu / gelu (erf) / gelu_tanh / relu in fp32; NaN propagates."""
    if ACTIVATION == 0:
        return g * _sigmoid(g)
    elif ACTIVATION == 1:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACTIVATION == 2:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (1.0 + (2.0 * _sigmoid(2.0 * z) - 1.0))  # tanh(z) = 2 sigmoid(2z) - 1
    else:
        return tl.where(g < 0.0, 0.0, g)


@triton.jit
def _activate(gate, up, alpha, limit, ACTIVATION: tl.constexpr, GATED: tl.constexpr):
    """Expert activation of fp32 tiles (see kernel_moe/reference/activations.py)."""
    if not GATED:
        return _pointwise(gate, ACTIVATION)
    elif ACTIVATION == 4:
        gate = tl.where(gate > limit, limit, gate)
        up = tl.where(up > limit, limit, tl.where(up < -limit, -limit, up))
        return (up + 1.0) * (gate * _sigmoid(gate * alpha))
    else:
        return _pointwise(gate, ACTIVATION) * up


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _moe_up_kernel(
    x_ptr,  # [T, H] tokens, strides (stride_xt, stride_xh)
    w_ptr,  # [E, N, H] up-projection weights, strides (stride_we, stride_wn, stride_wh)
    bias_ptr,  # [E, N] up-projection bias, strides (stride_be, stride_bn); unused without HAS_BIAS
    out_ptr,  # [P, I] intermediate in padded order, row stride stride_om, unit column stride
    padded_slots_ptr,  # [P] int32 slot id of each padded row (S = padding)
    block_expert_ptr,  # [B] int32 expert of each block of BLOCK_M rows (-1 = unused)
    H,
    I,
    S,
    TOP_K,
    num_blocks,
    up_offset,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wh,
    stride_be,
    stride_bn,
    stride_om,
    alpha,
    limit,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    GATE_STEP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    TF32: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grouped up-projection + activation: out[p, i] = act(x[tok(p)] @ w_up[e]^T + b_up[e]).

    Grid: (B * cdiv(I, BLOCK_N),), one program per (block of padded rows, tile of I columns),
    ordered by :func:`_grouped_pid`. Blocks past the used ones (expert -1) return at once.
    Gated: intermediate column i reads gate feature ``i*GATE_STEP`` and up feature
    ``i*GATE_STEP + up_offset`` (concat: step 1, offset I; interleaved: step 2, offset 1).
    """
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_pid(pid, num_blocks, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] padded rows
    slots = tl.load(padded_slots_ptr + rows)
    row_ok = slots < S
    tokens = (slots // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] intermediate columns
    col_ok = cols < I
    gate_rows = cols * GATE_STEP
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xh  # [BLOCK_M, BLOCK_K]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    g_ptrs = w_base + gate_rows[None, :] * stride_wn + ks[:, None] * stride_wh  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + up_offset * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < H - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_g = _mma(a, g, acc_g, DOT_DTYPE, UPCAST, TF32)
        if GATED:
            if EVEN_K:
                u = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_u = _mma(a, u, acc_u, DOT_DTYPE, UPCAST, TF32)
            u_ptrs += BLOCK_K * stride_wh
        a_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wh

    if HAS_BIAS:
        b_base = bias_ptr + expert.to(tl.int64) * stride_be
        b_gate = tl.load(b_base + gate_rows * stride_bn, mask=col_ok, other=0.0)
        acc_g += b_gate.to(tl.float32)[None, :]
        if GATED:
            b_up = tl.load(b_base + (gate_rows + up_offset) * stride_bn, mask=col_ok, other=0.0)
            acc_u += b_up.to(tl.float32)[None, :]
    h = _activate(acc_g, acc_u, alpha, limit, ACTIVATION, GATED)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_down_kernel(
    a_ptr,  # [P, I] intermediate in padded order, row stride stride_am, unit column stride
    w_ptr,  # [E, H, I] down-projection weights, strides (stride_we, stride_wh, stride_wi)
    bias_ptr,  # [E, H] down-projection bias, strides (stride_be, stride_bh); unused without HAS_BIAS
    rw_ptr,  # [T, TOP_K] routing weights (any float dtype), strides (stride_rt, stride_rk)
    out_ptr,  # OUT_PARTIAL: [SPLIT_K, S, H] fp32 contiguous; OUT_ATOMIC: [T, H] fp32 contiguous;
    #           OUT_DIRECT: [T, H] output dtype, strides (stride_ot, stride_oh)
    padded_slots_ptr,  # [P] int32 slot id of each padded row (S = padding)
    block_expert_ptr,  # [B] int32 expert of each block of BLOCK_M rows (-1 = unused)
    H,
    I,
    S,
    TOP_K,
    num_blocks,
    k_per_split,
    stride_am,
    stride_we,
    stride_wh,
    stride_wi,
    stride_be,
    stride_bh,
    stride_rt,
    stride_rk,
    stride_ot,
    stride_oh,
    OUT_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    TF32: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grouped down-projection: y[s, h] = w[s] * (a[p(s)] @ w_down[e]^T + b_down[e]).

    Grid: (B * cdiv(H, BLOCK_N), SPLIT_K). Program (pid, split) reduces I columns
    ``[split*k_per_split, (split+1)*k_per_split)`` (k_per_split a multiple of BLOCK_K); only
    split 0 adds the bias. The routing weight scales every split (the map is linear).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    pid_m, pid_n = _grouped_pid(pid, num_blocks, tl.cdiv(H, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] padded rows
    slots = tl.load(padded_slots_ptr + rows)
    row_ok = slots < S
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] hidden columns
    col_ok = cols < H
    k_start = split * k_per_split
    ks = k_start + tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wh + ks[:, None] * stride_wi
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(k_per_split, BLOCK_K)):
        k_ok = ks < I - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, w, acc, DOT_DTYPE, UPCAST, TF32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wi

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + cols * stride_bh, mask=col_ok, other=0.0)
        acc += tl.where(split == 0, bias.to(tl.float32), 0.0)[None, :]
    tokens = (slots // TOP_K).to(tl.int64)
    rw = tl.load(rw_ptr + tokens * stride_rt + (slots % TOP_K) * stride_rk, mask=row_ok, other=0.0)
    acc = acc * rw.to(tl.float32)[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    if OUT_MODE == 0:
        offs = (split.to(tl.int64) * S + slots)[:, None] * H + cols[None, :]
        tl.store(out_ptr + offs, acc, mask=mask)
    elif OUT_MODE == 1:
        tl.atomic_add(out_ptr + tokens[:, None] * H + cols[None, :], acc, mask=mask)
    else:
        out_ptrs = out_ptr + tokens[:, None] * stride_ot + cols[None, :] * stride_oh
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _moe_reduce_kernel(
    part_ptr,  # [SPLIT_K, T*TOP_K, H] fp32 per-slot partials, contiguous
    ids_ptr,  # [T, TOP_K] expert ids (int32/int64), strides (stride_it, stride_ik): dropped slots are skipped
    out_ptr,  # [T, H] output, strides (stride_ot, stride_oh)
    T,
    H,
    E,
    TOP_K,
    split_stride,
    stride_it,
    stride_ik,
    stride_ot,
    stride_oh,
    SPLIT_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = sum over splits, then over j < K, of part[split, t*K + j], in that fixed
    order (bitwise reproducible); slots whose id is outside [0, E) were never written and
    are skipped. Grid: (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H))."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = t < T
    mask = t_ok[:, None] & (h < H)[None, :]
    base = t.to(tl.int64)[:, None] * TOP_K * H + h[None, :]  # [BLOCK_T, BLOCK_H]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    ptrs = part_ptr + base
    for _ in tl.static_range(SPLIT_K):
        for j in range(0, TOP_K):
            ids = tl.load(ids_ptr + t.to(tl.int64) * stride_it + j * stride_ik, mask=t_ok, other=-1)
            kept = (ids >= 0) & (ids < E)
            acc += tl.load(ptrs + j * H, mask=mask & kept[:, None], other=0.0)
        ptrs += split_stride
    out_ptrs = out_ptr + t.to(tl.int64)[:, None] * stride_ot + h[None, :] * stride_oh
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# launch helpers
# --------------------------------------------------------------------------------------


def _allow_tf32() -> bool:
    """fp32 GEMMs follow torch's switch (off by default): TF32 only where torch would use it."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _dot_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def moe_up_projection(
    x_TH: torch.Tensor,
    routing: AlignedRouting,
    w_up_ENH: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    top_k: int,
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
    config: dict,
) -> torch.Tensor:
    """Launch the grouped up-projection; returns the intermediate [P, I] in padded order
    (rows of padding are left unwritten). dtype: promotion of x's and w_up's dtypes."""
    E, N, H = w_up_ENH.shape
    gated = glu != "none"
    I = N // 2 if gated else N
    P = routing.padded_slots_P.shape[0]
    dot = _dot_dtype(x_TH.dtype, w_up_ENH.dtype)
    inter_PI = torch.empty(P, I, dtype=dot, device=x_TH.device)
    up = config["up"]
    block_m = config["BLOCK_M"]
    grid = (routing.num_blocks * triton.cdiv(I, up["BLOCK_N"]),)
    bias = b_up_EN if b_up_EN is not None else w_up_ENH
    bias_strides = (b_up_EN.stride(0), b_up_EN.stride(1)) if b_up_EN is not None else (0, 0)
    with _launch_device(x_TH):
        _moe_up_kernel[grid](
            x_TH, w_up_ENH, bias, inter_PI, routing.padded_slots_P, routing.block_expert_B,
            H, I, routing.num_slots, top_k, routing.num_blocks,
            I if glu == "concat" else 1,
            x_TH.stride(0), x_TH.stride(1),
            w_up_ENH.stride(0), w_up_ENH.stride(1), w_up_ENH.stride(2),
            bias_strides[0], bias_strides[1],
            inter_PI.stride(0),
            float(alpha), float(limit),
            ACTIVATION=ACTIVATION_CODES[activation],
            GATED=gated,
            GATE_STEP=2 if glu == "interleaved" else 1,
            HAS_BIAS=b_up_EN is not None,
            DOT_DTYPE=_TL_DTYPES[dot],
            UPCAST=interpreting(),
            TF32=_allow_tf32(),
            EVEN_K=H % up["BLOCK_K"] == 0,
            BLOCK_M=block_m,
            BLOCK_N=up["BLOCK_N"],
            BLOCK_K=up["BLOCK_K"],
            GROUP_M=up["GROUP_M"],
            num_warps=up["num_warps"],
            num_stages=up["num_stages"],
        )  # fmt: skip
    return inter_PI


def moe_down_projection(
    inter_PI: torch.Tensor,
    routing: AlignedRouting,
    w_down_EHI: torch.Tensor,
    b_down_EH: torch.Tensor | None,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    out_dtype: torch.dtype,
    deterministic: bool,
    config: dict,
) -> torch.Tensor:
    """Launch the grouped down-projection and the reduction over K; returns out [T, H]."""
    E, H, I = w_down_EHI.shape
    T, K = topk_weights_TK.shape
    S = routing.num_slots
    dev = inter_PI.device
    down = config["down"]
    split = max(1, min(int(down.get("SPLIT_K", 1)), triton.cdiv(I, down["BLOCK_K"])))
    k_per_split = triton.cdiv(triton.cdiv(I, split), down["BLOCK_K"]) * down["BLOCK_K"]
    split = triton.cdiv(I, k_per_split)
    if not deterministic:
        mode = OUT_ATOMIC
        target = torch.zeros(T, H, dtype=torch.float32, device=dev)
    elif K == 1 and split == 1:
        mode = OUT_DIRECT
        target = torch.zeros(T, H, dtype=out_dtype, device=dev)  # zeros: a dropped token's output
    else:
        mode = OUT_PARTIAL
        target = torch.empty(split, S, H, dtype=torch.float32, device=dev)
    dot = _dot_dtype(inter_PI.dtype, w_down_EHI.dtype)
    bias = b_down_EH if b_down_EH is not None else w_down_EHI
    bias_strides = (b_down_EH.stride(0), b_down_EH.stride(1)) if b_down_EH is not None else (0, 0)
    out_strides = (target.stride(0), target.stride(1)) if mode == OUT_DIRECT else (0, 0)
    grid = (routing.num_blocks * triton.cdiv(H, down["BLOCK_N"]), split)
    with _launch_device(inter_PI):
        _moe_down_kernel[grid](
            inter_PI, w_down_EHI, bias, topk_weights_TK, target, routing.padded_slots_P, routing.block_expert_B,
            H, I, S, K, routing.num_blocks, k_per_split,
            inter_PI.stride(0),
            w_down_EHI.stride(0), w_down_EHI.stride(1), w_down_EHI.stride(2),
            bias_strides[0], bias_strides[1],
            topk_weights_TK.stride(0), topk_weights_TK.stride(1),
            out_strides[0], out_strides[1],
            OUT_MODE=mode,
            HAS_BIAS=b_down_EH is not None,
            DOT_DTYPE=_TL_DTYPES[dot],
            UPCAST=interpreting(),
            TF32=_allow_tf32(),
            SPLIT_K=split,
            BLOCK_M=config["BLOCK_M"],
            BLOCK_N=down["BLOCK_N"],
            BLOCK_K=down["BLOCK_K"],
            GROUP_M=down["GROUP_M"],
            num_warps=down["num_warps"],
            num_stages=down["num_stages"],
        )  # fmt: skip
        if mode == OUT_DIRECT:
            return target
        if mode == OUT_ATOMIC:
            return target.to(out_dtype)
        out_TH = torch.empty(T, H, dtype=out_dtype, device=dev)
        block_h = min(256, max(16, triton.next_power_of_2(H)))
        block_t = max(1, min(64, 4096 // block_h))
        _moe_reduce_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
            target, topk_ids_TK, out_TH, T, H, E, K, S * H,
            topk_ids_TK.stride(0), topk_ids_TK.stride(1), out_TH.stride(0), out_TH.stride(1),
            SPLIT_K=split, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
        )  # fmt: skip
    return out_TH


def _check_inputs(x_TH, topk_weights_TK, topk_ids_TK, w_up_ENH, w_down_EHI, b_up_EN, b_down_EH, glu):
    """Shape / dtype / device checks from metadata only (no device access)."""
    if x_TH.dim() != 2:
        raise UnsupportedInputError(f"x_TH must be 2-D [T, H], got shape {tuple(x_TH.shape)}")
    if w_up_ENH.dim() != 3 or w_down_EHI.dim() != 3:
        raise UnsupportedInputError(
            f"w_up_ENH and w_down_EHI must be 3-D, got shapes {tuple(w_up_ENH.shape)} and {tuple(w_down_EHI.shape)}"
        )
    T, H = x_TH.shape
    E, N, H_up = w_up_ENH.shape
    E_down, H_down, I = w_down_EHI.shape
    if H_up != H or H_down != H or E_down != E:
        raise UnsupportedInputError(
            f"shapes disagree: x_TH {tuple(x_TH.shape)}, w_up_ENH {tuple(w_up_ENH.shape)} [E, N, H], "
            f"w_down_EHI {tuple(w_down_EHI.shape)} [E, H, I]"
        )
    expected_n = 2 * I if glu != "none" else I
    if N != expected_n:
        raise UnsupportedInputError(f"w_up_ENH has N={N} features; glu={glu!r} with I={I} needs N={expected_n}")
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != T or tuple(topk_weights_TK.shape) != tuple(topk_ids_TK.shape):
        raise UnsupportedInputError(
            f"topk_ids_TK {tuple(topk_ids_TK.shape)} and topk_weights_TK {tuple(topk_weights_TK.shape)} "
            f"must both be [T={T}, K]"
        )
    if topk_ids_TK.dtype not in (torch.int32, torch.int64):
        raise UnsupportedInputError(f"topk_ids_TK.dtype={topk_ids_TK.dtype}; allowed: torch.int32, torch.int64")
    for name, t in (
        ("x_TH", x_TH),
        ("w_up_ENH", w_up_ENH),
        ("w_down_EHI", w_down_EHI),
        ("topk_weights_TK", topk_weights_TK),
    ):
        if t.dtype not in _FLOAT_DTYPES:
            raise UnsupportedInputError(f"{name}.dtype={t.dtype}; allowed: float32, bfloat16, float16")
    for name, t, shape in (("b_up_EN", b_up_EN, (E, N)), ("b_down_EH", b_down_EH, (E, H))):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise UnsupportedInputError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype not in _FLOAT_DTYPES:
            raise UnsupportedInputError(f"{name}.dtype={t.dtype}; allowed: float32, bfloat16, float16")
    tensors = [x_TH, topk_weights_TK, topk_ids_TK, w_up_ENH, w_down_EHI] + [
        b for b in (b_up_EN, b_down_EH) if b is not None
    ]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise UnsupportedInputError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")


def fused_experts_triton(
    x_TH: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    w_up_ENH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    b_up_EN: torch.Tensor | None = None,
    b_down_EH: torch.Tensor | None = None,
    activation: str = "silu",
    glu: str = "concat",
    alpha: float = 1.702,
    limit: float = math.inf,
    deterministic: bool = True,
    config: dict | None = None,
) -> torch.Tensor:
    """Routed experts with fused Triton kernels: out[t] = sum_j w[t, j] * expert_{id[t, j]}(x[t]).

    Same contract as :func:`kernel_moe.reference.moe.naive_moe_experts`: x [T, H], routing
    weights / ids [T, K], w_up [E, N, H], w_down [E, H, I] with any strides, an id outside
    [0, E) marking a dropped slot that contributes nothing (capacity, expert parallelism),
    optional biases [E, N] / [E, H]. Returns [T, H] in x's dtype. ``deterministic=True``
    reduces per-slot fp32 results in a fixed order; False accumulates with fp32 atomics.
    ``config``: a kernel config dict (see block_config); default from tuned tables or the
    heuristic. Launches nothing when T == 0 and never synchronises with the device.
    """
    check_activation(activation, glu)
    _check_inputs(x_TH, topk_weights_TK, topk_ids_TK, w_up_ENH, w_down_EHI, b_up_EN, b_down_EH, glu)
    T, H = x_TH.shape
    E, N, _ = w_up_ENH.shape
    K = topk_ids_TK.shape[1]
    if T == 0 or K == 0:
        return torch.zeros(T, H, dtype=x_TH.dtype, device=x_TH.device)
    if config is None:
        config = get_kernel_config(E, N, H, x_TH.dtype, device_name_of(x_TH), T, top_k=K, gated=glu != "none")
    else:
        validate_kernel_config(config)
    routing = align_by_expert(topk_ids_TK, E, config["BLOCK_M"])
    inter_PI = moe_up_projection(x_TH, routing, w_up_ENH, b_up_EN, K, activation, glu, alpha, limit, config)
    return moe_down_projection(
        inter_PI, routing, w_down_EHI, b_down_EH, topk_weights_TK, topk_ids_TK, x_TH.dtype, deterministic, config
    )
