"""Backward Triton kernels of the routed experts (the gradients of
:func:`~kernel_moe.kernels.fused_moe.fused_experts_triton`).

Legend: T tokens, H hidden, E experts, K experts per token (top-k), I expert intermediate
size, N up-projection features (2*I when gated, else I), S = T*K slots (slot s = t*K + j),
B blocks of BLOCK_M rows of the expert-aligned layout, P = B*BLOCK_M padded rows, g the
gradient of the output [T, H], w_s the routing weight of slot s.

Nothing of the forward is saved: the up-projection is recomputed. Data flow, on the padded
sorted layout of :func:`~kernel_moe.kernels.routing.align_by_expert`:

1. ``_moe_bwd_act_kernel`` (rows of one expert x a tile of I columns), one loop over H with
   three accumulators: the up-projection h = x[tok] @ w_up[e]^T (gate and up features) and
   gw = g[tok] @ w_down[e]. Its epilogue adds the bias, forms a = act(h), the partial
   routing-weight gradient <gw, a> (+ <g, b_down[e]>) per I tile, da = w_s * gw and the
   activation backward dh; it stores a [P, I] and dh [P, N]. h never leaves registers.
2. ``_moe_bwd_dw_kernel`` twice (per expert, a tile of the weight, a loop over that expert's
   rows): grad_w_down[e] = sum_s (w_s g[tok(s)])^T a_s with grad_b_down[e] = sum_s w_s g[tok(s)],
   and grad_w_up[e] = sum_s dh_s^T x[tok(s)] with grad_b_up[e] = sum_s dh_s; tokens are
   gathered in the load, every element of every expert's gradient is written (zeros for an
   expert without tokens).
3. grad_x = sum over a token's slots of dh_s @ w_up[e]: the forward's down-projection kernel
   with w_up read transposed and unit weights, per-slot fp32 partials reduced over K in a
   fixed order (:func:`~kernel_moe.kernels.fused_moe.moe_down_projection`).
4. grad_topk_weights[s] = sum of the per-tile partials of step 1 (fixed order).

Everything is deterministic (no atomics) and sized from shapes (no host synchronisation).
"""

from __future__ import annotations

import copy
import math

import torch
import triton
import triton.language as tl

from kernel_moe.errors import UnsupportedInputError
from kernel_moe.kernels.block_config import (
    INTERPRETER_DEVICE,
    dtype_name,
    get_kernel_config,
    validate_kernel_config,
)
from kernel_moe.kernels.fused_moe import (
    _TL_DTYPES,
    ACTIVATION_CODES,
    _activate,
    _allow_tf32,
    _check_inputs,
    _dot_dtype,
    _grouped_pid,
    _mma,
    _pointwise,
    _sigmoid,
    device_name_of,
    interpreting,
    moe_down_projection,
)
from kernel_moe.kernels.routing import _launch_device, align_by_expert
from kernel_moe.reference.activations import check_activation

_DW_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
_ACT_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
_SMEM_BUDGET = 160 * 1024  # bytes of pipelined operand tiles per program (H100: 227 KiB per block)


# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _pointwise_grad(x, ACTIVATION: tl.constexpr):
    """d act(x) / dx of an fp32 tile for silu / gelu (erf) / gelu_tanh / relu."""
    if ACTIVATION == 0:
        s = _sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    elif ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        return cdf + x * pdf
    elif ACTIVATION == 2:
        c = 0.7978845608028654
        t = 2.0 * _sigmoid(2.0 * c * (x + 0.044715 * x * x * x)) - 1.0  # tanh
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
    else:
        return (x > 0.0).to(tl.float32)


@triton.jit
def _activation_grads(gate, up, da, alpha, limit, ACTIVATION: tl.constexpr, GATED: tl.constexpr):
    """(d gate, d up) of fp32 tiles given d act = ``da`` (d up unused when not gated), as in
    kernel_moe/reference/activations.py::activation_backward: clamp gradients are 1 inside the
    closed interval, and masks multiply (NaN propagates as in the reference)."""
    if not GATED:
        return da * _pointwise_grad(gate, ACTIVATION), da
    elif ACTIVATION == 4:
        gate_c = tl.where(gate > limit, limit, gate)
        up_c = tl.where(up > limit, limit, tl.where(up < -limit, -limit, up))
        s = _sigmoid(gate_c * alpha)
        d_glu = s + gate_c * alpha * s * (1.0 - s)
        d_gate = da * (up_c + 1.0) * d_glu * (gate <= limit).to(tl.float32)
        d_up = da * (gate_c * s) * ((up >= -limit) & (up <= limit)).to(tl.float32)
        return d_gate, d_up
    else:
        return da * up * _pointwise_grad(gate, ACTIVATION), da * _pointwise(gate, ACTIVATION)


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _moe_bwd_act_kernel(
    x_ptr,  # [T, H] tokens, strides (stride_xt, stride_xh)
    g_ptr,  # [T, H] gradient of the output, strides (stride_gt, stride_gh)
    w_up_ptr,  # [E, N, H] up weights, strides (stride_ue, stride_un, stride_uh)
    b_up_ptr,  # [E, N] up bias, strides (stride_ube, stride_ubn); unused without HAS_BIAS_UP
    w_down_ptr,  # [E, H, I] down weights, strides (stride_de, stride_dh, stride_di)
    b_down_ptr,  # [E, H] down bias, strides (stride_dbe, stride_dbh); unused without HAS_BIAS_DOWN
    rw_ptr,  # [T, TOP_K] routing weights, strides (stride_rt, stride_rk)
    a_ptr,  # [P, I] out: activation in padded order, row stride stride_am, unit column stride
    dh_ptr,  # [P, N] out: gradient of the up-projection output, row stride stride_dm, unit column stride
    dot_ptr,  # [cdiv(I, BLOCK_N), S] fp32 out: partial <g[tok(s)], y_s> per I tile
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
    stride_gt,
    stride_gh,
    stride_ue,
    stride_un,
    stride_uh,
    stride_ube,
    stride_ubn,
    stride_de,
    stride_dh,
    stride_di,
    stride_dbe,
    stride_dbh,
    stride_rt,
    stride_rk,
    stride_am,
    stride_dm,
    alpha,
    limit,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    GATE_STEP: tl.constexpr,
    HAS_BIAS_UP: tl.constexpr,
    HAS_BIAS_DOWN: tl.constexpr,
    UP_DTYPE: tl.constexpr,
    DOWN_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    TF32: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Recomputed up-projection, gradient through the down-projection and the activation.

    Grid: (B * cdiv(I, BLOCK_N),), one program per (block of padded rows, tile of I columns)
    ordered by ``_grouped_pid``; blocks past the used ones (expert -1) return at once.
    Per row p (slot s, token t, expert e) and intermediate column i:
    h = x[t] @ w_up[e]^T + b_up[e] (gate feature ``i*GATE_STEP``, up feature ``+ up_offset``),
    a = act(h), gw = g[t] @ w_down[e][:, i], da = w_s * gw, dh = d act / dh * da;
    dot[tile, s] = sum_i gw * a (+ <g[t], b_down[e]> in tile 0), so that the tiles sum to
    <g[t], a_s @ w_down[e]^T + b_down[e]>.
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
    e64 = expert.to(tl.int64)

    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xh  # [BLOCK_M, BLOCK_K]
    g_ptrs = g_ptr + tokens[:, None] * stride_gt + ks[None, :] * stride_gh  # [BLOCK_M, BLOCK_K]
    w_up_base = w_up_ptr + e64 * stride_ue
    wg_ptrs = w_up_base + gate_rows[None, :] * stride_un + ks[:, None] * stride_uh  # [BLOCK_K, BLOCK_N]
    wu_ptrs = wg_ptrs + up_offset * stride_un
    wd_ptrs = w_down_ptr + e64 * stride_de + ks[:, None] * stride_dh + cols[None, :] * stride_di  # [BLOCK_K, BLOCK_N]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            a_mask = row_ok[:, None]
            w_mask = col_ok[None, :]
        else:
            k_ok = ks < H - k0 * BLOCK_K
            a_mask = row_ok[:, None] & k_ok[None, :]
            w_mask = k_ok[:, None] & col_ok[None, :]
        xt = tl.load(x_ptrs, mask=a_mask, other=0.0)
        gt = tl.load(g_ptrs, mask=a_mask, other=0.0)
        acc_g = _mma(xt, tl.load(wg_ptrs, mask=w_mask, other=0.0), acc_g, UP_DTYPE, UPCAST, TF32)
        if GATED:
            acc_u = _mma(xt, tl.load(wu_ptrs, mask=w_mask, other=0.0), acc_u, UP_DTYPE, UPCAST, TF32)
            wu_ptrs += BLOCK_K * stride_uh
        acc_d = _mma(gt, tl.load(wd_ptrs, mask=w_mask, other=0.0), acc_d, DOWN_DTYPE, UPCAST, TF32)
        x_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_gh
        wg_ptrs += BLOCK_K * stride_uh
        wd_ptrs += BLOCK_K * stride_dh

    if HAS_BIAS_UP:
        b_base = b_up_ptr + e64 * stride_ube
        acc_g += tl.load(b_base + gate_rows * stride_ubn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_base + (gate_rows + up_offset) * stride_ubn, mask=col_ok, other=0.0).to(tl.float32)[
                None, :
            ]
    act = _activate(acc_g, acc_u, alpha, limit, ACTIVATION, GATED)  # [BLOCK_M, BLOCK_N]
    dot = tl.sum(tl.where(col_ok[None, :], acc_d * act, 0.0), axis=1)  # [BLOCK_M]
    if HAS_BIAS_DOWN:
        if pid_n == 0:
            hs = tl.arange(0, BLOCK_K)
            for h0 in range(0, tl.cdiv(H, BLOCK_K)):
                h_ok = hs < H - h0 * BLOCK_K
                gt = tl.load(
                    g_ptr + tokens[:, None] * stride_gt + (h0 * BLOCK_K + hs)[None, :] * stride_gh,
                    mask=row_ok[:, None] & h_ok[None, :],
                    other=0.0,
                )
                bias = tl.load(b_down_ptr + e64 * stride_dbe + (h0 * BLOCK_K + hs) * stride_dbh, mask=h_ok, other=0.0)
                dot += tl.sum(gt.to(tl.float32) * bias.to(tl.float32)[None, :], axis=1)
    tl.store(dot_ptr + pid_n.to(tl.int64) * S + slots, dot, mask=row_ok)

    rw = tl.load(rw_ptr + tokens * stride_rt + (slots % TOP_K) * stride_rk, mask=row_ok, other=0.0)
    da = acc_d * rw.to(tl.float32)[:, None]
    d_gate, d_up = _activation_grads(acc_g, acc_u, da, alpha, limit, ACTIVATION, GATED)
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(a_ptr + rows[:, None] * stride_am + cols[None, :], act.to(a_ptr.dtype.element_ty), mask=mask)
    dh_ptrs = dh_ptr + rows[:, None] * stride_dm + gate_rows[None, :]
    tl.store(dh_ptrs, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
    if GATED:
        tl.store(dh_ptrs + up_offset, d_up.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _moe_bwd_dw_kernel(
    l_ptr,  # L_GATHER: [T, R] token rows, strides (stride_lm, stride_lr); else [P, R] padded rows
    r_ptr,  # R_GATHER: [T, C] token rows, strides (stride_rm, stride_rc); else [P, C] padded rows
    rw_ptr,  # [T, TOP_K] routing weights scaling the rows of L, strides (stride_wt, stride_wk); L_GATHER only
    out_ptr,  # [E, R, C] weight gradient, strides (stride_oe, stride_or, stride_oc)
    bias_ptr,  # [E, R] bias gradient, strides (stride_be, stride_br); unused without HAS_BIAS
    padded_slots_ptr,  # [P] int32 slot id of each padded row (S = padding)
    padded_offsets_ptr,  # [E+1] int32 first padded row of each expert
    R,
    C,
    S,
    TOP_K,
    stride_lm,
    stride_lr,
    stride_rm,
    stride_rc,
    stride_wt,
    stride_wk,
    stride_oe,
    stride_or,
    stride_oc,
    stride_be,
    stride_br,
    L_GATHER: tl.constexpr,
    R_GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Per-expert weight gradient: out[e] = sum over e's rows p of L'[p]^T R'[p] (and
    bias[e] = sum_p L'[p]), where L'[p] = w_s * L[tok(p)] (L_GATHER) or L[p], and R'[p] =
    R[tok(p)] (R_GATHER) or R[p]; padding rows count zero. fp32 accumulation.

    Grid: (cdiv(R, BLOCK_M) * cdiv(C, BLOCK_N), E); tiles ordered by ``_grouped_pid``.
    Each program loops over its expert's padded rows BLOCK_K at a time; only the programs
    of the first C tile write the bias gradient. Every element is written.
    """
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    pid_r, pid_c = _grouped_pid(pid, tl.cdiv(R, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP_M)
    rr = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of the gradient
    cc = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] columns of the gradient
    r_ok = rr < R
    c_ok = cc < C
    start = tl.load(padded_offsets_ptr + expert)
    end = tl.load(padded_offsets_ptr + expert + 1)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        rows = p0 + ks  # [BLOCK_K] padded rows
        in_run = rows < end
        slots = tl.load(padded_slots_ptr + rows, mask=in_run, other=S)
        ok = slots < S
        tokens = (slots // TOP_K).to(tl.int64)
        if L_GATHER:
            l_rows = tokens
        else:
            l_rows = rows.to(tl.int64)
        if R_GATHER:
            r_rows = tokens
        else:
            r_rows = rows.to(tl.int64)
        lt = tl.load(
            l_ptr + l_rows[None, :] * stride_lm + rr[:, None] * stride_lr, mask=r_ok[:, None] & ok[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_K]: L'^T
        if L_GATHER:
            rw = tl.load(rw_ptr + tokens * stride_wt + (slots % TOP_K) * stride_wk, mask=ok, other=0.0)
            lt = lt.to(tl.float32) * rw.to(tl.float32)[None, :]
        rt = tl.load(
            r_ptr + r_rows[:, None] * stride_rm + cc[None, :] * stride_rc, mask=ok[:, None] & c_ok[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_N]
        if HAS_BIAS:
            bias_acc += tl.sum(lt.to(tl.float32), axis=1)
        acc = _mma(lt, rt, acc, DOT_DTYPE, UPCAST, TF32)

    e64 = expert.to(tl.int64)
    out_ptrs = out_ptr + e64 * stride_oe + rr[:, None] * stride_or + cc[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])
    if HAS_BIAS:
        if pid_c == 0:
            b_ptrs = bias_ptr + e64 * stride_be + rr * stride_br
            tl.store(b_ptrs, bias_acc.to(bias_ptr.dtype.element_ty), mask=r_ok)


# --------------------------------------------------------------------------------------
# configs and launch helpers
# --------------------------------------------------------------------------------------


def default_backward_config(
    E: int,
    N: int,
    H: int,
    dtype: torch.dtype | str,
    device_name: str,
    T: int,
    *,
    top_k: int = 2,
    gated: bool = True,
) -> dict:
    """Block sizes of the backward kernels: the forward config (``BLOCK_M`` of the layout,
    ``down`` for grad_x) plus ``act`` (tiles of ``_moe_bwd_act_kernel``: BLOCK_N columns of
    I, BLOCK_K of H) and ``dw`` (tiles of the weight gradients: BLOCK_M x BLOCK_N of the
    weight, BLOCK_K rows of slots per step). Small blocks under the interpreter."""
    config = get_kernel_config(E, N, H, dtype, device_name, T, top_k=top_k, gated=gated)
    act = {k: config["up"][k] for k in _ACT_KEYS}
    if device_name == INTERPRETER_DEVICE:
        dw = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    else:
        if gated:  # three accumulators per program
            act["BLOCK_N"] = max(16, min(act["BLOCK_N"], 64))
        fp32 = dtype_name(dtype) == "float32"
        dw = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32 if fp32 else 64, "GROUP_M": 8, "num_warps": 8,
              "num_stages": 3}  # fmt: skip
    config["act"] = act
    config["dw"] = dw
    return config


def validate_backward_config(config) -> dict:
    """Check a backward config (a forward config with ``act`` and ``dw``); ValueError naming
    the field, the value and what is allowed."""
    validate_kernel_config(config)
    for gemm, keys in (("act", _ACT_KEYS), ("dw", _DW_KEYS)):
        sub = config.get(gemm)
        if not isinstance(sub, dict):
            raise ValueError(f"backward kernel config field {gemm!r}={sub!r}; allowed: a dict with {', '.join(keys)}")
        for key in keys:
            value = sub.get(key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"backward kernel config field {gemm}.{key}={value!r}; allowed: an int >= 1")
            if key.startswith("BLOCK") and (value < 16 or value & (value - 1)):
                raise ValueError(f"backward kernel config field {gemm}.{key}={value!r}; allowed: a power of two >= 16")
        if sub["num_warps"] & (sub["num_warps"] - 1):
            raise ValueError(
                f"backward kernel config field {gemm}.num_warps={sub['num_warps']!r}; allowed: a power of two"
            )
    return config


def _fit_stages(num_stages: int, stage_bytes: int) -> int:
    """Pipeline depth whose operand buffers fit the shared-memory budget (at least 1): the
    act kernel streams five tiles per step, so configs made for the forward can overflow."""
    return max(1, min(num_stages, _SMEM_BUDGET // max(1, stage_bytes)))


def _launch_dw(l_t, r_t, rw_TK, out_ERC, bias_ER, routing, top_k, l_gather, r_gather, dw):
    """grad of one weight (see ``_moe_bwd_dw_kernel``): out [E, R, C], bias [E, R] or None."""
    E, R, C = out_ERC.shape
    dot = _dot_dtype(l_t.dtype, r_t.dtype)
    itemsize = max(l_t.element_size(), r_t.element_size())
    bias = bias_ER if bias_ER is not None else out_ERC
    bias_strides = (bias_ER.stride(0), bias_ER.stride(1)) if bias_ER is not None else (0, 0)
    rw_strides = (rw_TK.stride(0), rw_TK.stride(1)) if rw_TK is not None else (0, 0)
    grid = (triton.cdiv(R, dw["BLOCK_M"]) * triton.cdiv(C, dw["BLOCK_N"]), E)
    _moe_bwd_dw_kernel[grid](
        l_t, r_t, rw_TK if rw_TK is not None else l_t, out_ERC, bias, routing.padded_slots_P, routing.padded_offsets_E1,
        R, C, routing.num_slots, top_k,
        l_t.stride(0), l_t.stride(1), r_t.stride(0), r_t.stride(1), rw_strides[0], rw_strides[1],
        out_ERC.stride(0), out_ERC.stride(1), out_ERC.stride(2), bias_strides[0], bias_strides[1],
        L_GATHER=l_gather,
        R_GATHER=r_gather,
        HAS_BIAS=bias_ER is not None,
        DOT_DTYPE=_TL_DTYPES[dot],
        UPCAST=interpreting(),
        TF32=_allow_tf32(),
        BLOCK_M=dw["BLOCK_M"],
        BLOCK_N=dw["BLOCK_N"],
        BLOCK_K=dw["BLOCK_K"],
        GROUP_M=dw["GROUP_M"],
        num_warps=dw["num_warps"],
        num_stages=_fit_stages(dw["num_stages"], (dw["BLOCK_M"] + dw["BLOCK_N"]) * dw["BLOCK_K"] * itemsize),
    )  # fmt: skip


def fused_experts_backward_triton(
    grad_out_TH: torch.Tensor,
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
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`~kernel_moe.kernels.fused_moe.fused_experts_triton` with Triton
    kernels, recomputing the up-projection.

    Same contract as :func:`kernel_moe.ops.torch_impl.experts_backward`: given grad_out
    [T, H] (d loss / d out), returns (grad_x [T, H] in x's dtype, grad_topk_weights [T, K]
    in the weights' dtype, grad_w_up [E, N, H], grad_w_down [E, H, I] in the weights'
    dtypes, grad_b_up [E, N] or an empty [0], grad_b_down [E, H] or an empty [0]). An id
    outside [0, E) marks a dropped slot: it gets a zero weight gradient and contributes
    nothing. Weights may have any strides; gradients come out contiguous. Deterministic,
    fp32 accumulation, no host synchronisation; launches nothing when T == 0.
    ``config``: see :func:`default_backward_config` (default: derived from the forward's).
    """
    check_activation(activation, glu)
    _check_inputs(x_TH, topk_weights_TK, topk_ids_TK, w_up_ENH, w_down_EHI, b_up_EN, b_down_EH, glu)
    if tuple(grad_out_TH.shape) != tuple(x_TH.shape) or grad_out_TH.device != x_TH.device:
        raise UnsupportedInputError(
            f"grad_out_TH has shape {tuple(grad_out_TH.shape)} on {grad_out_TH.device}; "
            f"expected {tuple(x_TH.shape)} on {x_TH.device}"
        )
    if grad_out_TH.dtype not in _TL_DTYPES:
        raise UnsupportedInputError(f"grad_out_TH.dtype={grad_out_TH.dtype}; allowed: float32, bfloat16, float16")
    T, H = x_TH.shape
    E, N, _ = w_up_ENH.shape
    K = topk_ids_TK.shape[1]
    I = w_down_EHI.shape[2]
    dev = x_TH.device
    grad_w_up = torch.empty(w_up_ENH.shape, dtype=w_up_ENH.dtype, device=dev)
    grad_w_down = torch.empty(w_down_EHI.shape, dtype=w_down_EHI.dtype, device=dev)
    grad_b_up = torch.empty_like(b_up_EN, memory_format=torch.contiguous_format) if b_up_EN is not None else None
    grad_b_down = torch.empty_like(b_down_EH, memory_format=torch.contiguous_format) if b_down_EH is not None else None
    if T == 0 or K == 0:
        for t in (grad_w_up, grad_w_down, grad_b_up, grad_b_down):
            if t is not None:
                t.zero_()
        return (
            torch.zeros(T, H, dtype=x_TH.dtype, device=dev),
            torch.zeros(T, K, dtype=topk_weights_TK.dtype, device=dev),
            grad_w_up,
            grad_w_down,
            grad_b_up if grad_b_up is not None else x_TH.new_zeros(0),
            grad_b_down if grad_b_down is not None else x_TH.new_zeros(0),
        )
    gated = glu != "none"
    if config is None:
        config = default_backward_config(E, N, H, x_TH.dtype, device_name_of(x_TH), T, top_k=K, gated=gated)
    else:
        config = validate_backward_config(copy.deepcopy(config))
    routing = align_by_expert(topk_ids_TK, E, config["BLOCK_M"])
    S = routing.num_slots
    act = config["act"]
    block_m = config["BLOCK_M"]
    itemsize = max(t.element_size() for t in (x_TH, grad_out_TH, w_up_ENH, w_down_EHI))
    act_stage_bytes = (2 * block_m + (3 if gated else 2) * act["BLOCK_N"]) * act["BLOCK_K"] * itemsize
    num_tiles = triton.cdiv(I, act["BLOCK_N"])
    inter = _dot_dtype(x_TH.dtype, w_up_ENH.dtype)
    P = routing.padded_slots_P.shape[0]
    a_PI = torch.empty(P, I, dtype=inter, device=dev)
    dh_PN = torch.empty(P, N, dtype=inter, device=dev)
    dot_partial = torch.zeros(num_tiles, S, dtype=torch.float32, device=dev)
    b_up = b_up_EN if b_up_EN is not None else w_up_ENH
    b_up_strides = (b_up_EN.stride(0), b_up_EN.stride(1)) if b_up_EN is not None else (0, 0)
    b_down = b_down_EH if b_down_EH is not None else w_down_EHI
    b_down_strides = (b_down_EH.stride(0), b_down_EH.stride(1)) if b_down_EH is not None else (0, 0)
    with _launch_device(x_TH):
        _moe_bwd_act_kernel[(routing.num_blocks * num_tiles,)](
            x_TH, grad_out_TH, w_up_ENH, b_up, w_down_EHI, b_down, topk_weights_TK, a_PI, dh_PN, dot_partial,
            routing.padded_slots_P, routing.block_expert_B,
            H, I, S, K, routing.num_blocks, I if glu == "concat" else 1,
            x_TH.stride(0), x_TH.stride(1), grad_out_TH.stride(0), grad_out_TH.stride(1),
            w_up_ENH.stride(0), w_up_ENH.stride(1), w_up_ENH.stride(2), b_up_strides[0], b_up_strides[1],
            w_down_EHI.stride(0), w_down_EHI.stride(1), w_down_EHI.stride(2), b_down_strides[0], b_down_strides[1],
            topk_weights_TK.stride(0), topk_weights_TK.stride(1), a_PI.stride(0), dh_PN.stride(0),
            float(alpha), float(limit),
            ACTIVATION=ACTIVATION_CODES[activation],
            GATED=gated,
            GATE_STEP=2 if glu == "interleaved" else 1,
            HAS_BIAS_UP=b_up_EN is not None,
            HAS_BIAS_DOWN=b_down_EH is not None,
            UP_DTYPE=_TL_DTYPES[inter],
            DOWN_DTYPE=_TL_DTYPES[_dot_dtype(grad_out_TH.dtype, w_down_EHI.dtype)],
            UPCAST=interpreting(),
            TF32=_allow_tf32(),
            EVEN_K=H % act["BLOCK_K"] == 0,
            BLOCK_M=block_m,
            BLOCK_N=act["BLOCK_N"],
            BLOCK_K=act["BLOCK_K"],
            GROUP_M=act["GROUP_M"],
            num_warps=act["num_warps"],
            num_stages=_fit_stages(act["num_stages"], act_stage_bytes),
        )  # fmt: skip
        dw = config["dw"]
        _launch_dw(grad_out_TH, a_PI, topk_weights_TK, grad_w_down, grad_b_down, routing, K, True, False, dw)
        _launch_dw(dh_PN, x_TH, None, grad_w_up, grad_b_up, routing, K, False, True, dw)
    unit_TK = torch.ones((), dtype=torch.float32, device=dev).expand(T, K)  # strides (0, 0): weight 1 per slot
    grad_x = moe_down_projection(
        dh_PN, routing, w_up_ENH.transpose(1, 2), None, unit_TK, topk_ids_TK, x_TH.dtype, True, config
    )
    grad_w = dot_partial.sum(dim=0).view(T, K).to(topk_weights_TK.dtype)
    return (
        grad_x,
        grad_w,
        grad_w_up,
        grad_w_down,
        grad_b_up if grad_b_up is not None else x_TH.new_zeros(0),
        grad_b_down if grad_b_down is not None else x_TH.new_zeros(0),
    )
