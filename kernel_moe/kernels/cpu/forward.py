"""The CPU backend's forward of the routed experts: how a call runs on CPU, chosen per call.

It runs inside the custom op, where it is opaque to the compiler, so it may read token counts on
the host. On CPU each small tensor op costs microseconds, so the forward is built to issue few:
- with the native kernels (``extension.py``), decode and small batches run in one native call
  on grouped matrix-vector products that read each active expert's weights once at close to
  memory bandwidth (``matvec_experts.cpp``; oneDNN and MKL read cold weights at a third of it
  for such shapes), and larger batches run the native fused forward: tasks of one expert's rows
  (gather, both GEMMs, activation) run concurrently, one thread each, then a weighted combine per token;
- without them (switched off, not buildable, fp64, other devices): one token runs its K experts
  as one strided batched GEMM per projection; small batches run runs of experts as batched
  GEMMs over strided views of the stacked weights; large batches sort slots by expert once,
  gather token rows with one ``index_select``, run each expert's rows as one GEMM into a shared
  buffer, and apply activation, routing-weight scale and combine once per chunk of at most
  ``max(MIN_CHUNK_ROWS, S / CHUNKS_PER_CALL)`` slots.
Dropped slots (ids outside [0, E)) are left out of the sort: they contribute nothing.

Legend: T tokens, H hidden, E experts, K top-k, N up features, I intermediate, S = T*K slots
(S' kept slots), C slots of one chunk, M tokens of one expert, B experts of one batched run.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate
from typing import NamedTuple

import torch

from kernel_moe.kernels.activations import apply_activation
from kernel_moe.kernels.annotate import COMBINE, DISPATCH, DOWN, FUSED, UP, stage
from kernel_moe.kernels.contract import StackedExperts
from kernel_moe.kernels.cpu.extension import cpu_extension
from kernel_moe.kernels.cpu.mlp import FORMAT_CODES, expert_of, mlp_forward

MIN_CHUNK_ROWS = 512
QUANTIZED_BLOCK_ROWS = 4096  # rows of one quantized expert per pair of GEMMs (bounds the intermediates)
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
# quantized experts: the native matrix-vector kernel reads 1 (or 0.5) byte per weight where the
# PyTorch path dequantizes each active expert whole; it is used up to this many rows per expert
QUANTIZED_MAX_MEAN_ROWS = 16


class SortedSlots(NamedTuple):
    """The kept token-expert slots in expert order (stable, so slot order within an expert)."""

    counts: list[int]  # slots per expert, length E (dropped slots in none)
    order_S: torch.Tensor  # [S'] slot index (t * K + j) of each sorted position
    tok_S: torch.Tensor  # [S'] token of each sorted position


def sort_slots(topk_ids_TK: torch.Tensor, num_experts: int) -> SortedSlots:
    """Sort the slots by expert id, leaving out dropped slots (ids outside [0, E))."""
    K = topk_ids_TK.shape[1]
    ids_S = topk_ids_TK.reshape(-1)
    if ids_S.numel() <= HOST_SORT_MAX_SLOTS and ids_S.device.type == "cpu":
        return _sort_slots_on_host(ids_S.tolist(), K, num_experts)
    try:
        counts_E = torch.bincount(ids_S, minlength=num_experts)
        clean = counts_E.numel() == num_experts
    except RuntimeError:  # a negative id
        clean = False
    if clean:
        order_S = torch.sort(ids_S, stable=True).indices
    else:  # some slots are dropped: sort the kept ones
        kept_S = ((ids_S >= 0) & (ids_S < num_experts)).nonzero().squeeze(1)
        kept_ids = ids_S.index_select(0, kept_S)
        counts_E = torch.bincount(kept_ids, minlength=num_experts)
        order_S = kept_S.index_select(0, torch.sort(kept_ids, stable=True).indices)
    return SortedSlots(counts_E.tolist(), order_S, order_S // K)


def _sort_slots_on_host(ids: list[int], K: int, num_experts: int) -> SortedSlots:
    """sort_slots for a few slots (decode): plain Python lists, three tensor ops fewer."""
    counts = [0] * num_experts
    kept = []
    for slot, e in enumerate(ids):
        if 0 <= e < num_experts:
            counts[e] += 1
            kept.append(slot)
    order = sorted(kept, key=ids.__getitem__)  # stable
    return SortedSlots(counts, torch.tensor(order, dtype=torch.int64), torch.tensor([o // K for o in order],
                                                                                   dtype=torch.int64))


def expert_groups(topk_ids_TK: torch.Tensor, num_experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (expert, token indices [M], slot indices [M]) for each expert with kept slots, in
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


def _expert_view(w: torch.Tensor | None, first: int, step: int, count: int) -> torch.Tensor | None:
    """Experts first, first + step, ... of a stacked [E, ...] tensor as a [count, ...] view (no copy)."""
    if w is None:
        return None
    st = w.stride()
    return w.as_strided((count, *w.shape[1:]), (step * st[0], *st[1:]), w.storage_offset() + first * st[0])


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


def _run_mlp(x_BMH: torch.Tensor, first: int, step: int, experts: StackedExperts) -> torch.Tensor:
    """Experts first, first + step, ... (B of them) on their rows: [B, M, H] -> [B, M, H],
    one batched GEMM per projection over strided views of the stacked weights."""
    B = x_BMH.shape[0]
    w_up, w_down, b_up, b_down = (_expert_view(w, first, step, B) for w in experts[:4])
    with stage(UP):
        a_BMI = apply_activation(_batched_linear(x_BMH, w_up, b_up), experts.activation)
    with stage(DOWN):
        return _batched_linear(a_BMI, w_down, b_down)


def _batched_linear(x_BMY: torch.Tensor, w_BXY: torch.Tensor, b_BX: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T (+ b) per batch: [B, M, Y] -> [B, M, X]."""
    if b_BX is None:
        return torch.bmm(x_BMY, w_BXY.transpose(1, 2))
    return torch.baddbmm(b_BX.unsqueeze(1), x_BMY, w_BXY.transpose(1, 2))


def _small_batch_rows(x_TH: torch.Tensor, slots: SortedSlots, experts: StackedExperts) -> torch.Tensor:
    """Expert outputs [S', H] (x's dtype, sorted-slot order) when experts get few rows each.

    Each run of experts (:func:`_expert_runs`) is one batched GEMM per projection over a
    strided view of the stacked weights, its experts' rows zero-padded to the longest: a
    GEMV per expert leaves one of two cores idle and pays a call per expert, a batched one
    spreads experts over the threads. A run whose padding would more than double its rows
    (with one thread: that needs any padding) runs expert by expert instead.
    """
    H = x_TH.shape[1]
    with stage(DISPATCH):
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
            outs.append(mlp_forward(x_MH, expert_of(experts, first, x_TH.dtype), experts.activation))
            continue
        pos = None
        if min(rows) == m:
            x_BMH = x_MH.view(count, m, H)
        else:  # row r of the run's i-th expert sits at i * m + r
            with stage(DISPATCH):
                pos = torch.tensor([i * m + r for i, n in enumerate(rows) for r in range(n)], device=x_TH.device)
                x_BMH = x_TH.new_zeros(count * m, H).index_copy_(0, pos, x_MH).view(count, m, H)
        y = _run_mlp(x_BMH, first, step, experts).view(-1, H)
        outs.append(y if pos is None else y.index_select(0, pos))
    if len(outs) == 1:
        return outs[0]
    with stage(COMBINE):
        return torch.cat(outs)


def _single_token_forward(x_1H: torch.Tensor, topk_weights_1K: torch.Tensor, topk_ids_1K: torch.Tensor,
                          experts: StackedExperts) -> torch.Tensor:
    """Decode of one token on CPU, in as few tensor ops as possible (each costs microseconds,
    more once other layers have evicted the caches): the K experts as one strided batched GEMM
    per projection when their ids are equally spaced and the dtype allows it
    (:func:`_expert_runs`), else one GEMM per expert; then out = w [1, K] @ y [K, H] in fp32.
    Dropped slots are left out."""
    E, H = experts.num_experts, x_1H.shape[1]
    ids = topk_ids_1K[0].tolist()
    kept = [j for j, e in enumerate(ids) if 0 <= e < E]
    acc_dtype = torch.promote_types(x_1H.dtype, torch.float32)
    if not kept:
        return x_1H.new_zeros(1, H)
    weights_1K = topk_weights_1K.to(acc_dtype)
    if len(kept) < len(ids):
        ids = [ids[j] for j in kept]
        weights_1K = weights_1K[:, kept]
    K = len(ids)
    run = None if experts.quantized else _strided_run(ids, x_1H.dtype)
    if run is not None:
        order = sorted(range(K), key=ids.__getitem__)
        y_KH = _run_mlp(x_1H.expand(K, 1, H), run[0], run[1], experts).view(K, H)
        weights_1K = weights_1K[:, order]
    else:
        y_KH = torch.cat([mlp_forward(x_1H, expert_of(experts, e, x_1H.dtype), experts.activation) for e in ids])
    with stage(COMBINE):
        return torch.mm(weights_1K, y_KH.to(acc_dtype)).to(x_1H.dtype)


def _matvec_fits(x_TH: torch.Tensor, experts: StackedExperts, S: int) -> bool:
    """Whether the native grouped matrix-vector kernel takes these tensors: fp32 or bf16
    weights of x's dtype with unit stride along the input features, or quantized weights; few slots."""
    w_up, w_down = experts.w_up, experts.w_down
    if experts.quantized:
        return S <= MIN_CHUNK_ROWS and x_TH.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return (x_TH.dtype in NATIVE_MAX_MEAN_ROWS and S <= MIN_CHUNK_ROWS and w_up.dtype == x_TH.dtype
            and w_down.dtype == x_TH.dtype and w_up.stride(-1) == 1 and w_down.stride(-1) == 1)


def _fused_fits(x_TH: torch.Tensor, experts: StackedExperts) -> bool:
    """Whether the native fused forward takes these tensors: fp32, bf16 or fp16, weights (unless
    quantized, which it dequantizes tile by tile) and biases of x's dtype."""
    weights = () if experts.quantized else experts[:2]
    return x_TH.dtype in FUSED_DTYPES and all(w is None or w.dtype == x_TH.dtype for w in (*weights, *experts[2:4]))


def _native_weights(experts: StackedExperts) -> tuple:
    """(w_up, w_down, w_up_scale, w_down_scale, format code) as the native kernels take them:
    quantized weights as bytes with their scales and code, full-precision ones as they are with no
    scales and code 0."""
    if not experts.quantized:
        return experts.w_up, experts.w_down, None, None, 0
    return (experts.w_up.view(torch.uint8), experts.w_down.view(torch.uint8), experts.w_up_scale,
            experts.w_down_scale, FORMAT_CODES[experts.weight_format])


def _chunked_forward(x_TH: torch.Tensor, weights_S: torch.Tensor, slots: SortedSlots,
                     experts: StackedExperts) -> torch.Tensor:
    """Large batches without the native kernels: sorted slots in chunks of per-expert GEMMs
    written into shared buffers; activation, scale and combine once per chunk. [T, H] acc dtype."""
    T, H = x_TH.shape
    N = experts.w_up.shape[1]
    with stage(COMBINE):
        out_TH = torch.zeros(T, H, dtype=weights_S.dtype, device=x_TH.device)
    S = slots.order_S.shape[0]
    ends = list(accumulate(slots.counts))
    for c0, c1 in _chunk_bounds(slots.counts, max(MIN_CHUNK_ROWS, -(-S // CHUNKS_PER_CALL))):
        with stage(DISPATCH):
            # (expert, first row, end row) of each expert's slots inside this chunk, chunk-relative
            segments = [(e, max(end - n, c0) - c0, min(end, c1) - c0)
                        for e, (n, end) in enumerate(zip(slots.counts, ends)) if n and end > c0 and end - n < c1]
            tok_C = slots.tok_S[c0:c1]
            x_CH = x_TH.index_select(0, tok_C)
        with stage(UP):
            h_CN = x_TH.new_empty(c1 - c0, N)
            for e, lo, hi in segments:
                ex = expert_of(experts, e)
                _linear_into(h_CN[lo:hi], x_CH[lo:hi], ex.w_up, ex.b_up)
            del x_CH
            a_CI = apply_activation(h_CN, experts.activation)
            del h_CN
        with stage(DOWN):
            y_CH = x_TH.new_empty(c1 - c0, H)
            for e, lo, hi in segments:
                ex = expert_of(experts, e)
                _linear_into(y_CH[lo:hi], a_CI[lo:hi], ex.w_down, ex.b_down)
            del a_CI
        with stage(COMBINE):
            out_TH.index_add_(0, tok_C, y_CH.to(weights_S.dtype).mul_(weights_S[c0:c1].unsqueeze(-1)))
    return out_TH


def _per_expert_forward(x_TH: torch.Tensor, weights_S: torch.Tensor, slots: SortedSlots,
                        experts: StackedExperts) -> torch.Tensor:
    """Large batches of quantized experts: each active expert dequantized once per call (one alive
    at a time, never the whole stack), then its rows' two GEMMs in blocks of QUANTIZED_BLOCK_ROWS,
    weighted and combined. [T, H] in the accumulation dtype (weights_S's)."""
    T, H = x_TH.shape
    out_TH = torch.zeros(T, H, dtype=weights_S.dtype, device=x_TH.device)
    start = 0
    for e, n in enumerate(slots.counts):
        if n == 0:
            continue
        ex = expert_of(experts, e, x_TH.dtype)  # the dequantized transient of this expert
        for lo in range(start, start + n, QUANTIZED_BLOCK_ROWS):
            hi = min(lo + QUANTIZED_BLOCK_ROWS, start + n)
            with stage(DISPATCH):
                tok_M = slots.tok_S[lo:hi]
                x_MH = x_TH.index_select(0, tok_M)
            y_MH = mlp_forward(x_MH, ex, experts.activation)
            with stage(COMBINE):
                out_TH.index_add_(0, tok_M, y_MH.to(weights_S.dtype).mul_(weights_S[lo:hi].unsqueeze(-1)))
        start += n
        del ex
    return out_TH


def experts_forward(x_TH: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                    experts: StackedExperts) -> torch.Tensor:
    """out[t] = sum over kept j of w[t, j] * expert_{id[t, j]}(x[t]); accumulated in fp32,
    returned in x's dtype.

    With the native CPU extension: its matrix-vector forward when experts get few slots each
    (decode, small batches; ``matvec_experts``), else its fused forward, which runs the experts'
    work concurrently. Without it: strided batched GEMMs for few slots per
    expert (:func:`_small_batch_rows`, :func:`_single_token_forward`), else sorted slots in
    chunks of per-expert GEMMs (:func:`_chunked_forward`).
    """
    T, H = x_TH.shape
    acc_dtype = torch.promote_types(x_TH.dtype, torch.float32)
    if topk_ids_TK.numel() == 0:
        return x_TH.new_zeros(T, H)
    S = topk_ids_TK.numel()
    ext = cpu_extension() if x_TH.device.type == "cpu" else None
    matvec = ext is not None and _matvec_fits(x_TH, experts, S)
    if T == 1 and not matvec and x_TH.device.type == "cpu":
        return _single_token_forward(x_TH, topk_weights_TK, topk_ids_TK, experts)
    # one dispatch range (a decode call opens one range per stage): sort, choose the path, gather
    with stage(DISPATCH):
        slots = sort_slots(topk_ids_TK, experts.num_experts)
        active = sum(1 for n in slots.counts if n)
        matvec = matvec and S <= (QUANTIZED_MAX_MEAN_ROWS if experts.quantized
                                  else NATIVE_MAX_MEAN_ROWS[x_TH.dtype]) * active
        fused = ext is not None and not matvec and _fused_fits(x_TH, experts)
        if active and not fused and not matvec:
            weights_S = topk_weights_TK.reshape(-1).index_select(0, slots.order_S).to(acc_dtype)
    if not active:  # every slot dropped
        return x_TH.new_zeros(T, H)
    if fused or matvec:
        # gather, up-projection, activation, down-projection and combine in one native call: the
        # matrix-vector one (no ATen parallel region, see matvec_experts.cpp) or the batch one
        act = experts.activation
        kernel = ext.matvec_experts if matvec else ext.fused_experts
        with stage(FUSED):
            w_up, w_down, up_scale, down_scale, code = _native_weights(experts)
            return kernel(x_TH, topk_weights_TK, slots.order_S, slots.counts, w_up, w_down, *experts[2:4], act.kind,
                          act.glu, act.alpha, act.limit, act.gate_softcap, act.up_softcap, up_scale, down_scale, code)
    if experts.quantized:
        return _per_expert_forward(x_TH, weights_S, slots, experts).to(x_TH.dtype)
    elif S <= MIN_CHUNK_ROWS and S <= SMALL_BATCH_MEAN_ROWS * active:
        y_SH = _small_batch_rows(x_TH, slots, experts).to(acc_dtype)
    else:
        return _chunked_forward(x_TH, weights_S, slots, experts).to(x_TH.dtype)
    with stage(COMBINE):
        out_TH = torch.zeros(T, H, dtype=acc_dtype, device=x_TH.device)
        return out_TH.index_add_(0, slots.tok_S, y_SH.mul_(weights_S.unsqueeze(-1))).to(x_TH.dtype)


def dense_forward(x_TH: torch.Tensor, experts: StackedExperts) -> torch.Tensor:
    """A dense call (one expert, weight 1 for every token): [T, H] -> [T, H] in x's dtype."""
    return mlp_forward(x_TH, expert_of(experts, 0, x_TH.dtype), experts.activation).to(x_TH.dtype)


__all__ = ["SortedSlots", "dense_forward", "expert_groups", "experts_forward", "sort_slots"]
