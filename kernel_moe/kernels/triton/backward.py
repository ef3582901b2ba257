"""Backward Triton kernels of the routed experts (the gradients of
:func:`~kernel_moe.kernels.triton.forward.fused_experts_triton`).

Legend: T tokens, H hidden, E experts, K experts per token (top-k), I expert intermediate
size, N up-projection features (2*I when gated, else I), S = T*K slots (slot s = t*K + j),
B blocks of BLOCK_M rows of the expert-aligned layout, P = B*BLOCK_M padded rows, g the
gradient of the output [T, H], w_s the routing weight of slot s.

Nothing of the forward is saved: the up-projection is recomputed. Data flow, on the padded
sorted layout of :func:`~kernel_moe.kernels.triton.routing.align_by_expert` (dropped slots,
ids outside [0, E), are in no run: they get a zero routing-weight gradient and add nothing
to any other gradient):

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
   fixed order (:func:`~kernel_moe.kernels.triton.forward.moe_down_projection`).
4. grad_topk_weights[s] = sum of the per-tile partials of step 1 (fixed order).

Everything is deterministic (no atomics) and sized from shapes (no host synchronisation).
"""

from __future__ import annotations

import copy

import torch
import triton
import triton.language as tl

from kernel_moe.errors import UnsupportedInputError
from kernel_moe.kernels.annotate import DISPATCH, DOWN, UP, stage
from kernel_moe.kernels.contract import ExpertsGrads, StackedExperts, local_ids, validate_call
from kernel_moe.kernels.triton import common
from kernel_moe.kernels.triton.common import (  # device helpers, called by the kernels
    activate, add_up_bias, block_rows, block_tile, clamp_gate_up, grouped_pid, mma, pointwise, sigmoid,
    slot_weight, softcap, tanh,
)
from kernel_moe.kernels.triton.forward import moe_down_projection
from kernel_moe.kernels.triton.quantized import down_operand, up_operand, weight_tile
from kernel_moe.kernels.triton.routing import AlignedRouting, align_by_expert
from kernel_moe.kernels.triton.tile_configs import default_backward_config, validate_backward_config

_SMEM_BUDGET = 160 * 1024  # bytes of pipelined operand tiles per program (H100: 227 KiB per block)


# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _pointwise_grad(x, ACTIVATION: tl.constexpr):
    """d act(x) / dx of an fp32 tile for silu / gelu (erf) / gelu_tanh / relu / relu2."""
    if ACTIVATION == 0:
        s = sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    elif ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        return cdf + x * pdf
    elif ACTIVATION == 2:
        c = 0.7978845608028654
        t = tanh(c * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACTIVATION == 5:
        return 2.0 * tl.where(x < 0.0, 0.0, x)
    else:
        return (x > 0.0).to(tl.float32)


@triton.jit
def _activation_slopes(gate, up, alpha, gate_cap, up_cap, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
                       SOFTCAPPED: tl.constexpr):
    """(d act / d gate, d act / d up) of fp32 tiles of clamped features (the second unused when
    not gated), the derivatives of :func:`~.common.activate`, as in
    kernel_moe.kernels.activations.activation_backward."""
    if not GATED:
        return _pointwise_grad(gate, ACTIVATION), gate
    elif SOFTCAPPED:
        s = sigmoid(gate)
        capped_gate, gate_slope = softcap(gate, gate_cap)
        capped_up, up_slope = softcap(up, up_cap)
        return capped_up * (gate_slope * s + capped_gate * s * (1.0 - s)), capped_gate * s * up_slope
    elif ACTIVATION == 4:
        s = sigmoid(gate * alpha)
        return (up + 1.0) * (s + gate * alpha * s * (1.0 - s)), gate * s
    else:
        return up * _pointwise_grad(gate, ACTIVATION), pointwise(gate, ACTIVATION)


@triton.jit
def _through_clamp(d_gate, d_up, gate, up, limit, CLAMPED: tl.constexpr):
    """Gradients of the clamped features -> gradients of the raw features ``gate`` / ``up`` of
    :func:`~.common.clamp_gate_up`: clamp gradients are 1 inside the closed interval, else 0,
    and multiply (NaN propagates)."""
    if CLAMPED:
        d_gate = d_gate * (gate <= limit).to(tl.float32)
        d_up = d_up * ((up >= -limit) & (up <= limit)).to(tl.float32)
    return d_gate, d_up


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
    us_ptr,  # quantized formats: w_up's scale, strides (stride_use, stride_usr, stride_usg), groups of up_group
    ds_ptr,  # quantized formats: w_down's scale, strides (stride_dse, stride_dsr, stride_dsg), groups of down_group
    H, I, S, TOP_K, num_blocks, up_offset,
    stride_xt, stride_xh, stride_gt, stride_gh, stride_ue, stride_un, stride_uh, stride_ube, stride_ubn, stride_de,
    stride_dh, stride_di, stride_dbe, stride_dbh, stride_rt, stride_rk, stride_am, stride_dm,
    stride_use, stride_usr, stride_usg, up_group, stride_dse, stride_dsr, stride_dsg, down_group,
    alpha, limit, gate_softcap, up_softcap,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, GATE_STEP: tl.constexpr, CLAMPED: tl.constexpr,
    SOFTCAPPED: tl.constexpr, HAS_BIAS_UP: tl.constexpr, HAS_BIAS_DOWN: tl.constexpr, UP_DTYPE: tl.constexpr,
    DOWN_DTYPE: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr, EVEN_K: tl.constexpr, W_FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Recomputed up-projection, gradient through the down-projection and the activation.

    Grid: (B * cdiv(I, BLOCK_N),), one program per (block of padded rows, tile of I columns)
    ordered by ``grouped_pid``; blocks past the used ones (expert -1) return at once.
    Per row p (slot s, token t, expert e) and intermediate column i:
    h = x[t] @ w_up[e]^T + b_up[e] (gate feature ``i*GATE_STEP``, up feature ``+ up_offset``),
    a = act(clamp(h)), gw = g[t] @ w_down[e][:, i], da = w_s * gw, dh = d a / dh * da (the
    activation's scalars and flags as in the forward's ``_moe_up_kernel``);
    dot[tile, s] = sum_i gw * a (+ <g[t], b_down[e]> in tile 0), so that the tiles sum to
    <g[t], a_s @ w_down[e]^T + b_down[e]>. Quantized weights (W_FORMAT > 0) are dequantized
    in the K-loop as in the forward.
    """
    pid_m, pid_n, expert, cols, col_ok = block_tile(block_expert_ptr, num_blocks, I, BLOCK_N, GROUP_M)  # cols of I
    if expert < 0:
        return
    rows, slots, row_ok, tokens = block_rows(padded_slots_ptr, pid_m, S, TOP_K, BLOCK_M)  # [BLOCK_M] each
    e64 = expert.to(tl.int64)
    gate_rows = cols * GATE_STEP
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xh  # [BLOCK_M, BLOCK_K]
    g_ptrs = g_ptr + tokens[:, None] * stride_gt + ks[None, :] * stride_gh  # [BLOCK_M, BLOCK_K]
    w_up_base = w_up_ptr + e64 * stride_ue
    w_down_base = w_down_ptr + e64 * stride_de
    us_base = us_ptr + e64 * stride_use
    ds_base = ds_ptr + e64 * stride_dse
    wg_ptrs = w_up_base + gate_rows[None, :] * stride_un + ks[:, None] * stride_uh  # [BLOCK_K, BLOCK_N]
    wu_ptrs = wg_ptrs + up_offset * stride_un
    wd_ptrs = w_down_base + ks[:, None] * stride_dh + cols[None, :] * stride_di  # [BLOCK_K, BLOCK_N]
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
        kk = (k0 * BLOCK_K + ks)[:, None]  # [BLOCK_K, 1] hidden features of this step
        xt = tl.load(x_ptrs, mask=a_mask, other=0.0)
        gt = tl.load(g_ptrs, mask=a_mask, other=0.0)
        wg = weight_tile(wg_ptrs, w_up_base, us_base, gate_rows[None, :], kk, w_mask, stride_un, stride_usr, stride_usg,
                         up_group, W_FORMAT)
        acc_g = mma(xt, wg, acc_g, UP_DTYPE, UPCAST, TF32)
        if GATED:
            wu = weight_tile(wu_ptrs, w_up_base, us_base, gate_rows[None, :] + up_offset, kk, w_mask, stride_un,
                             stride_usr, stride_usg, up_group, W_FORMAT)
            acc_u = mma(xt, wu, acc_u, UP_DTYPE, UPCAST, TF32)
            wu_ptrs += BLOCK_K * stride_uh
        wd = weight_tile(wd_ptrs, w_down_base, ds_base, kk, cols[None, :], w_mask, stride_dh, stride_dsr, stride_dsg,
                         down_group, W_FORMAT)
        acc_d = mma(gt, wd, acc_d, DOWN_DTYPE, UPCAST, TF32)
        x_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_gh
        wg_ptrs += BLOCK_K * stride_uh
        wd_ptrs += BLOCK_K * stride_dh

    if HAS_BIAS_UP:
        acc_g, acc_u = add_up_bias(acc_g, acc_u, b_up_ptr, expert, gate_rows, col_ok, up_offset, stride_ube,
                                   stride_ubn, GATED)
    gate, up = clamp_gate_up(acc_g, acc_u, limit, CLAMPED)  # [BLOCK_M, BLOCK_N] each
    act = activate(gate, up, alpha, gate_softcap, up_softcap, ACTIVATION, GATED, SOFTCAPPED)  # [BLOCK_M, BLOCK_N]
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

    da = acc_d * slot_weight(rw_ptr, tokens, slots, row_ok, TOP_K, stride_rt, stride_rk)[:, None]
    d_gate, d_up = _activation_slopes(gate, up, alpha, gate_softcap, up_softcap, ACTIVATION, GATED, SOFTCAPPED)
    d_gate, d_up = _through_clamp(da * d_gate, da * d_up, acc_g, acc_u, limit, CLAMPED)
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
    R, C, S, TOP_K,
    stride_lm, stride_lr, stride_rm, stride_rc, stride_wt, stride_wk, stride_oe, stride_or, stride_oc, stride_be,
    stride_br,
    L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Per-expert weight gradient: out[e] = sum over e's rows p of L'[p]^T R'[p] (and
    bias[e] = sum_p L'[p]), where L'[p] = w_s * L[tok(p)] (L_GATHER) or L[p], and R'[p] =
    R[tok(p)] (R_GATHER) or R[p]; padding rows count zero. fp32 accumulation.

    Grid: (cdiv(R, BLOCK_M) * cdiv(C, BLOCK_N), E); tiles ordered by ``grouped_pid``.
    Each program loops over its expert's padded rows BLOCK_K at a time; only the programs
    of the first C tile write the bias gradient. Every element is written.
    """
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    pid_r, pid_c = grouped_pid(pid, tl.cdiv(R, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP_M)
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
            lt = lt.to(tl.float32) * slot_weight(rw_ptr, tokens, slots, ok, TOP_K, stride_wt, stride_wk)[None, :]
        rt = tl.load(
            r_ptr + r_rows[:, None] * stride_rm + cc[None, :] * stride_rc, mask=ok[:, None] & c_ok[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_N]
        if HAS_BIAS:
            bias_acc += tl.sum(lt.to(tl.float32), axis=1)
        acc = mma(lt, rt, acc, DOT_DTYPE, UPCAST, TF32)

    e64 = expert.to(tl.int64)
    out_ptrs = out_ptr + e64 * stride_oe + rr[:, None] * stride_or + cc[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])
    if HAS_BIAS:
        if pid_c == 0:
            b_ptrs = bias_ptr + e64 * stride_be + rr * stride_br
            tl.store(b_ptrs, bias_acc.to(bias_ptr.dtype.element_ty), mask=r_ok)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _fit_stages(num_stages: int, stage_bytes: int) -> int:
    """Pipeline depth whose operand buffers fit the shared-memory budget (at least 1): the
    act kernel streams five tiles per step, so configs made for the forward can overflow."""
    return max(1, min(num_stages, _SMEM_BUDGET // max(1, stage_bytes)))


def _launch_act(
    x_TH: torch.Tensor,
    grad_TH: torch.Tensor,
    weights_TK: torch.Tensor,
    routing: AlignedRouting,
    experts: StackedExperts,
    config: dict,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 1 (see ``_moe_bwd_act_kernel``): returns the activation a [P, I] and the gradient of
    the up-projection output dh [P, N] in padded order (dtype: promotion of x's and w_up's),
    and the partial routing-weight gradients [cdiv(I, act.BLOCK_N), S] fp32 (zero for dropped
    slots)."""
    w_up, w_down, b_up, b_down, activation = experts[:5]
    up_w, down_w = up_operand(experts), down_operand(experts)
    E, N, H = up_w.shape
    I = down_w.shape[2]
    S = routing.num_slots
    act = config["act"]
    block_m = config["BLOCK_M"]
    dev = x_TH.device
    itemsize = max(t.element_size() for t in (x_TH, grad_TH, w_up, w_down))
    stage_bytes = (2 * block_m + (3 if activation.gated else 2) * act["BLOCK_N"]) * act["BLOCK_K"] * itemsize
    num_tiles = triton.cdiv(I, act["BLOCK_N"])
    inter = common.dot_dtype(x_TH.dtype, up_w.data.dtype)
    P = routing.padded_slots_P.shape[0]
    a_PI = torch.empty(P, I, dtype=inter, device=dev)
    dh_PN = torch.empty(P, N, dtype=inter, device=dev)
    dot_partial = torch.zeros(num_tiles, S, dtype=torch.float32, device=dev)
    b_up_t, stride_ube, stride_ubn = common.operand(b_up, w_up)
    b_down_t, stride_dbe, stride_dbh = common.operand(b_down, w_down)
    _moe_bwd_act_kernel[(routing.num_blocks * num_tiles,)](
        x_TH, grad_TH, up_w.data, b_up_t, down_w.data, b_down_t, weights_TK, a_PI, dh_PN, dot_partial,
        routing.padded_slots_P, routing.block_expert_B, up_w.scale, down_w.scale,
        H, I, S, routing.top_k, routing.num_blocks, common.up_offset(activation, I),
        x_TH.stride(0), x_TH.stride(1), grad_TH.stride(0), grad_TH.stride(1),
        w_up.stride(0), w_up.stride(1), w_up.stride(2), stride_ube, stride_ubn,
        w_down.stride(0), w_down.stride(1), w_down.stride(2), stride_dbe, stride_dbh,
        weights_TK.stride(0), weights_TK.stride(1), a_PI.stride(0), dh_PN.stride(0),
        *up_w.scale_args()[1:], *down_w.scale_args()[1:],
        *common.activation_scalars(activation),
        **common.activation_constexprs(activation),
        HAS_BIAS_UP=b_up is not None,
        HAS_BIAS_DOWN=b_down is not None,
        UP_DTYPE=common.TL_DTYPES[inter],
        DOWN_DTYPE=common.TL_DTYPES[common.dot_dtype(grad_TH.dtype, down_w.data.dtype)],
        EVEN_K=H % act["BLOCK_K"] == 0,
        W_FORMAT=up_w.code,
        BLOCK_M=block_m,
        **common.gemm_launch_args(dict(act, num_stages=_fit_stages(act["num_stages"], stage_bytes))),
    )  # fmt: skip
    return a_PI, dh_PN, dot_partial


def _launch_dw(l_t, r_t, rw_TK, out_ERC, bias_ER, routing, gather_left, dw):
    """grad of one weight (see ``_moe_bwd_dw_kernel``): out [E, R, C], bias [E, R] or None.
    ``gather_left``: L holds token rows (scaled by the routing weights ``rw_TK``) and R padded
    rows; else L holds padded rows and R token rows (``rw_TK`` None)."""
    E, R, C = out_ERC.shape
    dot = common.dot_dtype(l_t.dtype, r_t.dtype)
    itemsize = max(l_t.element_size(), r_t.element_size())
    bias, stride_be, stride_br = common.operand(bias_ER, out_ERC)
    rw, stride_wt, stride_wk = common.operand(rw_TK, l_t)
    grid = (triton.cdiv(R, dw["BLOCK_M"]) * triton.cdiv(C, dw["BLOCK_N"]), E)
    stages = _fit_stages(dw["num_stages"], (dw["BLOCK_M"] + dw["BLOCK_N"]) * dw["BLOCK_K"] * itemsize)
    _moe_bwd_dw_kernel[grid](
        l_t, r_t, rw, out_ERC, bias, routing.padded_slots_P, routing.padded_offsets_E1,
        R, C, routing.num_slots, routing.top_k,
        l_t.stride(0), l_t.stride(1), r_t.stride(0), r_t.stride(1), stride_wt, stride_wk,
        out_ERC.stride(0), out_ERC.stride(1), out_ERC.stride(2), stride_be, stride_br,
        L_GATHER=gather_left,
        R_GATHER=not gather_left,
        HAS_BIAS=bias_ER is not None,
        DOT_DTYPE=common.TL_DTYPES[dot],
        BLOCK_M=dw["BLOCK_M"],
        **common.gemm_launch_args(dict(dw, num_stages=stages)),
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------


def _bias_grads(grad_TH: torch.Tensor, weights_TK: torch.Tensor, dh_PN: torch.Tensor, routing: AlignedRouting,
                grad_b_up: torch.Tensor | None, grad_b_down: torch.Tensor | None) -> None:
    """The biases' gradients when the weights are frozen (no weight-gradient kernel runs):
    grad_b_down[e] = sum over e's slots of w_s g[tok(s)], grad_b_up[e] = sum over e's padded rows
    of dh; dropped slots and padding rows add nothing. Written in place, no host synchronisation."""
    T, K = routing.ids_TK.shape
    ids_S = routing.ids_TK.reshape(-1).long()  # [S]
    if grad_b_down is not None:
        E = grad_b_down.shape[0]
        kept_S = (ids_S >= 0) & (ids_S < E)
        rows_SH = grad_TH.float().repeat_interleave(K, dim=0) * (weights_TK.reshape(-1, 1).float() * kept_S[:, None])
        grad_b_down.copy_(torch.zeros(E, grad_TH.shape[1], dtype=torch.float32, device=grad_TH.device)
                          .index_add_(0, ids_S.clamp(0, E - 1), rows_SH))
    if grad_b_up is not None:
        E = grad_b_up.shape[0]
        expert_P = routing.block_expert_B.long().repeat_interleave(routing.block_m)  # [P]
        real_P = routing.padded_slots_P.long() < routing.num_slots
        rows_PN = torch.where(real_P[:, None], dh_PN.float(), 0.0)  # padding rows were never written
        grad_b_up.copy_(torch.zeros(E, dh_PN.shape[1], dtype=torch.float32, device=dh_PN.device)
                        .index_add_(0, expert_P.clamp(0, E - 1), rows_PN))


def _zero_grads(x_TH, weights_TK, grads_w, dense) -> ExpertsGrads:
    """The gradients of a call without slots (T == 0 or K == 0): zeros, nothing launched."""
    for t in grads_w:
        if t is not None:
            t.zero_()
    grad_w = None if dense else torch.zeros(weights_TK.shape, dtype=weights_TK.dtype, device=x_TH.device)
    return ExpertsGrads(torch.zeros_like(x_TH, memory_format=torch.contiguous_format), grad_w, *grads_w)


def experts_backward(grad_TH: torch.Tensor, x_TH: torch.Tensor, weights_TK: torch.Tensor | None,
                     ids_TK: torch.Tensor | None, experts: StackedExperts, config: dict | None = None,
                     weight_grads: tuple[bool, bool] = (True, True)) -> ExpertsGrads:
    """The Triton backend's backward on inputs the contract's validator has passed and on
    local ids (``experts.expert_map`` is not applied here); checks grad_out and what the
    kernels support. See :func:`fused_experts_backward_triton` for the semantics. ``weight_grads``
    (w_up, w_down): where neither is asked for, no weight gradient is allocated or computed; where
    one is, both are computed (one kernel pass writes a weight's and its bias's) and the other dropped."""
    common.check_supported(experts, x=x_TH, topk_weights=weights_TK, grad_out=grad_TH)
    if tuple(grad_TH.shape) != tuple(x_TH.shape) or grad_TH.device != x_TH.device:
        raise UnsupportedInputError(f"grad_out has shape {tuple(grad_TH.shape)} on {grad_TH.device}; expected "
                                    f"{tuple(x_TH.shape)} on {x_TH.device}")
    dense = ids_TK is None
    if dense:
        weights_TK, ids_TK = common.dense_routing(x_TH)
    w_up, w_down, b_up, b_down, activation = experts[:5]
    T, H = x_TH.shape
    E, N = w_up.shape[:2]
    K = ids_TK.shape[1]
    dev = x_TH.device
    frozen = experts.quantized or not any(weight_grads)  # quantized weights take no gradient
    grad_w_up = None if frozen else torch.empty(w_up.shape, dtype=w_up.dtype, device=dev)
    grad_w_down = None if frozen else torch.empty(w_down.shape, dtype=w_down.dtype, device=dev)
    grad_b_up = torch.empty_like(b_up, memory_format=torch.contiguous_format) if b_up is not None else None
    grad_b_down = torch.empty_like(b_down, memory_format=torch.contiguous_format) if b_down is not None else None
    if T == 0 or K == 0:
        return _zero_grads(x_TH, weights_TK, (grad_w_up, grad_w_down, grad_b_up, grad_b_down), dense)
    if config is None:
        config = default_backward_config(E, N, H, x_TH.dtype, common.device_name_of(x_TH), T, top_k=K,
                                         gated=activation.gated)
    else:
        config = validate_backward_config(copy.deepcopy(config))
    with stage(DISPATCH):
        routing = align_by_expert(ids_TK, E, config["BLOCK_M"])
    with common.launch_device(x_TH):
        with stage(UP):  # the up-projection recomputed, the activation's and routing weights' gradients
            a_PI, dh_PN, dot_partial = _launch_act(x_TH, grad_TH, weights_TK, routing, experts, config)
        if frozen:
            _bias_grads(grad_TH, weights_TK, dh_PN, routing, grad_b_up, grad_b_down)
        else:
            with stage(DOWN):
                _launch_dw(grad_TH, a_PI, weights_TK, grad_w_down, grad_b_down, routing, True, config["dw"])
            with stage(UP):
                _launch_dw(dh_PN, x_TH, None, grad_w_up, grad_b_up, routing, False, config["dw"])
    with stage(UP):  # grad x: a grouped GEMM through w_up (the forward's down-projection kernel)
        grad_x = moe_down_projection(
            dh_PN, routing, up_operand(experts).t(), None, common.unit_weights(T, K, dev), x_TH.dtype, True, config
        )
    grad_w = None if dense else dot_partial.sum(dim=0).view(T, K).to(weights_TK.dtype)
    grad_w_up, grad_w_down = (g if wanted else None for g, wanted in zip((grad_w_up, grad_w_down), weight_grads))
    return ExpertsGrads(grad_x, grad_w, grad_w_up, grad_w_down, grad_b_up, grad_b_down)


def fused_experts_backward_triton(
    grad_TH: torch.Tensor,
    x_TH: torch.Tensor,
    weights_TK: torch.Tensor | None,
    ids_TK: torch.Tensor | None,
    experts: StackedExperts,
    config: dict | None = None,
) -> ExpertsGrads:
    """Gradients of :func:`~kernel_moe.kernels.triton.forward.fused_experts_triton` with Triton
    kernels, recomputing the up-projection.

    Given grad_out [T, H] (d loss / d out) and the forward's inputs (checked by
    :func:`~kernel_moe.kernels.contract.validate_call`; ``experts.expert_map`` applied here),
    returns :class:`~kernel_moe.kernels.contract.ExpertsGrads`: x [T, H] in x's dtype,
    topk_weights [T, K] in the weights' dtype (None for a dense call), w_up [E, N, H] and
    w_down [E, H, I] in the weights' dtypes, the biases' gradients or None. A dropped slot (an
    id outside [0, E)) gets a zero weight gradient and contributes nothing. Weights may have
    any strides; gradients come out contiguous. Deterministic, fp32 accumulation, no host
    synchronisation; launches nothing when T == 0.
    ``config``: see :func:`~kernel_moe.kernels.triton.tile_configs.default_backward_config`
    (default: derived from the forward's).
    """
    validate_call(x_TH, weights_TK, ids_TK, experts)
    if ids_TK is not None:
        ids_TK = local_ids(ids_TK, experts)
    return experts_backward(grad_TH, x_TH, weights_TK, ids_TK, experts, config)
