"""Expert parallelism over torch.distributed: each rank of a group holds a contiguous share of a
layer's experts; a token's slots travel to the ranks that hold their experts and their outputs
come back, by ``all_to_all_single`` (gloo on CPU, NCCL on GPU).

Two dispatch modes:

- ``exact``: the per-rank slot counts are exchanged first (one small all-to-all, read on the
  host), then exactly the routed rows travel. Any token count per rank, zero included; eager
  inference and training.
- ``padded``: every rank sends a fixed buffer of ``capacity`` rows to every rank (capacity from a
  factor of the local slots), slots over capacity are dropped and counted, nothing is read on the
  host: ``torch.compile(fullgraph=True)`` and CUDA graphs can capture it. Every rank must then
  hold the same number of tokens (checked in eager mode).

Routing weights never travel: remote experts return unweighted outputs, the sending rank weights
and sums them, so the router's gradient is local. The backward runs through both all-to-alls
(``all_to_all_single_autograd``). Collectives are issued in the same order on every rank; a
failing one (a dead rank, a timeout of the group) raises :class:`ExpertParallelError`.

Legend: T tokens of this rank, H hidden, K top-k, E experts in all, W ranks, L = E / W experts
per rank, S = T*K slots, R rows received, C capacity rows per destination rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import _functional_collectives as funcol
from torch.distributed._functional_collectives import all_to_all_single_autograd

from kernel_moe.errors import KernelMoEError

MODES = ("exact", "padded")
# experts_fn(rows [R, H], expert ids [R, 1]: global ids of experts this rank holds, -1 = padding)
# -> unweighted outputs [R, H]; the op maps them to local experts by the contract's expert_map
ExpertsFn = Callable[[Tensor, Tensor], Tensor]


class ExpertParallelError(KernelMoEError):
    """A collective of the expert-parallel exchange failed (a rank died, left or timed out)."""


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this rank holds: ``[first, first + local)`` of ``num_experts``."""

    rank: int
    world: int
    num_experts: int

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"ExpertShard: rank={self.rank} is not in a group of world={self.world}")
        if self.num_experts % self.world != 0:
            raise ValueError(
                f"expert parallelism splits the experts evenly: num_experts={self.num_experts} is not divisible by "
                f"the group's world size {self.world}; allowed: a group whose size divides {self.num_experts}")

    @property
    def local(self) -> int:
        return self.num_experts // self.world

    @property
    def first(self) -> int:
        return self.rank * self.local

    def expert_map(self, device: torch.device | str | None = None) -> Tensor:
        """[E] int64: the local index of each expert this rank holds, -1 for the others."""
        ids = torch.arange(self.num_experts, device=device)
        held = (ids >= self.first) & (ids < self.first + self.local)
        return torch.where(held, ids - self.first, torch.full_like(ids, -1))


def shard_of(num_experts: int, group: dist.ProcessGroup | None = None) -> ExpertShard:
    """This rank's share of ``num_experts`` in ``group`` (default: the whole world)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("expert parallelism needs torch.distributed initialised (torchrun, init_process_group)")
    return ExpertShard(dist.get_rank(group), dist.get_world_size(group), num_experts)


def _collective(what: str, shard: ExpertShard, fn: Callable[[], Tensor]) -> Tensor:
    try:
        return fn()
    except (RuntimeError, dist.DistError) as exc:
        raise ExpertParallelError(f"expert-parallel {what} failed on rank {shard.rank} of {shard.world}: "
                                  f"{type(exc).__name__}: {str(exc)[:300]}") from exc


def _exchange_counts(send_W: Tensor, shard: ExpertShard, group) -> Tensor:
    recv_W = torch.empty_like(send_W)
    _collective("count exchange", shard, lambda: dist.all_to_all_single(recv_W, send_W, group=group))
    return recv_W


def _exchange_ids(ids: Tensor, recv_sizes: list[int] | None, send_sizes: list[int] | None, shard: ExpertShard,
                  group) -> Tensor:
    return _collective("id exchange", shard, lambda: funcol.all_to_all_single(
        ids.contiguous(), recv_sizes, send_sizes, group if group is not None else dist.group.WORLD))


def _exchange_rows(rows: Tensor, recv_sizes: list[int] | None, send_sizes: list[int] | None,
                   shard: ExpertShard, group) -> Tensor:
    return _collective("all-to-all", shard, lambda: all_to_all_single_autograd(
        rows.contiguous(), recv_sizes, send_sizes, group if group is not None else dist.group.WORLD))


def _dispatch_order(ids_S: Tensor, shard: ExpertShard) -> tuple[Tensor, Tensor]:
    """(destination rank of each slot [S], W for a dropped slot; slots sorted by destination [S])."""
    E, W = shard.num_experts, shard.world
    valid = (ids_S >= 0) & (ids_S < E)
    dest_S = torch.where(valid, ids_S.div(shard.local, rounding_mode="floor"), torch.full_like(ids_S, W))
    return dest_S, torch.sort(dest_S, stable=True).indices


def exact_exchange(x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor, experts_fn: ExpertsFn,
                   shard: ExpertShard, group=None) -> Tensor:
    """The ``exact`` mode: [T, H] -> [T, H] in x's dtype (fp32 accumulation)."""
    T, K = ids_TK.shape
    ids_S = ids_TK.reshape(-1).long()
    dest_S, order_S = _dispatch_order(ids_S, shard)
    send_W = torch.bincount(dest_S, minlength=shard.world + 1)[: shard.world]
    recv_W = _exchange_counts(send_W, shard, group)
    send, recv = send_W.tolist(), recv_W.tolist()
    kept_S = order_S[: sum(send)]  # the routed slots, by destination rank
    tok_S = kept_S.div(K, rounding_mode="floor")
    rows_RH = _exchange_rows(x_TH.index_select(0, tok_S), recv, send, shard, group)
    ids_R = _exchange_ids(ids_S.index_select(0, kept_S), recv, send, shard, group)
    y_RH = experts_fn(rows_RH, ids_R.unsqueeze(1))
    back_SH = _exchange_rows(y_RH, send, recv, shard, group)
    acc = torch.promote_types(x_TH.dtype, torch.float32)
    w_S = weights_TK.reshape(-1).index_select(0, kept_S).to(acc)
    out_TH = torch.zeros(T, x_TH.shape[1], dtype=acc, device=x_TH.device)
    return out_TH.index_add(0, tok_S, back_SH.to(acc) * w_S.unsqueeze(-1)).to(x_TH.dtype)


def padded_capacity(num_slots: int, world: int, capacity_factor: float) -> int:
    """Rows each rank sends to each rank in the padded mode: ceil(factor * S / W), at least 1."""
    return max(1, math.ceil(capacity_factor * num_slots / world))


def padded_exchange(x_TH: Tensor, weights_TK: Tensor, ids_TK: Tensor, experts_fn: ExpertsFn, shard: ExpertShard,
                    group=None, capacity_factor: float = 2.0) -> tuple[Tensor, Tensor]:
    """The ``padded`` mode: ([T, H] output, number of slots dropped over capacity, a 0-dim int64
    tensor). Fixed shapes and no host read: compiles with fullgraph=True."""
    T, K = ids_TK.shape
    W, H = shard.world, x_TH.shape[1]
    C = padded_capacity(T * K, W, capacity_factor)
    ids_S = ids_TK.reshape(-1).long()
    dest_S, order_S = _dispatch_order(ids_S, shard)
    # position of each slot among the slots of its destination (slot order), by one sort
    counts = torch.zeros(W + 1, dtype=torch.int64, device=x_TH.device).scatter_add_(0, dest_S,
                                                                                   torch.ones_like(dest_S))
    starts = torch.cumsum(counts, 0) - counts
    sorted_dest = dest_S.index_select(0, order_S)
    pos_sorted = torch.arange(ids_S.shape[0], device=x_TH.device) - starts.index_select(0, sorted_dest)
    pos_S = torch.empty_like(pos_sorted).scatter_(0, order_S, pos_sorted)
    routed = dest_S < W
    kept = routed & (pos_S < C)
    dropped = (routed & ~kept).sum()
    buf_S = torch.where(kept, dest_S * C + pos_S, torch.full_like(pos_S, W * C))  # W*C: a discard row
    tok_S = torch.arange(ids_S.shape[0], device=x_TH.device).div(K, rounding_mode="floor")
    send_rows = x_TH.new_zeros(W * C + 1, H).index_copy(0, buf_S, x_TH.index_select(0, tok_S))[: W * C]
    kept_ids_S = torch.where(kept, ids_S, torch.full_like(ids_S, -1))
    send_ids = torch.full((W * C + 1,), -1, dtype=torch.int64, device=x_TH.device).index_copy(0, buf_S,
                                                                                              kept_ids_S)[: W * C]
    rows = _exchange_rows(send_rows, None, None, shard, group)
    ids = _exchange_ids(send_ids, None, None, shard, group)
    y = experts_fn(rows, ids.unsqueeze(1))
    back = _exchange_rows(y, None, None, shard, group)
    back = torch.cat([back, back.new_zeros(1, H)])  # the discard row reads zeros
    acc = torch.promote_types(x_TH.dtype, torch.float32)
    w_S = (weights_TK.reshape(-1) * kept).to(acc)
    out_TH = torch.zeros(T, H, dtype=acc, device=x_TH.device)
    out_TH = out_TH.index_add(0, tok_S, back.index_select(0, buf_S).to(acc) * w_S.unsqueeze(-1))
    return out_TH.to(x_TH.dtype), dropped


def check_equal_tokens(num_tokens: int, shard: ExpertShard, group=None, device: torch.device | str = "cpu") -> None:
    """Eager guard of the padded mode: every rank must hold the same number of tokens (``device``:
    where the group's backend takes tensors, CUDA for NCCL)."""
    counts = torch.tensor([num_tokens], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(counts) for _ in range(shard.world)]
    _collective("token-count check", shard, lambda: dist.all_gather(gathered, counts, group=group))
    values = [int(c) for c in gathered]
    if len(set(values)) != 1:
        raise ExpertParallelError(f"expert_parallel_mode='padded' needs the same token count on every rank, got "
                                  f"{values} (rank {shard.rank}: {num_tokens}); use mode 'exact' for uneven batches")


__all__ = [
    "MODES",
    "ExpertParallelError",
    "ExpertShard",
    "check_equal_tokens",
    "exact_exchange",
    "padded_capacity",
    "padded_exchange",
    "shard_of",
]
