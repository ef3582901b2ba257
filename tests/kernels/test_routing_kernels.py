"""topk_gating against kernel_moe.routing.topk.route, and the invariants of align_by_expert."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_moe.kernels.triton.routing import align_by_expert, topk_gating  # noqa: E402
from kernel_moe.routing.topk import RoutingSpec, route  # noqa: E402

ROUTINGS = [
    dict(scoring="softmax", order="score_then_topk", renormalize=False, scaling=1.0),
    dict(scoring="softmax", order="score_then_topk", renormalize=True, scaling=1.0),
    dict(scoring="sigmoid", order="score_then_topk", renormalize=True, scaling=2.5),
    dict(scoring="sigmoid", order="score_then_topk", renormalize=False, scaling=1.0),
    dict(scoring="softmax", order="topk_then_score", renormalize=False, scaling=1.0),
]


def _check_against_route(logits, k, kw):
    weights, ids = topk_gating(logits, k, **kw)
    ref_w, ref_ids = route(logits, RoutingSpec(logits.shape[1], k, **kw))
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (logits.shape[0], k)
    torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_w.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", ROUTINGS, ids=lambda kw: RoutingSpec(8, 2, **kw).describe())
@pytest.mark.parametrize(
    "T, E, k", [(0, 8, 2), (1, 1, 1), (5, 4, 4), (64, 8, 2), (300, 13, 4), (37, 128, 8), (3, 300, 6)]
)
def test_gating_matches_route(T, E, k, kw):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * 31 + E))
    _check_against_route(logits, k, kw)


@pytest.mark.parametrize("kw", [ROUTINGS[0], ROUTINGS[4]], ids=["softmax", "topk_then_softmax"])
def test_gating_low_precision_and_strided_logits(kw):
    base = torch.randn(40, 26, generator=torch.Generator().manual_seed(1))
    logits = base[:, ::2]  # non-contiguous [40, 13]
    _check_against_route(logits, 3, kw)
    _check_against_route(logits.bfloat16(), 3, kw)
    _check_against_route(base.t().contiguous().t()[:, :13], 3, kw)  # column-major


def test_gating_ties_pick_lowest_index():
    logits = torch.zeros(4, 6)
    logits[1, 3] = 1.0
    weights, ids = topk_gating(logits, 3)
    assert ids[0].tolist() == [0, 1, 2]
    assert ids[1].tolist() == [3, 0, 1]
    torch.testing.assert_close(weights[0], torch.full((3,), 1 / 6))


def test_gating_nan_row_stays_in_its_row():
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    logits[2, 5] = float("nan")
    weights, ids = topk_gating(logits, 2)
    assert torch.isnan(weights[2]).all()
    assert ((ids >= 0) & (ids < 8)).all()
    keep = torch.tensor([0, 1, 3, 4, 5])
    ref_w, ref_ids = route(logits[keep], RoutingSpec(8, 2))
    torch.testing.assert_close(weights[keep], ref_w, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids[keep], ref_ids)


def test_gating_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        topk_gating(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="scoring"):
        topk_gating(torch.randn(3, 4), 2, scoring="tanh")
    with pytest.raises(ValueError, match="topk_then_score"):
        topk_gating(torch.randn(3, 4), 2, scoring="sigmoid", order="topk_then_score")
    with pytest.raises(ValueError, match="2-D"):
        topk_gating(torch.randn(3), 1)


# --------------------------------------------------------------------------------------
# align_by_expert
# --------------------------------------------------------------------------------------


def _check_alignment(r, ids_TK, E, block_m):
    """Every documented invariant of AlignedRouting, checked against torch on the host."""
    T, K = ids_TK.shape
    S = T * K
    flat = ids_TK.reshape(-1).long()
    counts = torch.bincount(flat, minlength=E)
    assert r.num_slots == S and r.block_m == block_m
    assert r.ids_TK is ids_TK and r.top_k == K
    assert r.counts_E.dtype == torch.int32
    assert torch.equal(r.counts_E.long(), counts)
    assert int(r.counts_E.sum()) == S
    assert torch.equal(r.offsets_E1.long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    order = torch.argsort(flat, stable=True)
    assert torch.equal(r.sorted_slots_S.long(), order)  # a permutation, stable within each expert
    assert torch.equal(torch.sort(r.sorted_slots_S.long()).values, torch.arange(S))
    assert torch.equal(r.sorted_slots_S.long()[r.inverse_S.long()], torch.arange(S))  # inverse round-trips
    assert torch.equal(r.inverse_S.long()[r.sorted_slots_S.long()], torch.arange(S))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    poff = torch.cat([torch.zeros(1, dtype=torch.long), padded_counts.cumsum(0)])
    assert torch.equal(r.padded_offsets_E1.long(), poff)
    B = -(-S // block_m) + E
    assert r.block_expert_B.shape == (B,) and r.padded_slots_P.shape == (B * block_m,)
    assert int(poff[-1]) <= B * block_m
    padded = r.padded_slots_P.long()
    for e in range(E):
        lo, n, plen = int(poff[e]), int(counts[e]), int(padded_counts[e])
        assert torch.equal(padded[lo : lo + n], order[int(r.offsets_E1[e]) : int(r.offsets_E1[e + 1])])
        assert (padded[lo + n : lo + plen] == S).all()
        assert (r.block_expert_B[lo // block_m : (lo + plen) // block_m] == e).all()
    used = int(poff[-1]) // block_m
    assert (r.block_expert_B[used:] == -1).all()
    assert (padded[int(poff[-1]) :] == S).all()


def _ids(T, E, K, seed, skew=None):
    g = torch.Generator().manual_seed(seed)
    if skew == "one":
        return torch.arange(K).expand(T, K).contiguous()
    logits = torch.randn(T, E, generator=g)
    if skew == "few":
        logits[:, 1 : E - 1] -= 100.0
    return logits.topk(K, dim=-1).indices


@pytest.mark.parametrize("method", ["single", "multi"])
@pytest.mark.parametrize("T", [0, 1, 5, 64, 300])
@pytest.mark.parametrize("E, K", [(1, 1), (4, 4), (8, 2), (13, 3)])
def test_align_invariants(T, E, K, method):
    ids = _ids(T, E, K, seed=T + 7 * E)
    _check_alignment(align_by_expert(ids, E, 16, method=method), ids, E, 16)


@pytest.mark.parametrize("skew", ["one", "few"])
@pytest.mark.parametrize("block_m", [16, 64])
def test_align_skewed_routing(skew, block_m):
    E, K = 13, 2
    ids = _ids(300, E, K, seed=3, skew=skew)
    single = align_by_expert(ids, E, block_m, method="single")
    multi = align_by_expert(ids, E, block_m, method="multi")
    _check_alignment(multi, ids, E, block_m)
    for a, b in zip(single, multi, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_align_many_experts_and_strided_int32_ids():
    E, K = 300, 6
    ids = _ids(200, E, K, seed=5).to(torch.int32).t().contiguous().t()  # column-major int32
    assert not ids.is_contiguous()
    _check_alignment(align_by_expert(ids, E, 32), ids, E, 32)


@pytest.mark.parametrize("method", ["single", "multi"])
def test_align_dropped_slots(method):
    """Ids outside [0, E) (capacity drops, expert-parallel sentinels) belong to no expert."""
    E, K, T = 13, 2, 64
    ids = _ids(T, E, K, seed=9)
    ids[::3, 0] = -1
    ids[1::5, 1] = E
    ids[2, :] = E + 100  # beyond the padded one-hot width too
    r = align_by_expert(ids, E, 16, method=method)
    flat = ids.reshape(-1)
    kept = (flat >= 0) & (flat < E)
    n = int(kept.sum())
    assert torch.equal(r.counts_E.long(), torch.bincount(flat[kept], minlength=E))
    assert int(r.offsets_E1[-1]) == n
    order = torch.arange(T * K)[kept][torch.argsort(flat[kept], stable=True)]
    assert torch.equal(r.sorted_slots_S[:n].long(), order)
    assert (r.sorted_slots_S[n:] == T * K).all()
    assert (r.inverse_S[~kept] == -1).all()
    assert torch.equal(r.sorted_slots_S.long()[r.inverse_S[kept].long()], torch.arange(T * K)[kept])
    padded = r.padded_slots_P.long()
    assert torch.equal(torch.sort(padded[padded < T * K]).values, torch.arange(T * K)[kept])
    assert int(r.block_expert_B.max()) < E


@pytest.mark.parametrize("method", ["single", "multi"])
def test_align_drops_int64_ids_past_the_int32_range(method):
    """The range check happens at the ids' own width: 2**32 + 1 is not expert 1."""
    ids = torch.tensor([[0, 2**32 + 1], [1, -(2**40)], [2**31, 3], [2**32 + 2, 1]])
    r = align_by_expert(ids, 4, 16, method=method)
    assert r.counts_E.tolist() == [1, 2, 0, 1]
    assert (r.inverse_S[torch.tensor([1, 3, 4, 6])] == -1).all()


def test_align_rejects_bad_arguments():
    ids = torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="block_m"):
        align_by_expert(ids, 4, 24)
    with pytest.raises(ValueError, match="dtype"):
        align_by_expert(ids.float(), 4, 16)
    with pytest.raises(ValueError, match="num_experts"):
        align_by_expert(ids, 0, 16)


@pytest.mark.parametrize("scoring, order, renorm", [("softmax", "score_then_topk", True),
                                                    ("softmax", "topk_then_score", False),
                                                    ("sigmoid", "score_then_topk", True)])
def test_gating_op_on_triton_backend_matches_torch_backend(scoring, order, renorm):
    logits = torch.randn(37, 9, generator=torch.Generator().manual_seed(3), requires_grad=True)
    w_t, ids_t = torch.ops.kernel_moe.topk_gating(logits, 3, scoring, order, renorm, 1.5, "triton")
    w_c, ids_c = torch.ops.kernel_moe.topk_gating(logits, 3, scoring, order, renorm, 1.5, "torch")
    assert torch.equal(ids_t, ids_c)
    torch.testing.assert_close(w_t, w_c, atol=1e-6, rtol=1e-6)
    upstream = torch.randn(37, 3, generator=torch.Generator().manual_seed(4))
    (g_t,) = torch.autograd.grad((w_t * upstream).sum(), logits)
    (g_c,) = torch.autograd.grad((w_c * upstream).sum(), logits)
    torch.testing.assert_close(g_t, g_c)
