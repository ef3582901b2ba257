"""The expert-parallel token exchange on 2 and 4 CPU processes (gloo): outputs and gradients equal
the single-process computation, for different token counts per rank (zero included); the padded
mode drops and counts overflow; a dead rank ends in a clear error, never a hang."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from kernel_moe.kernels.contract import StackedExperts
from kernel_moe.ops.experts import run_experts
from kernel_moe.parallel import ExpertParallelError, ExpertShard, exact_exchange, padded_exchange
from kernel_moe.reference.moe import naive_moe_experts
from parallel.ranks import run_ranks

H, I = 16, 12


def _problem(E: int, K: int, tokens: list[int], seed: int = 0):
    """Everything every rank knows: experts [E] and each rank's tokens and routing."""
    g = torch.Generator().manual_seed(seed)
    w_up = torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)
    w_down = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    per_rank = []
    for T in tokens:
        x = torch.randn(T, H, generator=g)
        weights, ids = torch.softmax(torch.randn(T, E, generator=g), dim=-1).topk(K, dim=-1)
        per_rank.append((x, weights, ids))
    return w_up, w_down, per_rank


def _single_process(E, K, tokens, seed):
    """Outputs and gradients of all ranks' tokens computed in one process."""
    w_up, w_down, per_rank = _problem(E, K, tokens, seed)
    w_up.requires_grad_(True)
    w_down.requires_grad_(True)
    outs, grads = [], []
    for x, weights, ids in per_rank:
        x, weights = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        out = naive_moe_experts(x, weights, ids, w_up, w_down)
        if out.requires_grad:
            (out * _cotangent(out)).sum().backward()
        outs.append(out.detach())
        grads.append((_grad(x), _grad(weights)))
    return outs, grads, w_up.grad, w_down.grad


def _grad(t: torch.Tensor) -> torch.Tensor:
    return t.grad if t.grad is not None else torch.zeros_like(t)


def _cotangent(out: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, out.numel()).view(out.shape) if out.numel() else out.detach()


def _exact_worker(rank, world, E, K, tokens, seed, mode):
    w_up, w_down, per_rank = _problem(E, K, tokens, seed)
    shard = ExpertShard(rank, world, E)
    held = slice(shard.first, shard.first + shard.local)
    local_up = w_up[held].clone().requires_grad_(True)
    local_down = w_down[held].clone().requires_grad_(True)

    def experts_fn(rows, ids):
        experts = StackedExperts(local_up, local_down, expert_map=shard.expert_map())
        return run_experts(rows, torch.ones(rows.shape[0], 1), ids, experts, "cpu")

    x, weights, ids = per_rank[rank]
    x, weights = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    if mode == "exact":
        out, dropped = exact_exchange(x, weights, ids, experts_fn, shard), 0
    else:
        out, dropped = padded_exchange(x, weights, ids, experts_fn, shard, capacity_factor=float(world))
    (out * _cotangent(out)).sum().backward()
    return out.detach(), _grad(x), _grad(weights), _grad(local_up), _grad(local_down), int(dropped)


@pytest.mark.parametrize("world,E,K,tokens", [
    (2, 4, 1, [7, 0]),
    (2, 8, 2, [300, 1]),
    (4, 12, 2, [0, 1, 7, 300]),
    (4, 8, 1, [7, 300, 1, 0]),
], ids=["w2-E4-k1", "w2-E8-k2", "w4-E12-k2", "w4-E8-k1"])
def test_exact_exchange_equals_one_process(world, E, K, tokens):
    results = run_ranks(_exact_worker, world, E, K, tokens, 1, "exact")
    outs, grads, g_up, g_down = _single_process(E, K, tokens, 1)
    local = E // world
    for rank, (out, gx, gw, g_local_up, g_local_down, _) in enumerate(results):
        torch.testing.assert_close(out, outs[rank], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, grads[rank][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gw, grads[rank][1], atol=1e-4, rtol=1e-4)
        held = slice(rank * local, (rank + 1) * local)
        torch.testing.assert_close(g_local_up, g_up[held], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g_local_down, g_down[held], atol=1e-4, rtol=1e-4)


def test_padded_exchange_equals_one_process_when_nothing_overflows():
    tokens = [9, 9]
    results = run_ranks(_exact_worker, 2, 8, 2, tokens, 2, "padded")
    outs, grads, _, _ = _single_process(8, 2, tokens, 2)
    for rank, (out, gx, gw, _, _, dropped) in enumerate(results):
        assert dropped == 0
        torch.testing.assert_close(out, outs[rank], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, grads[rank][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gw, grads[rank][1], atol=1e-4, rtol=1e-4)


def _overflow_worker(rank, world):
    """Every slot of both ranks goes to expert 0 (rank 0): capacity 1 row per destination."""
    E, T = 4, 4
    shard = ExpertShard(rank, world, E)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(rank))
    ids = torch.zeros(T, 1, dtype=torch.int64)
    rows_seen = []

    def experts_fn(rows, local_ids):
        rows_seen.append(int((local_ids >= 0).sum()))
        return rows * 2

    out, dropped = padded_exchange(x, torch.ones(T, 1), ids, experts_fn, shard, capacity_factor=0.25 * world)
    return out, x, int(dropped), rows_seen


def test_padded_exchange_drops_and_counts_overflow():
    for rank, (out, x, dropped, rows_seen) in enumerate(run_ranks(_overflow_worker, 2)):
        assert dropped == 3  # capacity 1: the first slot of each rank travels, three are dropped
        torch.testing.assert_close(out[0], 2 * x[0])
        assert torch.equal(out[1:], torch.zeros(3, H))
        assert rows_seen == ([2] if rank == 0 else [0])


def _dead_rank_worker(rank, world):
    if rank == 1:
        return "left"  # this rank leaves without taking part in the exchange
    shard = ExpertShard(rank, world, 4)
    x = torch.randn(3, H)
    weights, ids = torch.ones(3, 1), torch.tensor([[0], [2], [3]])
    try:
        exact_exchange(x, weights, ids, lambda rows, i: rows, shard)
    except ExpertParallelError as exc:
        return str(exc)
    return "no error"


def test_a_rank_that_leaves_ends_in_a_clear_error_not_a_hang():
    results = run_ranks(_dead_rank_worker, 2, timeout_s=90, pg_timeout_s=20)
    assert results[1] == "left"
    assert "expert-parallel" in results[0] and "rank 0 of 2" in results[0], results[0]


def test_uneven_expert_split_raises_naming_the_numbers():
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the group's world size 4"):
        ExpertShard(0, 4, 6)
    shard = ExpertShard(1, 2, 4)
    assert shard.expert_map().tolist() == [-1, -1, 0, 1]
    assert not dist.is_initialized()
