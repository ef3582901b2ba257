"""Triton kernels of one expert projection (the gather or the combine half of the experts op, for
attention experts; the semantics are :mod:`kernel_moe.kernels.projection`'s).

Legend: T tokens, K slots per token, S = T*K slots (slot s = t*K + k), E experts, D input
features, O output features, B blocks of BLOCK_M rows of the expert-aligned layout, P = B*BLOCK_M
padded rows. A row operand is either per token ([T, F], slot s reads row s // K) or per slot
([S, F], slot s reads row s): its "divisor" is K or 1.

Data flow, on the padded layout of :func:`~kernel_moe.kernels.triton.routing.align_by_expert`
(dropped ids, outside [0, E), are in no run: zero output rows, zero gradients):

- forward: ``_projection_kernel`` (a block of one expert's rows x a tile of O columns) gathers
  the input rows in the A-load, multiplies by w[e]^T, adds b[e], and for the combine half scales
  by the slot's routing weight; it writes one row per slot ([S, O]: x's dtype for the gather half,
  fp32 partials for the combine half, summed over K in a fixed order afterwards).
- backward: the same kernel with the output gradient's rows and w read transposed ([E, D, O]
  view) gives u_s = g[row(s)] @ w[e] per slot (fp32); grad_x is u (times w_s for the combine
  half, summed over K for a per-token x); grad_topk_weights[s] = <u_s, x[row(s)]> + <g[t], b[e]>;
  ``_projection_dw_kernel`` (per expert, a tile of the weight, a loop over the expert's rows)
  gives grad_w[e] = sum_s (w_s g[row(s)])^T x[row(s)] and grad_b[e] = sum_s w_s g[row(s)].

Deterministic (no atomics), no host synchronisation: every buffer is sized from shapes.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernel_moe.kernels.triton import common
from kernel_moe.kernels.triton.common import block_rows, block_tile, grouped_pid, mma, slot_weight
from kernel_moe.kernels.triton.routing import AlignedRouting, align_by_expert

# tiles: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); the interpreter's are small
_GPU_TILE = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
_SMALL_TILE = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
_INTERPRETER_TILE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)


@triton.jit
def _projection_kernel(
    x_ptr,  # [R, D] input rows (R = T per token, S per slot), strides (stride_xr, stride_xd)
    w_ptr,  # [E, O, D] expert weights, strides (stride_we, stride_wo, stride_wd)
    bias_ptr,  # [E, O] expert biases, strides (stride_be, stride_bo); unused without HAS_BIAS
    rw_ptr,  # [T, TOP_K] routing weights, strides (stride_rt, stride_rk); unused without WEIGHTED
    out_ptr,  # [S, O] one row per slot, strides (stride_os, stride_oo)
    padded_slots_ptr,  # [P] int32 slot id of each padded row (S = padding)
    block_expert_ptr,  # [B] int32 expert of each block of BLOCK_M rows (-1 = unused)
    D, O, S, TOP_K, X_DIV, num_blocks,
    stride_xr, stride_xd, stride_we, stride_wo, stride_wd, stride_be, stride_bo, stride_rt, stride_rk,
    stride_os, stride_oo,
    HAS_BIAS: tl.constexpr, WEIGHTED: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    TF32: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out[s, o] = (x[s // X_DIV] @ w[e]^T + b[e])[o] (times the routing weight of s when WEIGHTED)
    for every slot s of expert e; rows of dropped slots are not written.

    Grid: (B * cdiv(O, BLOCK_N),), one program per (block of padded rows, tile of O columns),
    ordered by :func:`~.common.grouped_pid`; blocks past the used ones (expert -1) return at once.
    fp32 accumulation; int64 row offsets.
    """
    pid_m, pid_n, expert, cols, col_ok = block_tile(block_expert_ptr, num_blocks, O, BLOCK_N, GROUP_M)
    if expert < 0:
        return
    rows, slots, row_ok, tokens = block_rows(padded_slots_ptr, pid_m, S, TOP_K, BLOCK_M)  # [BLOCK_M] each
    x_rows = (slots // X_DIV).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + x_rows[:, None] * stride_xr + ks[None, :] * stride_xd  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wo + ks[:, None] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(D, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < D - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(a, w, acc, DOT_DTYPE, UPCAST, TF32)
        a_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wd
    if HAS_BIAS:
        b = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + cols * stride_bo, mask=col_ok, other=0.0)
        acc += b.to(tl.float32)[None, :]
    if WEIGHTED:
        acc = acc * slot_weight(rw_ptr, tokens, slots, row_ok, TOP_K, stride_rt, stride_rk)[:, None]
    out_ptrs = out_ptr + slots.to(tl.int64)[:, None] * stride_os + cols[None, :] * stride_oo
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _projection_dw_kernel(
    g_ptr,  # [Rg, O] output-gradient rows (per token or per slot), strides (stride_gr, stride_go)
    x_ptr,  # [Rx, D] input rows (per token or per slot), strides (stride_xr, stride_xd)
    rw_ptr,  # [T, TOP_K] routing weights scaling the rows of g, strides (stride_rt, stride_rk); WEIGHTED only
    out_ptr,  # [E, O, D] weight gradient, strides (stride_oe, stride_oo, stride_od)
    bias_ptr,  # [E, O] bias gradient, strides (stride_be, stride_bo); unused without HAS_BIAS
    padded_slots_ptr,  # [P] int32 slot id of each padded row (S = padding)
    padded_offsets_ptr,  # [E+1] int32 first padded row of each expert
    O, D, S, TOP_K, G_DIV, X_DIV,
    stride_gr, stride_go, stride_xr, stride_xd, stride_rt, stride_rk, stride_oe, stride_oo, stride_od,
    stride_be, stride_bo,
    WEIGHTED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out[e] = sum over e's slots s of g'[s]^T x[s // X_DIV] and bias[e] = sum_s g'[s], where
    g'[s] = g[s // G_DIV] (times the routing weight of s when WEIGHTED); fp32 accumulation.

    Grid: (cdiv(O, BLOCK_M) * cdiv(D, BLOCK_N), E), tiles ordered by ``grouped_pid``. Each
    program loops over its expert's padded rows BLOCK_K at a time (padding counts zero); every
    element is written (zeros for an expert without slots); the first D tile writes the bias.
    """
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    pid_r, pid_c = grouped_pid(pid, tl.cdiv(O, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
    rr = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output features
    cc = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] input features
    r_ok = rr < O
    c_ok = cc < D
    start = tl.load(padded_offsets_ptr + expert)
    end = tl.load(padded_offsets_ptr + expert + 1)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        rows = p0 + ks  # [BLOCK_K] padded rows
        slots = tl.load(padded_slots_ptr + rows, mask=rows < end, other=S)
        ok = slots < S
        g_rows = (slots // G_DIV).to(tl.int64)
        x_rows = (slots // X_DIV).to(tl.int64)
        gt = tl.load(g_ptr + g_rows[None, :] * stride_gr + rr[:, None] * stride_go, mask=r_ok[:, None] & ok[None, :],
                     other=0.0)  # [BLOCK_M, BLOCK_K]: g'^T
        if WEIGHTED:
            tokens = (slots // TOP_K).to(tl.int64)
            gt = gt.to(tl.float32) * slot_weight(rw_ptr, tokens, slots, ok, TOP_K, stride_rt, stride_rk)[None, :]
        xt = tl.load(x_ptr + x_rows[:, None] * stride_xr + cc[None, :] * stride_xd, mask=ok[:, None] & c_ok[None, :],
                     other=0.0)  # [BLOCK_K, BLOCK_N]
        if HAS_BIAS:
            bias_acc += tl.sum(gt.to(tl.float32), axis=1)
        acc = mma(gt, xt, acc, DOT_DTYPE, UPCAST, TF32)
    e64 = expert.to(tl.int64)
    out_ptrs = out_ptr + e64 * stride_oe + rr[:, None] * stride_oo + cc[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])
    if HAS_BIAS:
        if pid_c == 0:
            tl.store(bias_ptr + e64 * stride_be + rr * stride_bo, bias_acc.to(bias_ptr.dtype.element_ty), mask=r_ok)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _tile(t: torch.Tensor, slots: int, experts: int) -> dict:
    """Block sizes: small under the interpreter; on a GPU BLOCK_M 16 when an expert gets few slots."""
    if common.device_name_of(t) == "interpreter":
        return _INTERPRETER_TILE
    return _SMALL_TILE if slots < 32 * experts else _GPU_TILE


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    """A row operand [T, F] or [T, K, F] as 2-D rows (a view when the strides allow)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _launch(x_R: torch.Tensor, x_div: int, w_EOD: torch.Tensor, b_EO: Optional[torch.Tensor],
            weights_TK: Optional[torch.Tensor], routing: AlignedRouting, out_SO: torch.Tensor) -> None:
    """One ``_projection_kernel`` launch into ``out_SO`` (see the kernel)."""
    E, O, D = w_EOD.shape
    tile = _tile(x_R, routing.num_slots, E)
    bias, stride_be, stride_bo = common.operand(b_EO, w_EOD)
    rw, stride_rt, stride_rk = common.operand(weights_TK, w_EOD)
    grid = (routing.num_blocks * triton.cdiv(O, tile["BLOCK_N"]),)
    _projection_kernel[grid](
        x_R, w_EOD, bias, rw, out_SO, routing.padded_slots_P, routing.block_expert_B,
        D, O, routing.num_slots, routing.top_k, x_div, routing.num_blocks,
        x_R.stride(0), x_R.stride(1), w_EOD.stride(0), w_EOD.stride(1), w_EOD.stride(2), stride_be, stride_bo,
        stride_rt, stride_rk, out_SO.stride(0), out_SO.stride(1),
        HAS_BIAS=b_EO is not None, WEIGHTED=weights_TK is not None,
        DOT_DTYPE=common.TL_DTYPES[common.dot_dtype(x_R.dtype, w_EOD.dtype)],
        EVEN_K=D % tile["BLOCK_K"] == 0, BLOCK_M=tile["BLOCK_M"],
        **common.gemm_launch_args(tile),
    )  # fmt: skip


def _route(ids_TK: torch.Tensor, E: int, like: torch.Tensor) -> AlignedRouting:
    return align_by_expert(ids_TK, E, _tile(like, ids_TK.numel(), E)["BLOCK_M"])


def projection_forward_triton(x: torch.Tensor, weights_TK: Optional[torch.Tensor], ids_TK: torch.Tensor,
                              w_EOD: torch.Tensor, b_EO: Optional[torch.Tensor]) -> torch.Tensor:
    """x [T, D] or [T, K, D] -> [T, K, O] (no routing weights) or [T, O] (weighted sum over the
    slots, fp32 per-slot partials summed over K in a fixed order), inputs already validated."""
    T, K = ids_TK.shape
    E, O, _ = w_EOD.shape
    weighted = weights_TK is not None
    out_SO = torch.zeros(T * K, O, dtype=torch.float32 if weighted else x.dtype, device=x.device)
    if T * K and O:
        with common.launch_device(x):
            routing = _route(ids_TK, E, x)
            _launch(_rows2d(x), 1 if x.dim() == 3 else K, w_EOD, b_EO, weights_TK, routing, out_SO)
    if not weighted:
        return out_SO.view(T, K, O)
    return out_SO.view(T, K, O).sum(1).to(x.dtype)


def projection_backward_triton(grad: torch.Tensor, x: torch.Tensor, weights_TK: Optional[torch.Tensor],
                               ids_TK: torch.Tensor, w_EOD: torch.Tensor, b_EO: Optional[torch.Tensor]) -> tuple:
    """(grad_x, grad_topk_weights or None, grad_w, grad_b or None) of
    :func:`projection_forward_triton` for the output gradient ``grad`` (its output's shape)."""
    T, K = ids_TK.shape
    E, O, D = w_EOD.shape
    weighted = weights_TK is not None
    g_w, g_b = torch.empty_like(w_EOD), None if b_EO is None else torch.empty_like(b_EO)
    u_SD = torch.zeros(T * K, D, dtype=torch.float32, device=x.device)  # g[row(s)] @ w[e], per slot
    g_rows, g_div = (grad, K) if weighted else (_rows2d(grad), 1)
    x_rows, x_div = _rows2d(x), (1 if x.dim() == 3 else K)
    with common.launch_device(x):
        if T * K:
            routing = _route(ids_TK, E, x)
            _launch(g_rows, g_div, w_EOD.transpose(1, 2), None, None, routing, u_SD)
            tile = _tile(x, routing.num_slots, E)
            bias, stride_be, stride_bo = common.operand(g_b, g_w)
            rw, stride_rt, stride_rk = common.operand(weights_TK, w_EOD)
            grid = (triton.cdiv(O, tile["BLOCK_M"]) * triton.cdiv(D, tile["BLOCK_N"]), E)
            _projection_dw_kernel[grid](
                g_rows, x_rows, rw, g_w, bias, routing.padded_slots_P, routing.padded_offsets_E1,
                O, D, routing.num_slots, K, g_div, x_div,
                g_rows.stride(0), g_rows.stride(1), x_rows.stride(0), x_rows.stride(1), stride_rt, stride_rk,
                g_w.stride(0), g_w.stride(1), g_w.stride(2), stride_be, stride_bo,
                WEIGHTED=weighted, HAS_BIAS=g_b is not None,
                DOT_DTYPE=common.TL_DTYPES[common.dot_dtype(grad.dtype, x.dtype)],
                BLOCK_M=tile["BLOCK_M"], **common.gemm_launch_args(tile),
            )  # fmt: skip
        else:
            g_w.zero_()
            if g_b is not None:
                g_b.zero_()
    u_TKD = u_SD.view(T, K, D)
    g_topk = None
    if weighted:
        x_TKD = x.float() if x.dim() == 3 else x.float().unsqueeze(1)
        g_topk_TK = (u_TKD * x_TKD).sum(-1)
        if b_EO is not None:  # + <g[t], b[e]>, 0 for dropped slots
            kept = (ids_TK >= 0) & (ids_TK < E)
            gb_TE = grad.float() @ b_EO.float().t()
            g_topk_TK = g_topk_TK + gb_TE.gather(1, ids_TK.long().clamp(0, E - 1)) * kept
        g_topk = g_topk_TK.to(weights_TK.dtype)
        u_TKD = u_TKD * weights_TK.float().unsqueeze(-1)
    g_x = u_TKD if x.dim() == 3 else u_TKD.sum(1)
    return g_x.to(x.dtype), g_topk, g_w, g_b


__all__ = ["projection_backward_triton", "projection_forward_triton"]
