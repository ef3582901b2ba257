"""Routing kernels: top-k gating of router logits and the expert-aligned slot layout.

Legend: T tokens, E experts, K experts per token (top-k), S = T*K token-expert slots
(slot s = t*K + j is the j-th choice of token t), NB blocks of slots, B blocks of
``block_m`` rows of the padded layout, P = B*block_m padded rows.

The aligned layout is the one the grouped GEMMs read (as in vLLM's block alignment): slots
sorted by expert, stable by slot index, each expert's run padded to a multiple of
``block_m`` with the sentinel S, and a map from each block of rows to its expert. Every
buffer is sized to an upper bound known from shapes alone, so nothing waits on the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernel_moe.kernels.triton.common import launch_device, next_pow2
from kernel_moe.routing.topk import RoutingSpec

_SMALL_ALIGN_ELEMENTS = 16384  # one-program alignment when next_pow2(S) * next_pow2(E) fits this
_HIST_ELEMENTS = 8192  # slots x experts tile of the multi-program alignment


# --------------------------------------------------------------------------------------
# top-k gating
# --------------------------------------------------------------------------------------


@triton.jit
def _topk_gating_kernel(
    logits_ptr,  # [T, E] router logits, any float dtype, strides (stride_lt, stride_le)
    weights_ptr,  # [T, TOP_K] float32 routing weights out, contiguous
    ids_ptr,  # [T, TOP_K] int64 expert ids out, contiguous
    T,
    E,
    stride_lt,
    stride_le,
    scaling,
    TOP_K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    TOPK_FIRST: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Scores, top-k selection and weights for BLOCK_T tokens per program.

    Grid: (cdiv(T, BLOCK_T),). Scores in fp32: softmax over E or sigmoid; with TOPK_FIRST the
    k largest logits are selected first and the softmax runs over those k only. Selection is
    an iterative argmax: ties go to the lowest expert index, NaN ranks above everything (as
    torch.topk); results come out in descending order.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    cols = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    row_ok = rows < T
    col_ok = cols < E
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_lt + cols[None, :] * stride_le
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
    x = tl.where(row_ok[:, None], x, 0.0)  # padding rows: finite values, never stored

    if TOPK_FIRST:
        scores = x
    elif SOFTMAX:
        row_max = tl.max(x, axis=1)
        p = tl.exp(x - row_max[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        scores = p / tl.sum(p, axis=1)[:, None]
    else:
        scores = tl.sigmoid(x)

    key = tl.where(scores != scores, float("inf"), scores)  # NaN selected first
    taken = (cols[None, :] >= E) & (rows[:, None] >= 0)  # [BLOCK_T, BLOCK_E]; padding columns never chosen
    kcols = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    vals = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    idx = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        avail = tl.where(taken, float("-inf"), key)
        best = tl.max(avail, axis=1)
        is_best = (avail == best[:, None]) & (taken == 0)
        choice = tl.min(tl.where(is_best, cols[None, :], BLOCK_E), axis=1)  # [BLOCK_T] lowest index of the max
        sel = cols[None, :] == choice[:, None]
        val = tl.sum(tl.where(sel, scores, 0.0), axis=1)
        vals = tl.where(kcols[None, :] == j, val[:, None], vals)
        idx = tl.where(kcols[None, :] == j, choice[:, None], idx)
        taken = taken | sel

    k_ok = kcols[None, :] < TOP_K
    if TOPK_FIRST:
        top = tl.max(tl.where(k_ok, vals, float("-inf")), axis=1)
        p = tl.where(k_ok, tl.exp(vals - top[:, None]), 0.0)
        vals = p / tl.sum(p, axis=1)[:, None]
    elif RENORMALIZE:
        denom = tl.sum(tl.where(k_ok, vals, 0.0), axis=1)
        if not SOFTMAX:
            denom = denom + 1e-20
        vals = vals / denom[:, None]
    vals = vals * scaling

    out_offs = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
    out_mask = row_ok[:, None] & k_ok
    tl.store(weights_ptr + out_offs, vals, mask=out_mask)
    tl.store(ids_ptr + out_offs, idx.to(tl.int64), mask=out_mask)


def topk_gating(
    logits_TE: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    order: str = "score_then_topk",
    renormalize: bool = False,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (routing weights [T, K] float32, expert ids [T, K] int64).

    The same math as :func:`kernel_moe.routing.topk.route` with
    ``RoutingSpec(E, top_k, scoring, order, renormalize, scaling)`` (one group, fp32
    scores), in one Triton launch; arguments are validated by RoutingSpec.
    """
    if logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must be 2-D [T, E], got shape {tuple(logits_TE.shape)}")
    if not logits_TE.is_floating_point():
        raise ValueError(f"logits_TE must be a floating-point tensor, got dtype {logits_TE.dtype}")
    T, E = logits_TE.shape
    spec = RoutingSpec(E, top_k, scoring, order, renormalize, float(scaling))
    weights_TK = torch.empty(T, top_k, dtype=torch.float32, device=logits_TE.device)
    ids_TK = torch.empty(T, top_k, dtype=torch.int64, device=logits_TE.device)
    if T == 0:
        return weights_TK, ids_TK
    block_e = max(16, next_pow2(E))
    block_t = max(1, min(64, 4096 // block_e))
    grid = (triton.cdiv(T, block_t),)
    with launch_device(logits_TE):
        _topk_gating_kernel[grid](
            logits_TE,
            weights_TK,
            ids_TK,
            T,
            E,
            logits_TE.stride(0),
            logits_TE.stride(1),
            float(spec.scaling),
            TOP_K=top_k,
            SOFTMAX=spec.scoring == "softmax",
            TOPK_FIRST=spec.order == "topk_then_score",
            RENORMALIZE=spec.renormalize,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            BLOCK_K=max(2, next_pow2(top_k)),
            num_warps=4 if block_e <= 256 else 8,
        )
    return weights_TK, ids_TK


# --------------------------------------------------------------------------------------
# expert alignment
# --------------------------------------------------------------------------------------


class AlignedRouting(NamedTuple):
    """Slots grouped by expert (all int32, on the device of the ids).

    - ``counts_E`` [E]: slots routed to each expert (sums to S when no slot is dropped).
    - ``offsets_E1`` [E+1]: exclusive prefix of ``counts_E``; expert e owns sorted
      positions ``offsets[e]:offsets[e+1]``.
    - ``sorted_slots_S`` [S]: slot ids ordered by expert, stable by slot index; positions
      from ``offsets[E]`` on (left by dropped slots) hold the sentinel S.
    - ``inverse_S`` [S]: sorted position of each slot (``sorted_slots[inverse[s]] == s``);
      -1 for a dropped slot.
    - ``padded_slots_P`` [P]: the sorted slots with each expert's run padded to a multiple
      of ``block_m`` by the sentinel S; P = num_blocks * block_m.
    - ``padded_offsets_E1`` [E+1]: exclusive prefix of the padded run lengths (rows).
    - ``block_expert_B`` [B]: expert of each block of ``block_m`` padded rows; -1 past the
      last used block. B = ceil(S / block_m) + E, an upper bound of the blocks used.
    - ``block_m``: rows per block; ``num_slots``: S.
    - ``ids_TK`` [T, K]: the ids the layout was built from (a reference, not a copy): the
      reduction over K reads them to skip dropped slots; ``top_k`` is K.
    """

    counts_E: torch.Tensor
    offsets_E1: torch.Tensor
    sorted_slots_S: torch.Tensor
    inverse_S: torch.Tensor
    padded_slots_P: torch.Tensor
    padded_offsets_E1: torch.Tensor
    block_expert_B: torch.Tensor
    block_m: int
    num_slots: int
    ids_TK: torch.Tensor

    @property
    def top_k(self) -> int:
        """K, the slots per token."""
        return self.ids_TK.shape[1]

    @property
    def num_blocks(self) -> int:
        """Upper bound B of used blocks (the length of ``block_expert_B``)."""
        return self.block_expert_B.shape[0]


@triton.jit
def _load_slot_ids(
    ids_ptr,  # [T, TOP_K] expert id per slot (int32/int64), strides (stride_it, stride_ik)
    s,
    s_ok,
    E,
    TOP_K,
    stride_it,
    stride_ik,
):
    """(expert id of each slot in ``s`` as int32, slot kept). An id outside [0, E) marks a
    dropped slot and comes back as -1: the range is checked at the ids' own width, before the
    narrowing, so that no int64 id aliases an expert."""
    raw = tl.load(ids_ptr + (s // TOP_K) * stride_it + (s % TOP_K) * stride_ik, mask=s_ok, other=-1)
    valid = s_ok & (raw >= 0) & (raw < E)
    return tl.where(valid, raw, -1).to(tl.int32), valid


@triton.jit
def _expert_of_blocks(padded_incl, e_ok, blk, total_padded, BLOCK_M: tl.constexpr):
    """Expert owning each block id in ``blk`` ([CHUNK]); -1 for blocks past the padded end.

    ``padded_incl`` [BLOCK_E] is the inclusive prefix of padded run lengths: the owner of a
    block is the number of experts whose padded run ends at or before the block's first row.
    """
    start = blk * BLOCK_M  # [CHUNK]
    ended = (padded_incl[None, :] <= start[:, None]) & e_ok[None, :]
    owner = tl.sum(ended.to(tl.int32), axis=1)
    return tl.where(start < total_padded, owner, -1)


@triton.jit
def _align_single_kernel(
    ids_ptr,  # [T, TOP_K] expert id per slot (int32/int64), strides (stride_it, stride_ik)
    counts_ptr,  # [E] int32 out
    offsets_ptr,  # [E+1] int32 out
    sorted_ptr,  # [S] int32 out: slot ids sorted by expert
    inverse_ptr,  # [S] int32 out: sorted position of each slot
    padded_ptr,  # [B * BLOCK_M] int32 out: padded sorted slots (sentinel S)
    padded_offsets_ptr,  # [E+1] int32 out
    block_expert_ptr,  # [B] int32 out
    S,
    E,
    B,
    TOP_K,
    stride_it,
    stride_ik,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """The whole alignment in one program, for small S (decode).

    Grid: (1,). A [BLOCK_S, BLOCK_E] one-hot of slot -> expert gives the counts (column sums)
    and each slot's rank among the slots of its expert (column-wise inclusive scan).
    """
    s = tl.arange(0, BLOCK_S)
    s_ok = s < S
    ids, valid = _load_slot_ids(ids_ptr, s, s_ok, E, TOP_K, stride_it, stride_ik)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    onehot = ((ids[:, None] == e[None, :]) & valid[:, None]).to(tl.int32)  # [BLOCK_S, BLOCK_E]
    counts = tl.sum(onehot, axis=0)  # [BLOCK_E]
    incl = tl.cumsum(counts, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_incl = tl.cumsum(padded, axis=0)
    total_padded = tl.sum(padded, axis=0)
    tl.store(counts_ptr + e, counts, mask=e_ok)
    tl.store(offsets_ptr + e, incl - counts, mask=e_ok)
    tl.store(offsets_ptr + E, tl.sum(counts, axis=0))
    tl.store(padded_offsets_ptr + e, padded_incl - padded, mask=e_ok)
    tl.store(padded_offsets_ptr + E, total_padded)

    for b0 in range(0, B, CHUNK):
        blk = b0 + tl.arange(0, CHUNK)
        blk_ok = blk < B
        tl.store(block_expert_ptr + blk, _expert_of_blocks(padded_incl, e_ok, blk, total_padded, BLOCK_M), mask=blk_ok)
        rows = blk[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        sentinel = tl.zeros((CHUNK, BLOCK_M), dtype=tl.int32) + S
        tl.store(padded_ptr + rows, sentinel, mask=blk_ok[:, None])
    tl.debug_barrier()

    rank = tl.sum(onehot * tl.cumsum(onehot, axis=0), axis=1) - 1  # [BLOCK_S]
    start = tl.sum(onehot * (incl - counts)[None, :], axis=1)
    padded_start = tl.sum(onehot * (padded_incl - padded)[None, :], axis=1)
    pos = start + rank
    tl.store(sorted_ptr + s, tl.zeros_like(s) + S, mask=s_ok & (s >= tl.sum(counts, axis=0)))  # tail of drops
    tl.store(sorted_ptr + pos, s, mask=valid)
    tl.store(inverse_ptr + s, tl.where(valid, pos, -1), mask=s_ok)
    tl.store(padded_ptr + padded_start + rank, s, mask=valid)


@triton.jit
def _align_histogram_kernel(
    ids_ptr,  # [T, TOP_K] expert id per slot (int32/int64), strides (stride_it, stride_ik)
    block_counts_ptr,  # [NB, E] int32 out: slots of each expert in each block of BLOCK_S slots
    S,
    E,
    TOP_K,
    stride_it,
    stride_ik,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Per-block expert histogram. Grid: (NB = cdiv(S, BLOCK_S),). No atomics."""
    b = tl.program_id(0)
    s = b * BLOCK_S + tl.arange(0, BLOCK_S)
    ids, _ = _load_slot_ids(ids_ptr, s, s < S, E, TOP_K, stride_it, stride_ik)
    e = tl.arange(0, BLOCK_E)
    counts = tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)  # dropped slots (-1) land nowhere
    tl.store(block_counts_ptr + b.to(tl.int64) * E + e, counts, mask=e < E)


@triton.jit
def _align_scan_kernel(
    block_counts_ptr,  # [NB, E] int32 in: per-block counts; out: exclusive prefix over blocks
    counts_ptr,  # [E] int32 out: total slots per expert
    NB,
    E,
    CHUNK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Column-wise exclusive scan of the block histogram, in place.

    Grid: (cdiv(E, BLOCK_E),): each program scans BLOCK_E experts over all NB blocks,
    CHUNK_B blocks at a time.
    """
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    carry = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for b0 in range(0, NB, CHUNK_B):
        b = b0 + tl.arange(0, CHUNK_B)
        mask = (b < NB)[:, None] & e_ok[None, :]
        ptrs = block_counts_ptr + b.to(tl.int64)[:, None] * E + e[None, :]
        c = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(c, axis=0) - c + carry[None, :], mask=mask)
        carry += tl.sum(c, axis=0)
    tl.store(counts_ptr + e, carry, mask=e_ok)


@triton.jit
def _align_layout_kernel(
    counts_ptr,  # [E] int32 in
    offsets_ptr,  # [E+1] int32 out
    padded_offsets_ptr,  # [E+1] int32 out
    block_expert_ptr,  # [B] int32 out
    padded_ptr,  # [B * BLOCK_M] int32 out: filled with the sentinel S (the scatter overwrites real slots)
    S,
    E,
    B,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Expert offsets, padded offsets, block -> expert map and sentinel fill.

    Grid: (cdiv(B, CHUNK),): every program recomputes the (cheap) prefix over E and handles
    CHUNK blocks; program 0 writes the offsets.
    """
    pid = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    counts = tl.load(counts_ptr + e, mask=e_ok, other=0)
    incl = tl.cumsum(counts, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_incl = tl.cumsum(padded, axis=0)
    total_padded = tl.sum(padded, axis=0)
    first = (tl.zeros((BLOCK_E,), dtype=tl.int32) + pid) == 0  # [BLOCK_E], only program 0 writes offsets
    tl.store(offsets_ptr + e, incl - counts, mask=e_ok & first)
    tl.store(offsets_ptr + E + e, tl.zeros_like(counts) + tl.sum(counts, axis=0), mask=(e == 0) & first)
    tl.store(padded_offsets_ptr + e, padded_incl - padded, mask=e_ok & first)
    tl.store(padded_offsets_ptr + E + e, tl.zeros_like(counts) + total_padded, mask=(e == 0) & first)

    blk = pid * CHUNK + tl.arange(0, CHUNK)
    blk_ok = blk < B
    tl.store(block_expert_ptr + blk, _expert_of_blocks(padded_incl, e_ok, blk, total_padded, BLOCK_M), mask=blk_ok)
    rows = blk.to(tl.int64)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    tl.store(padded_ptr + rows, tl.zeros((CHUNK, BLOCK_M), dtype=tl.int32) + S, mask=blk_ok[:, None])


@triton.jit
def _align_scatter_kernel(
    ids_ptr,  # [T, TOP_K] expert id per slot (int32/int64), strides (stride_it, stride_ik)
    block_base_ptr,  # [NB, E] int32: slots of each expert in earlier blocks
    offsets_ptr,  # [E+1] int32
    padded_offsets_ptr,  # [E+1] int32
    sorted_ptr,  # [S] int32 out
    inverse_ptr,  # [S] int32 out
    padded_ptr,  # [B * BLOCK_M] int32 out (real slots only)
    S,
    E,
    TOP_K,
    stride_it,
    stride_ik,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Place every slot at its sorted position. Grid: (NB = cdiv(S, BLOCK_S),).

    position = offsets[e] + (slots of e in earlier blocks) + (rank of the slot among the
    slots of e in its block): a stable counting sort, deterministic, without atomics.
    """
    b = tl.program_id(0)
    s = b * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    ids, valid = _load_slot_ids(ids_ptr, s, s_ok, E, TOP_K, stride_it, stride_ik)
    e = tl.arange(0, BLOCK_E)
    onehot = ((ids[:, None] == e[None, :]) & valid[:, None]).to(tl.int32)  # [BLOCK_S, BLOCK_E]
    rank = tl.sum(onehot * tl.cumsum(onehot, axis=0), axis=1) - 1
    safe_ids = tl.where(valid, ids, 0)
    base = tl.load(block_base_ptr + b.to(tl.int64) * E + safe_ids, mask=valid, other=0)
    start = tl.load(offsets_ptr + safe_ids, mask=valid, other=0)
    padded_start = tl.load(padded_offsets_ptr + safe_ids, mask=valid, other=0)
    pos = start + base + rank
    kept = tl.load(offsets_ptr + E)
    tl.store(sorted_ptr + s, tl.zeros_like(s) + S, mask=s_ok & (s >= kept))  # tail left by dropped slots
    tl.store(sorted_ptr + pos, s, mask=valid)
    tl.store(inverse_ptr + s, tl.where(valid, pos, -1), mask=s_ok)
    tl.store(padded_ptr + padded_start + base + rank, s, mask=valid)


def align_by_expert(ids_TK: torch.Tensor, num_experts: int, block_m: int, *, method: str = "auto") -> AlignedRouting:
    """Group the slots of ``ids_TK`` [T, K] by expert, on the device.

    An id outside [0, E) (capacity drop, expert-parallel sentinel) marks a dropped slot: it
    belongs to no expert and appears in no layout.
    ``method``: "single" runs one program (small S), "multi" runs histogram, scan, layout
    and scatter kernels; "auto" picks "single" when the [S, E] one-hot tile is small.
    No host synchronisation: every output is sized from shapes.
    """
    if ids_TK.dim() != 2:
        raise ValueError(f"ids_TK must be 2-D [T, K], got shape {tuple(ids_TK.shape)}")
    if ids_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids_TK.dtype={ids_TK.dtype}; allowed: torch.int32, torch.int64")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r}; allowed: an int >= 1")
    if not isinstance(block_m, int) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m!r}; allowed: a power of two >= 16")
    if method not in ("auto", "single", "multi"):
        raise ValueError(f"method={method!r}; allowed: auto, single, multi")
    T, K = ids_TK.shape
    S = T * K
    E = num_experts
    B = triton.cdiv(S, block_m) + E
    dev = ids_TK.device
    i32 = dict(dtype=torch.int32, device=dev)
    counts = torch.empty(E, **i32)
    offsets = torch.empty(E + 1, **i32)
    sorted_slots = torch.empty(S, **i32)
    inverse = torch.empty(S, **i32)
    padded_slots = torch.empty(B * block_m, **i32)
    padded_offsets = torch.empty(E + 1, **i32)
    block_expert = torch.empty(B, **i32)
    if S == 0:
        counts.zero_()
        offsets.zero_()
        padded_offsets.zero_()
        block_expert.fill_(-1)
        padded_slots.fill_(0)
        return AlignedRouting(
            counts, offsets, sorted_slots, inverse, padded_slots, padded_offsets, block_expert, block_m, 0, ids_TK
        )

    block_e = max(16, next_pow2(E))
    if method == "auto":
        method = "single" if next_pow2(S) * block_e <= _SMALL_ALIGN_ELEMENTS else "multi"
    with launch_device(ids_TK):
        if method == "single":
            _align_single_kernel[(1,)](
                ids_TK, counts, offsets, sorted_slots, inverse, padded_slots, padded_offsets, block_expert,
                S, E, B, K, ids_TK.stride(0), ids_TK.stride(1),
                BLOCK_M=block_m, BLOCK_S=max(16, next_pow2(S)), BLOCK_E=block_e, CHUNK=16,
            )  # fmt: skip
        else:
            block_s = max(16, min(1024, _HIST_ELEMENTS // block_e))
            NB = triton.cdiv(S, block_s)
            block_base = torch.empty(NB, E, **i32)
            _align_histogram_kernel[(NB,)](
                ids_TK, block_base, S, E, K, ids_TK.stride(0), ids_TK.stride(1), BLOCK_S=block_s, BLOCK_E=block_e
            )
            scan_e = 16  # more programs, fewer serial steps per program
            _align_scan_kernel[(triton.cdiv(E, scan_e),)](
                block_base, counts, NB, E, CHUNK_B=max(16, min(512, next_pow2(NB))), BLOCK_E=scan_e
            )
            chunk = max(16, min(256, 8192 // block_e))
            _align_layout_kernel[(triton.cdiv(B, chunk),)](
                counts, offsets, padded_offsets, block_expert, padded_slots, S, E, B,
                BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=chunk,
            )  # fmt: skip
            _align_scatter_kernel[(NB,)](
                ids_TK, block_base, offsets, padded_offsets, sorted_slots, inverse, padded_slots,
                S, E, K, ids_TK.stride(0), ids_TK.stride(1), BLOCK_S=block_s, BLOCK_E=block_e,
            )  # fmt: skip
    return AlignedRouting(
        counts, offsets, sorted_slots, inverse, padded_slots, padded_offsets, block_expert, block_m, S, ids_TK
    )
