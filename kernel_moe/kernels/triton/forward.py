"""Fused MoE expert kernels (the forward of the Triton backend): grouped up-projection with the
activation in its epilogue, grouped down-projection with the routing weight in its epilogue,
and the reduction over K.

Legend: T tokens, H hidden, E experts, K experts per token (top-k), I expert intermediate
size, N up-projection features (2*I when gated, else I), S = T*K slots (slot s = t*K + j),
B blocks of BLOCK_M rows of the expert-aligned layout, P = B*BLOCK_M padded rows.

Data flow (no permuted copy of the tokens is ever made):

1. :func:`~kernel_moe.kernels.triton.routing.align_by_expert` sorts the slots by expert and
   pads each expert's run to a multiple of BLOCK_M (sentinel S); dropped slots (ids outside
   [0, E)) belong to no run.
2. ``_moe_up_kernel``: for each block of padded rows (one expert) and tile of I columns,
   the token rows of x are gathered in the A-load through the padded slot ids, multiplied by
   w_up[e] (gate and up tiles in the same program when gated), bias, clamp and activation
   applied in fp32, and the [P, I] intermediate stored in padded order.
3. ``_moe_down_kernel``: intermediate rows times w_down[e], bias, times the routing weight
   of the slot; written per slot ([SPLIT_K, S, H] fp32, deterministic), straight into the
   output when K == 1, or atomically added into an fp32 [T, H] buffer.
4. ``_moe_reduce_kernel``: sums the per-slot partials over K (and splits) in a fixed order,
   skipping dropped slots.

The decode path (few slots per expert) is the same kernels with BLOCK_M 16, narrow
up-projection tiles and split-K on the down projection so that many programs stream the
weights; :func:`~kernel_moe.kernels.triton.tile_configs.get_tile_config` selects it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernel_moe.kernels.annotate import COMBINE, DISPATCH, DOWN, UP, stage
from kernel_moe.kernels.contract import Activation, StackedExperts, local_ids, validate_call
from kernel_moe.kernels.triton import common
from kernel_moe.kernels.triton.common import (  # device helpers, called by the kernels
    activate, add_up_bias, block_rows, block_tile, clamp_gate_up, mma, slot_weight,
)
from kernel_moe.kernels.triton.quantized import WeightOperand, down_operand, up_operand, weight_tile
from kernel_moe.kernels.triton.routing import AlignedRouting, align_by_expert
from kernel_moe.kernels.triton.tile_configs import get_tile_config, validate_tile_config

OUT_PARTIAL, OUT_ATOMIC, OUT_DIRECT = 0, 1, 2


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
    ws_ptr,  # quantized formats: w_up's scale [E, N] or [E, N, G], strides (stride_se, stride_sr, stride_sg)
    H, I, S, TOP_K, num_blocks, up_offset,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_be, stride_bn, stride_om,
    stride_se, stride_sr, stride_sg, w_group,
    alpha, limit, gate_softcap, up_softcap,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, GATE_STEP: tl.constexpr, CLAMPED: tl.constexpr,
    SOFTCAPPED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr,
    EVEN_K: tl.constexpr, W_FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Grouped up-projection + activation: out[p, i] = act(x[tok(p)] @ w_up[e]^T + b_up[e]).

    Grid: (B * cdiv(I, BLOCK_N),), one program per (block of padded rows, tile of I columns),
    ordered by :func:`~.common.grouped_pid`. Blocks past the used ones (expert -1) return at once.
    Gated: intermediate column i reads gate feature ``i*GATE_STEP`` and up feature
    ``i*GATE_STEP + up_offset`` (concat: step 1, offset I; interleaved: step 2, offset 1).
    The epilogue, in fp32: bias; when CLAMPED, gate clamped above at ``limit`` and up to
    [-limit, limit]; the activation (code ACTIVATION; ``alpha`` for GPT-OSS; when SOFTCAPPED,
    the softcapped SwiGLU with ``gate_softcap`` / ``up_softcap``, inf = no cap). A quantized
    w_up (W_FORMAT > 0, see :mod:`~.quantized`) is dequantized tile by tile in the K-loop.
    """
    pid_m, pid_n, expert, cols, col_ok = block_tile(block_expert_ptr, num_blocks, I, BLOCK_N, GROUP_M)  # cols of I
    if expert < 0:
        return
    rows, slots, row_ok, tokens = block_rows(padded_slots_ptr, pid_m, S, TOP_K, BLOCK_M)  # [BLOCK_M] each
    gate_rows = cols * GATE_STEP
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xh  # [BLOCK_M, BLOCK_K]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    s_base = ws_ptr + expert.to(tl.int64) * stride_se
    g_ptrs = w_base + gate_rows[None, :] * stride_wn + ks[:, None] * stride_wh  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + up_offset * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(H, BLOCK_K)):
        kk = (k0 * BLOCK_K + ks)[:, None]  # [BLOCK_K, 1] input features of this step
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            w_ok = col_ok[None, :]
        else:
            k_ok = ks < H - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_ok = k_ok[:, None] & col_ok[None, :]
        g = weight_tile(g_ptrs, w_base, s_base, gate_rows[None, :], kk, w_ok, stride_wn, stride_sr, stride_sg, w_group,
                        W_FORMAT)
        acc_g = mma(a, g, acc_g, DOT_DTYPE, UPCAST, TF32)
        if GATED:
            u = weight_tile(u_ptrs, w_base, s_base, gate_rows[None, :] + up_offset, kk, w_ok, stride_wn, stride_sr,
                            stride_sg, w_group, W_FORMAT)
            acc_u = mma(a, u, acc_u, DOT_DTYPE, UPCAST, TF32)
            u_ptrs += BLOCK_K * stride_wh
        a_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wh

    if HAS_BIAS:
        acc_g, acc_u = add_up_bias(acc_g, acc_u, bias_ptr, expert, gate_rows, col_ok, up_offset, stride_be, stride_bn,
                                   GATED)
    gate, up = clamp_gate_up(acc_g, acc_u, limit, CLAMPED)
    h = activate(gate, up, alpha, gate_softcap, up_softcap, ACTIVATION, GATED, SOFTCAPPED)
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
    ws_ptr,  # quantized formats: the weight's scale, strides (stride_se, stride_sr, stride_sg)
    H, I, S, TOP_K, num_blocks, k_per_split,
    stride_am, stride_we, stride_wh, stride_wi, stride_be, stride_bh, stride_rt, stride_rk, stride_ot, stride_oh,
    stride_se, stride_sr, stride_sg, w_group,
    OUT_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr,
    SPLIT_K: tl.constexpr, W_FORMAT: tl.constexpr, W_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Grouped down-projection: y[s, h] = w[s] * (a[p(s)] @ w_down[e]^T + b_down[e]).

    Grid: (B * cdiv(H, BLOCK_N), SPLIT_K). Program (pid, split) reduces I columns
    ``[split*k_per_split, (split+1)*k_per_split)`` (k_per_split a multiple of BLOCK_K); only
    split 0 adds the bias. The routing weight scales every split (the map is linear).
    A quantized weight (W_FORMAT > 0) is dequantized in the K-loop; its stored rows are the H
    axis, or the I axis when W_T (the backward reads w_up [E, N, H] transposed as [E, H, N]).
    """
    split = tl.program_id(1)
    pid_m, pid_n, expert, cols, col_ok = block_tile(block_expert_ptr, num_blocks, H, BLOCK_N, GROUP_M)  # cols of H
    if expert < 0:
        return
    rows, slots, row_ok, tokens = block_rows(padded_slots_ptr, pid_m, S, TOP_K, BLOCK_M)  # [BLOCK_M] each
    k_start = split * k_per_split
    ks = k_start + tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    s_base = ws_ptr + expert.to(tl.int64) * stride_se
    w_ptrs = w_base + cols[None, :] * stride_wh + ks[:, None] * stride_wi
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(k_per_split, BLOCK_K)):
        k_ok = ks < I - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        kk = (ks + k0 * BLOCK_K)[:, None]  # [BLOCK_K, 1] reduction features of this step
        w_ok = k_ok[:, None] & col_ok[None, :]
        if W_T:
            w = weight_tile(w_ptrs, w_base, s_base, kk, cols[None, :], w_ok, stride_wi, stride_sr, stride_sg, w_group,
                            W_FORMAT)
        else:
            w = weight_tile(w_ptrs, w_base, s_base, cols[None, :], kk, w_ok, stride_wh, stride_sr, stride_sg, w_group,
                            W_FORMAT)
        acc = mma(a, w, acc, DOT_DTYPE, UPCAST, TF32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wi

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + cols * stride_bh, mask=col_ok, other=0.0)
        acc += tl.where(split == 0, bias.to(tl.float32), 0.0)[None, :]
    acc = acc * slot_weight(rw_ptr, tokens, slots, row_ok, TOP_K, stride_rt, stride_rk)[:, None]
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
    T, H, E, TOP_K, split_stride,
    stride_it, stride_ik, stride_ot, stride_oh,
    SPLIT_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
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
# launchers
# --------------------------------------------------------------------------------------


def moe_up_projection(
    x_TH: torch.Tensor,
    routing: AlignedRouting,
    w_up: WeightOperand,
    b_up_EN: torch.Tensor | None,
    activation: Activation,
    config: dict,
) -> torch.Tensor:
    """Launch the grouped up-projection of w_up [E, N, H] (any format); returns the intermediate
    [P, I] in padded order (rows of padding are left unwritten). dtype: promotion of x's and the
    full weights' dtypes (x's for quantized weights)."""
    w_up_ENH = w_up.data
    E, N, H = w_up.shape
    I = N // 2 if activation.gated else N
    P = routing.padded_slots_P.shape[0]
    dot = common.dot_dtype(x_TH.dtype, w_up_ENH.dtype)
    inter_PI = torch.empty(P, I, dtype=dot, device=x_TH.device)
    up = config["up"]
    grid = (routing.num_blocks * triton.cdiv(I, up["BLOCK_N"]),)
    bias, stride_be, stride_bn = common.operand(b_up_EN, w_up_ENH)
    with common.launch_device(x_TH):
        _moe_up_kernel[grid](
            x_TH, w_up_ENH, bias, inter_PI, routing.padded_slots_P, routing.block_expert_B, w_up.scale,
            H, I, routing.num_slots, routing.top_k, routing.num_blocks, common.up_offset(activation, I),
            x_TH.stride(0), x_TH.stride(1),
            w_up_ENH.stride(0), w_up_ENH.stride(1), w_up_ENH.stride(2),
            stride_be, stride_bn,
            inter_PI.stride(0),
            *w_up.scale_args()[1:],
            *common.activation_scalars(activation),
            **common.activation_constexprs(activation),
            HAS_BIAS=b_up_EN is not None,
            DOT_DTYPE=common.TL_DTYPES[dot],
            EVEN_K=H % up["BLOCK_K"] == 0,
            W_FORMAT=w_up.code,
            BLOCK_M=config["BLOCK_M"],
            **common.gemm_launch_args(up),
        )  # fmt: skip
    return inter_PI


def moe_down_projection(
    inter_PI: torch.Tensor,
    routing: AlignedRouting,
    w_down: WeightOperand,
    b_down_EH: torch.Tensor | None,
    weights_TK: torch.Tensor,
    out_dtype: torch.dtype,
    deterministic: bool,
    config: dict,
) -> torch.Tensor:
    """Launch the grouped down-projection of w_down [E, H, I] (any format; a transposed operand
    of a stored [E, I, H], see ``WeightOperand.t``) and the reduction over K; returns out
    [T, H] in ``out_dtype``. ``weights_TK`` [T, K] scales each slot (any float dtype, any
    strides); the slots of ``routing.ids_TK`` outside [0, E) contribute nothing."""
    transposed = w_down.transposed
    w_down_EHI = w_down.data.transpose(1, 2) if transposed else w_down.data
    E, H, I = (w_down.shape[0], w_down.shape[2], w_down.shape[1]) if transposed else w_down.shape
    ids_TK = routing.ids_TK
    T, K = ids_TK.shape
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
    dot = common.dot_dtype(inter_PI.dtype, w_down_EHI.dtype)
    bias, stride_be, stride_bh = common.operand(b_down_EH, w_down_EHI)
    out_strides = (target.stride(0), target.stride(1)) if mode == OUT_DIRECT else (0, 0)
    grid = (routing.num_blocks * triton.cdiv(H, down["BLOCK_N"]), split)
    with common.launch_device(inter_PI):
        _moe_down_kernel[grid](
            inter_PI, w_down_EHI, bias, weights_TK, target, routing.padded_slots_P, routing.block_expert_B,
            w_down.scale,
            H, I, S, K, routing.num_blocks, k_per_split,
            inter_PI.stride(0),
            w_down_EHI.stride(0), w_down_EHI.stride(1), w_down_EHI.stride(2),
            stride_be, stride_bh,
            weights_TK.stride(0), weights_TK.stride(1),
            out_strides[0], out_strides[1],
            *w_down.scale_args()[1:],
            OUT_MODE=mode,
            HAS_BIAS=b_down_EH is not None,
            DOT_DTYPE=common.TL_DTYPES[dot],
            SPLIT_K=split,
            W_FORMAT=w_down.code,
            W_T=transposed,
            BLOCK_M=config["BLOCK_M"],
            **common.gemm_launch_args(down),
        )  # fmt: skip
        if mode == OUT_DIRECT:
            return target
        if mode == OUT_ATOMIC:
            return target.to(out_dtype)
        out_TH = torch.empty(T, H, dtype=out_dtype, device=dev)
        block_h = min(256, max(16, triton.next_power_of_2(H)))
        block_t = max(1, min(64, 4096 // block_h))
        with stage(COMBINE):
            _moe_reduce_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
                target, ids_TK, out_TH, T, H, E, K, S * H,
                ids_TK.stride(0), ids_TK.stride(1), out_TH.stride(0), out_TH.stride(1),
                SPLIT_K=split, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
            )  # fmt: skip
    return out_TH


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------


def experts_forward(x_TH: torch.Tensor, weights_TK: torch.Tensor | None, ids_TK: torch.Tensor | None,
                    experts: StackedExperts, deterministic: bool = True, config: dict | None = None) -> torch.Tensor:
    """The Triton backend's forward on inputs the contract's validator has passed and on local
    ids (``experts.expert_map`` is not applied here); what the kernels do not support beyond
    the contract (float64) raises UnsupportedInputError.
    See :func:`fused_experts_triton` for the semantics."""
    common.check_supported(experts, x=x_TH, topk_weights=weights_TK)
    if ids_TK is None:
        weights_TK, ids_TK = common.dense_routing(x_TH)
    T, H = x_TH.shape
    E, N = experts.w_up.shape[:2]
    K = ids_TK.shape[1]
    if T == 0 or K == 0:
        return torch.zeros(T, H, dtype=x_TH.dtype, device=x_TH.device)
    activation = experts.activation
    if config is None:
        config = get_tile_config(E, N, H, x_TH.dtype, common.device_name_of(x_TH), T, top_k=K, gated=activation.gated)
    else:
        validate_tile_config(config)
    with stage(DISPATCH):
        routing = align_by_expert(ids_TK, E, config["BLOCK_M"])
    with stage(UP):  # the activation runs in the up-projection's epilogue
        inter_PI = moe_up_projection(x_TH, routing, up_operand(experts), experts.b_up, activation, config)
    with stage(DOWN):  # the routing weight scales in the epilogue; a reduction over K, if any, is "combine"
        return moe_down_projection(
            inter_PI, routing, down_operand(experts), experts.b_down, weights_TK, x_TH.dtype, deterministic, config
        )


def fused_experts_triton(
    x_TH: torch.Tensor,
    weights_TK: torch.Tensor | None,
    ids_TK: torch.Tensor | None,
    experts: StackedExperts,
    deterministic: bool = True,
    config: dict | None = None,
) -> torch.Tensor:
    """Routed experts with fused Triton kernels: out[t] = sum_j w[t, j] * expert_{id[t, j]}(x[t]).

    The contract of :mod:`kernel_moe.kernels.contract`: x [T, H]; routing weights and ids
    [T, K], or both None for a dense call (one expert, weight 1); ``experts`` holds w_up
    [E, N, H] and w_down [E, H, I] with any strides (or quantized, with their scales), optional
    biases [E, N] / [E, H], the activation, the weight format and an optional expert map
    (applied here). An id outside [0, E) after the map marks a dropped slot that contributes nothing.
    Returns [T, H] in x's dtype. ``deterministic=True`` reduces per-slot fp32 results in a
    fixed order; False accumulates with fp32 atomics. ``config``: a tile config dict (see
    :mod:`~kernel_moe.kernels.triton.tile_configs`); default from tuned tables or the
    heuristic. Inputs are checked by :func:`~kernel_moe.kernels.contract.validate_call`
    (metadata only); launches nothing when T == 0 and never synchronises with the device.
    """
    validate_call(x_TH, weights_TK, ids_TK, experts)
    if ids_TK is not None:
        ids_TK = local_ids(ids_TK, experts)
    return experts_forward(x_TH, weights_TK, ids_TK, experts, deterministic, config)
