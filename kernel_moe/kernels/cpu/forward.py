"""The PyTorch implementation of the routed-experts op (forward and recomputing backward).

It runs inside the custom op, where it is opaque to the compiler, so it may read token
counts on the host. On CPU each small tensor op costs microseconds, so the forward is built
to issue few of them:
- large batches: slots sorted by expert once, token rows gathered with one ``index_select``,
  each expert's rows as one GEMM written into a shared buffer; activation, routing-weight
  scale and combine once per chunk of at most ``max(MIN_CHUNK_ROWS, S / CHUNKS_PER_CALL)``
  slots, which also keeps transient memory a fraction of one [S, I] intermediate;
- small batches: runs of experts as batched GEMMs over strided views of the stacked weights;
- one token: its K experts likewise, combined by one [1, K] x [K, H] GEMM;
- with the native CPU extension (``kernels/cpu``), decode and small batches instead run as
  grouped matrix-vector products that read each active expert's weights once at close to
  memory bandwidth (:func:`_native_rows`); oneDNN and MKL read cold weights at a third of it
  for such shapes. Larger batches run its fused forward: tasks of one expert's rows (gather,
  both GEMMs, activation) run concurrently, one thread each, and a weighted combine per token.
  Per-expert GEMMs spread over every thread one after the other scale poorly over threads,
  and the chunked path's layer-wide intermediates and combine cost another 10 to 20 percent.

Legend: T tokens, H hidden, E experts, K top-k, N up features, I intermediate, S = T*K,
C slots of one chunk, M tokens of one expert.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernel_moe.errors import UnsupportedInputError
from kernel_moe.kernels.cpu import cpu_extension
from kernel_moe.reference.activations import activation_backward, apply_activation
from kernel_moe.reference.moe import expert_mlp as mlp_forward

MIN_CHUNK_ROWS = 512
CHUNKS_PER_CALL = 8
SMALL_BATCH_MEAN_ROWS = 32
HOST_SORT_MAX_SLOTS = 64
# the native grouped matrix-vector kernel beats the native fused forward up to about this
# many rows per active expert on average, uniform or skewed routing alike, at 1 and 2 threads
# (benchmarks/bench_cpu_path_choice.py: fused / matrix-vector 1.02 to 2.75 below these, fp32
# 0.87 to 1.38 at 8 to 16 rows, bf16 0.86 to 0.98 at 5.3 to 6.9 rows); the busiest expert's
# rows matter far less than the mean
NATIVE_MAX_MEAN_ROWS = {torch.float32: 8, torch.bfloat16: 5}
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SortedSlots(NamedTuple):
    """Token-expert slots in expert order (stable, so slot order within an expert)."""

    counts: list[int]  # slots per expert, length E
    order_S: torch.Tensor  # [S] slot index (t * K + j) of each sorted position
    tok_S: torch.Tensor  # [S] token of each sorted position


def sort_slots(topk_ids_TK: torch.Tensor, num_experts: int) -> SortedSlots:
    """Sort the T*K slots by expert id; raises UnsupportedInputError for an id outside [0, E)."""
    K = topk_ids_TK.shape[1]
    ids_S = topk_ids_TK.reshape(-1)
    if ids_S.numel() <= HOST_SORT_MAX_SLOTS and ids_S.device.type == "cpu":
        return _sort_slots_on_host(ids_S.tolist(), K, num_experts)
    try:
        counts_E = torch.bincount(ids_S, minlength=num_experts)
        bad = None if counts_E.numel() == num_experts else int(ids_S.max())
    except RuntimeError:  # a negative id
        bad = int(ids_S.min())
    if bad is not None:
        raise _expert_id_error(bad, num_experts)
    order_S = torch.sort(ids_S, stable=True).indices
    return SortedSlots(counts_E.tolist(), order_S, order_S // K)


def _expert_id_error(expert: int, num_experts: int) -> UnsupportedInputError:
    return UnsupportedInputError(
        f"topk_ids holds expert id {expert}, outside [0, {num_experts}) for w_up with {num_experts} experts"
    )


def _sort_slots_on_host(ids: list[int], K: int, num_experts: int) -> SortedSlots:
    """sort_slots for a few slots (decode): plain Python lists, three tensor ops fewer."""
    counts = [0] * num_experts
    for e in ids:
        if not 0 <= e < num_experts:
            raise _expert_id_error(e, num_experts)
        counts[e] += 1
    order = sorted(range(len(ids)), key=ids.__getitem__)  # stable
    return SortedSlots(counts, torch.tensor(order), torch.tensor([o // K for o in order]))


def _expert_groups(
    topk_ids_TK: torch.Tensor, num_experts: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (expert, token indices [M], slot indices [M]) for each expert with tokens, in
    expert order and, within an expert, in slot order."""
    if topk_ids_TK.numel() == 0:
        return
    slots = sort_slots(topk_ids_TK, num_experts)
    start = 0
    for e, n in enumerate(slots.counts):
        if n:
            yield e, slots.tok_S[start : start + n], slots.order_S[start : start + n]
        start += n


def _linear_into(out_MX: torch.Tensor, x_MY: torch.Tensor, w_XY: torch.Tensor, b_X: torch.Tensor | None) -> None:
    """out = x @ w.T (+ b), written into ``out`` (a row slice of a shared buffer)."""
    if b_X is None:
        torch.mm(x_MY, w_XY.t(), out=out_MX)
    else:
        torch.addmm(b_X, x_MY, w_XY.t(), out=out_MX)


def _chunk_bounds(counts: list[int], chunk: int) -> list[tuple[int, int]]:
    """Sorted-slot ranges [c0, c1) of at most ``chunk`` rows that cut an expert's rows only
    when the expert alone holds more than a chunk (so per-expert GEMMs stay whole)."""
    bounds = []
    c0 = pos = 0
    for n in counts:
        if n == 0:
            continue
        if pos > c0 and pos + n - c0 > chunk:
            bounds.append((c0, pos))
            c0 = pos
        pos += n
        while pos - c0 > chunk:
            bounds.append((c0, c0 + chunk))
            c0 += chunk
    if pos > c0:
        bounds.append((c0, pos))
    return bounds


def _expert_runs(counts: list[int], dtype: torch.dtype) -> list[tuple[int, int, int]]:
    """Experts with slots as runs (first expert, step, number of experts) that one strided
    view of the stacked weights covers without reading an idle expert: all of them when
    :func:`_strided_run` allows (in fp32 always so for two experts), else runs of
    consecutive experts."""
    active = [e for e, n in enumerate(counts) if n]
    run = _strided_run(active, dtype)
    if run is not None:
        return [(run[0], run[1], len(active))]
    runs: list[tuple[int, int, int]] = []
    for e in active:
        if runs and runs[-1][0] + runs[-1][2] == e:
            runs[-1] = (runs[-1][0], 1, runs[-1][2] + 1)
        else:
            runs.append((e, 1, 1))
    return runs


def _expert_view(w: torch.Tensor, first: int, step: int, count: int) -> torch.Tensor:
    """Experts first, first + step, ... of a stacked [E, ...] tensor as a [count, ...] view (no copy)."""
    st = w.stride()
    return w.as_strided((count, *w.shape[1:]), (step * st[0], *st[1:]), w.storage_offset() + first * st[0])


def _small_batch_rows(
    x_TH: torch.Tensor,
    slots: SortedSlots,
    w_up_ENH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Expert outputs [S, H] (x's dtype, sorted-slot order) when experts get few rows each.

    Each run of experts (:func:`_expert_runs`) is one batched GEMM per projection over a
    strided view of the stacked weights, its experts' rows zero-padded to the longest: a
    GEMV per expert leaves one of two cores idle and pays a call per expert, a batched one
    spreads experts over the threads. A run whose padding would more than double its rows
    (with one thread: that needs any padding) runs expert by expert instead.
    """
    H = x_TH.shape[1]
    x_SH = x_TH.index_select(0, slots.tok_S)
    # padding buys thread parallelism; with one thread it is only wasted work
    max_padded = 2 if torch.get_num_threads() > 1 else 1
    runs = []  # (first expert, step, rows of each of its experts)
    for first, step, count in _expert_runs(slots.counts, x_TH.dtype):
        rows = [slots.counts[first + i * step] for i in range(count)]
        if count > 1 and count * max(rows) > max_padded * sum(rows):
            runs.extend((first + i * step, 1, [n]) for i, n in enumerate(rows))
        else:
            runs.append((first, step, rows))
    starts = [0, *accumulate(slots.counts)]
    outs = []
    for first, step, rows in runs:
        count, m = len(rows), max(rows)
        lo = starts[first]
        x_MH = x_SH[lo : lo + sum(rows)]
        if count == 1:  # one expert: a plain GEMM (batched low-precision GEMMs are slower)
            outs.append(mlp_forward(x_MH, w_up_ENH[first], w_down_EHI[first], _bias(b_up_EN, first),
                                    _bias(b_down_EH, first), activation, glu, alpha, limit))
            continue
        pos = None
        if min(rows) == m:
            x_BMH = x_MH.view(count, m, H)
        else:  # row r of the run's i-th expert sits at i * m + r
            pos = torch.tensor([i * m + r for i, n in enumerate(rows) for r in range(n)], device=x_TH.device)
            x_BMH = x_TH.new_zeros(count * m, H).index_copy_(0, pos, x_MH).view(count, m, H)
        y = _run_mlp(x_BMH, first, step, w_up_ENH, w_down_EHI, b_up_EN, b_down_EH, activation, glu, alpha,
                     limit).view(-1, H)
        outs.append(y if pos is None else y.index_select(0, pos))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _run_mlp(
    x_BMH: torch.Tensor,
    first: int,
    step: int,
    w_up_ENH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Experts first, first + step, ... (B of them) on their rows: [B, M, H] -> [B, M, H],
    one batched GEMM per projection over strided views of the stacked weights."""
    B = x_BMH.shape[0]

    def view(w: torch.Tensor | None) -> torch.Tensor | None:
        return None if w is None else _expert_view(w, first, step, B)

    h_BMN = _batched_linear(x_BMH, view(w_up_ENH), view(b_up_EN))
    return _batched_linear(apply_activation(h_BMN, activation, glu, alpha, limit), view(w_down_EHI), view(b_down_EH))


def _batched_linear(x_BMY: torch.Tensor, w_BXY: torch.Tensor, b_BX: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T (+ b) per batch: [B, M, Y] -> [B, M, X]."""
    if b_BX is None:
        return torch.bmm(x_BMY, w_BXY.transpose(1, 2))
    return torch.baddbmm(b_BX.unsqueeze(1), x_BMY, w_BXY.transpose(1, 2))


def _single_token_forward(
    x_1H: torch.Tensor,
    topk_weights_1K: torch.Tensor,
    topk_ids_1K: torch.Tensor,
    w_up_ENH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Decode of one token on CPU, in as few tensor ops as possible (each costs microseconds,
    more once other layers have evicted the caches): the K experts as one strided batched GEMM
    per projection when their ids are equally spaced and the dtype allows it
    (:func:`_expert_runs`), else one GEMM per expert; then out = w [1, K] @ y [K, H] in fp32."""
    E = w_up_ENH.shape[0]
    ids = topk_ids_1K[0].tolist()
    for e in ids:
        if not 0 <= e < E:
            raise _expert_id_error(e, E)
    K, H = len(ids), x_1H.shape[1]
    acc_dtype = torch.promote_types(x_1H.dtype, torch.float32)
    run = _strided_run(ids, x_1H.dtype)
    if run is not None:
        first, step = run
        order = sorted(range(K), key=ids.__getitem__)
        y_KH = _run_mlp(x_1H.expand(K, 1, H), first, step, w_up_ENH, w_down_EHI, b_up_EN, b_down_EH, activation,
                        glu, alpha, limit).view(K, H)
        weights_1K = topk_weights_1K.to(acc_dtype)[:, order]
    else:
        y_KH = torch.cat([mlp_forward(x_1H, w_up_ENH[e], w_down_EHI[e], _bias(b_up_EN, e), _bias(b_down_EH, e),
                                      activation, glu, alpha, limit) for e in ids])
        weights_1K = topk_weights_1K.to(acc_dtype)
    return torch.mm(weights_1K, y_KH.to(acc_dtype)).to(x_1H.dtype)


def _strided_run(experts: list[int], dtype: torch.dtype) -> tuple[int, int] | None:
    """(first, step) when distinct ``experts`` are equally spaced (in any order) and one
    strided view may take them: step 1 in any dtype, any step in fp32/fp64 only (batched
    low-precision GEMMs with a batch stride other than one expert take a slow path)."""
    ordered = sorted(experts)
    if len(ordered) < 2:
        return None
    step = ordered[1] - ordered[0]
    if step == 0 or any(b - a != step for a, b in zip(ordered, ordered[1:])):
        return None
    if step != 1 and dtype not in (torch.float32, torch.float64):
        return None
    return ordered[0], step


def _bias(b_EX: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if b_EX is None else b_EX[e]


def mlp_backward(
    g_MH: torch.Tensor,
    scale_M: torch.Tensor | None,
    x_MH: torch.Tensor,
    w_up_NH: torch.Tensor,
    w_down_HI: torch.Tensor,
    b_up_N: torch.Tensor | None,
    b_down_H: torch.Tensor | None,
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``scale_M[:, None] * mlp_forward(x_MH)`` given d/d out ``g_MH``, recomputing the
    forward. Returns (dx [M, H] acc dtype, dw_up [N, H], dw_down [H, I], db_up [N] | None,
    db_down [H] | None, d scale [M] acc dtype | None)."""
    acc = torch.promote_types(x_MH.dtype, torch.float32)
    h_MN = F.linear(x_MH, w_up_NH, b_up_N)
    a_MI = apply_activation(h_MN, activation, glu, alpha, limit)
    d_scale = None
    dy_MH = g_MH.to(acc)
    if scale_M is not None:
        y_MH = F.linear(a_MI, w_down_HI, b_down_H)
        d_scale = (dy_MH * y_MH.to(acc)).sum(dim=-1)
        dy_MH = dy_MH * scale_M.to(acc).unsqueeze(-1)
    dy_MH = dy_MH.to(w_down_HI.dtype)
    dw_down = dy_MH.t() @ a_MI.to(dy_MH.dtype)
    db_down = dy_MH.to(acc).sum(dim=0).to(b_down_H.dtype) if b_down_H is not None else None
    da_MI = (dy_MH @ w_down_HI).to(a_MI.dtype)
    dh_MN = activation_backward(h_MN, da_MI, activation, glu, alpha, limit).to(w_up_NH.dtype)
    dw_up = dh_MN.t() @ x_MH.to(dh_MN.dtype)
    db_up = dh_MN.to(acc).sum(dim=0).to(b_up_N.dtype) if b_up_N is not None else None
    dx_MH = (dh_MN @ w_up_NH).to(acc)
    return dx_MH, dw_up, dw_down, db_up, db_down, d_scale


def _matvec_fits(x_TH: torch.Tensor, w_up_ENH: torch.Tensor, w_down_EHI: torch.Tensor, S: int) -> bool:
    """Whether the native grouped matrix-vector kernel takes these tensors: fp32 or bf16
    weights of x's dtype with unit stride along the input features, few slots."""
    return (x_TH.dtype in NATIVE_MAX_MEAN_ROWS and S <= MIN_CHUNK_ROWS and w_up_ENH.dtype == x_TH.dtype
            and w_down_EHI.dtype == x_TH.dtype and w_up_ENH.stride(-1) == 1 and w_down_EHI.stride(-1) == 1)


def _fused_fits(x_TH: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether the native fused forward takes these tensors: fp32, bf16 or fp16, weights and
    biases of x's dtype."""
    return x_TH.dtype in FUSED_DTYPES and all(w is None or w.dtype == x_TH.dtype for w in weights)


def _native_rows(
    ext,
    x_TH: torch.Tensor,
    slots: SortedSlots,
    w_up_ENH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Expert outputs [S, H] in fp32, sorted-slot order, from the native grouped
    matrix-vector kernel: one pass over each active expert's weights per projection, fp32
    accumulation and fp32 activation."""
    x_SH = x_TH.index_select(0, slots.tok_S).float()
    expert_S = None
    if b_up_EN is not None or b_down_EH is not None:
        expert_S = torch.repeat_interleave(torch.arange(len(slots.counts)), torch.tensor(slots.counts))
    h_SN = ext.grouped_matvec(x_SH, w_up_ENH, slots.counts)
    if b_up_EN is not None:
        h_SN += b_up_EN.index_select(0, expert_S)
    a_SI = apply_activation(h_SN, activation, glu, alpha, limit).contiguous()
    y_SH = ext.grouped_matvec(a_SI, w_down_EHI, slots.counts)
    if b_down_EH is not None:
        y_SH += b_down_EH.index_select(0, expert_S)
    return y_SH


def experts_forward(
    x_TH: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    w_up_ENH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * expert_{id[t, j]}(x[t]); accumulated in fp32, returned in x's dtype.

    With the native CPU extension: the grouped matrix-vector kernel when experts get few
    slots each (decode, small batches; :func:`_native_rows`), else its fused forward, which
    runs the experts' work concurrently. Without it: strided batched GEMMs for few slots per
    expert (:func:`_small_batch_rows`, :func:`_single_token_forward`), else sorted slots in
    chunks of per-expert GEMMs.
    """
    T, H = x_TH.shape
    acc_dtype = torch.promote_types(x_TH.dtype, torch.float32)
    E = w_up_ENH.shape[0]
    if topk_ids_TK.numel() == 0:
        return x_TH.new_zeros(T, H)
    S, N = topk_ids_TK.numel(), w_up_ENH.shape[1]
    ext = cpu_extension() if x_TH.device.type == "cpu" else None
    matvec = ext is not None and _matvec_fits(x_TH, w_up_ENH, w_down_EHI, S)
    if T == 1 and not matvec and x_TH.device.type == "cpu":
        return _single_token_forward(x_TH, topk_weights_TK, topk_ids_TK, w_up_ENH, w_down_EHI, b_up_EN, b_down_EH,
                                     activation, glu, alpha, limit)
    slots = sort_slots(topk_ids_TK, E)
    active = sum(1 for n in slots.counts if n)
    matvec = matvec and S <= NATIVE_MAX_MEAN_ROWS[x_TH.dtype] * active
    if ext is not None and not matvec and _fused_fits(x_TH, w_up_ENH, w_down_EHI, b_up_EN, b_down_EH):
        return ext.fused_experts(x_TH, topk_weights_TK, slots.order_S, slots.counts, w_up_ENH, w_down_EHI, b_up_EN,
                                 b_down_EH, activation, glu, alpha, limit)
    weights_S = topk_weights_TK.reshape(-1).index_select(0, slots.order_S).to(acc_dtype)
    y_SH = None  # expert outputs of every sorted slot, acc dtype, when few slots per expert
    if matvec:
        y_SH = _native_rows(ext, x_TH, slots, w_up_ENH, w_down_EHI, b_up_EN, b_down_EH, activation, glu, alpha, limit)
        if T == 1:  # one token: combine its K rows by a [1, K] x [K, H] GEMM
            return torch.mm(weights_S.unsqueeze(0), y_SH).to(x_TH.dtype)
    elif S <= MIN_CHUNK_ROWS and S <= SMALL_BATCH_MEAN_ROWS * active:
        y_SH = _small_batch_rows(x_TH, slots, w_up_ENH, w_down_EHI, b_up_EN, b_down_EH, activation, glu, alpha,
                                 limit).to(acc_dtype)
    out_TH = torch.zeros(T, H, dtype=acc_dtype, device=x_TH.device)
    if y_SH is not None:
        return out_TH.index_add_(0, slots.tok_S, y_SH.mul_(weights_S.unsqueeze(-1))).to(x_TH.dtype)
    ends = list(accumulate(slots.counts))
    for c0, c1 in _chunk_bounds(slots.counts, max(MIN_CHUNK_ROWS, -(-S // CHUNKS_PER_CALL))):
        # (expert, first row, end row) of each expert's slots inside this chunk, chunk-relative
        segments = [(e, max(end - n, c0) - c0, min(end, c1) - c0)
                    for e, (n, end) in enumerate(zip(slots.counts, ends)) if n and end > c0 and end - n < c1]
        tok_C = slots.tok_S[c0:c1]
        x_CH = x_TH.index_select(0, tok_C)
        h_CN = x_TH.new_empty(c1 - c0, N)
        for e, lo, hi in segments:
            _linear_into(h_CN[lo:hi], x_CH[lo:hi], w_up_ENH[e], _bias(b_up_EN, e))
        del x_CH
        a_CI = apply_activation(h_CN, activation, glu, alpha, limit)
        del h_CN
        y_CH = x_TH.new_empty(c1 - c0, H)
        for e, lo, hi in segments:
            _linear_into(y_CH[lo:hi], a_CI[lo:hi], w_down_EHI[e], _bias(b_down_EH, e))
        del a_CI
        y_CH = y_CH.to(acc_dtype).mul_(weights_S[c0:c1].unsqueeze(-1))
        out_TH.index_add_(0, tok_C, y_CH)
    return out_TH.to(x_TH.dtype)


def experts_backward(
    grad_out_TH: torch.Tensor,
    x_TH: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    w_up_ENH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    b_up_EN: torch.Tensor | None,
    b_down_EH: torch.Tensor | None,
    activation: str,
    glu: str,
    alpha: float,
    limit: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of experts_forward, recomputing each expert's up-projection instead of storing it.

    Returns (grad_x [T, H], grad_topk_weights [T, K], grad_w_up [E, N, H], grad_w_down [E, H, I],
    grad_b_up [E, N] or [0], grad_b_down [E, H] or [0]).
    """
    T, H = x_TH.shape
    K = topk_ids_TK.shape[1]
    acc = torch.promote_types(x_TH.dtype, torch.float32)
    grad_x_TH = torch.zeros(T, H, dtype=acc, device=x_TH.device)
    grad_w_S = torch.zeros(T * K, dtype=acc, device=x_TH.device)
    grad_w_up = torch.zeros(w_up_ENH.shape, dtype=w_up_ENH.dtype, device=w_up_ENH.device)
    grad_w_down = torch.zeros(w_down_EHI.shape, dtype=w_down_EHI.dtype, device=w_down_EHI.device)
    grad_b_up = torch.zeros_like(b_up_EN) if b_up_EN is not None else x_TH.new_zeros(0)
    grad_b_down = torch.zeros_like(b_down_EH) if b_down_EH is not None else x_TH.new_zeros(0)
    weights_S = topk_weights_TK.reshape(-1)
    for e, tok_M, slot_M in _expert_groups(topk_ids_TK, w_up_ENH.shape[0]):
        dx, dw_up, dw_down, db_up, db_down, d_scale = mlp_backward(
            grad_out_TH.index_select(0, tok_M), weights_S.index_select(0, slot_M), x_TH.index_select(0, tok_M),
            w_up_ENH[e], w_down_EHI[e], _bias(b_up_EN, e), _bias(b_down_EH, e), activation, glu, alpha, limit)
        grad_w_S[slot_M] = d_scale
        grad_w_up[e] = dw_up
        grad_w_down[e] = dw_down
        if db_up is not None:
            grad_b_up[e] = db_up
        if db_down is not None:
            grad_b_down[e] = db_down
        grad_x_TH.index_add_(0, tok_M, dx)
    return (
        grad_x_TH.to(x_TH.dtype),
        grad_w_S.view(T, K).to(topk_weights_TK.dtype),
        grad_w_up,
        grad_w_down,
        grad_b_up,
        grad_b_down,
    )


__all__ = ["experts_forward", "experts_backward", "mlp_backward", "mlp_forward"]
