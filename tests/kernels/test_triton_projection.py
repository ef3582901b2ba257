"""Triton kernels of kernel_moe::expert_projection (the gather and combine halves of the experts op),
through the interpreter on CPU: outputs and every gradient against a slot-by-slot loop (fp64,
autograd) at fp32 1e-5 / 1e-4, for T = 0, 1, 7 and awkward shapes, dropped slots, every slot to
one expert, k = E, non-contiguous inputs, NaN, bf16; the op dispatches to them for backend="triton";
SparseExpertAttention runs on them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_moe.kernels.projection import projection_backward, projection_forward  # noqa: E402

E = 5


def _inputs(T, K, D, O, per_slot, weighted, bias, seed=0, dtype=torch.float32, ids=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((T, K, D) if per_slot else (T, D), generator=gen)
    if ids is None:
        ids = torch.randint(0, E, (T, K), generator=gen)
        if T > 1:
            ids[0, K - 1] = -1  # dropped slots
            ids[-1, 0] = E
    w = torch.randn(E, O, D, generator=gen) / D**0.5
    b = torch.randn(E, O, generator=gen) if bias else None
    g = torch.rand(T, K, generator=gen) if weighted else None
    return tuple(None if t is None or not t.is_floating_point() else t.to(dtype) for t in (x, g)), ids, w.to(dtype), (
        None if b is None else b.to(dtype))


def _naive(x, g, ids, w, b):
    """Slot by slot (differentiable)."""
    T, K = ids.shape
    rows = []
    for t in range(T):
        slots = []
        for k in range(K):
            e = int(ids[t, k])
            if 0 <= e < w.shape[0]:
                row = x[t, k] if x.dim() == 3 else x[t]
                slots.append(row @ w[e].t() + (0 if b is None else b[e]))
            else:
                slots.append(torch.zeros(w.shape[1], dtype=x.dtype))
        rows.append(torch.stack(slots) if slots else torch.zeros(0, w.shape[1], dtype=x.dtype))
    out = torch.stack(rows) if rows else torch.zeros(0, K, w.shape[1], dtype=x.dtype)
    return out if g is None else (out * g[..., None]).sum(1)


def _reference(x, g, ids, w, b, grad):
    """(output, grads of x, g, w, b) of the naive loop in fp64."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, g, w, b)]
    out = _naive(leaves[0], leaves[1], ids, leaves[2], leaves[3])
    if out.numel():
        out.backward(grad.double())
    grads = [None if t is None else (t.grad if t.grad is not None else torch.zeros_like(t)) for t in leaves]
    return out.detach(), grads


def _check(x, g, ids, w, b, atol=(1e-5, 1e-4)):
    out = projection_forward(x, g, ids, w, b, "triton")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
    ref, ref_grads = _reference(x, g, ids, w, b, grad)
    torch.testing.assert_close(out.double(), ref, atol=atol[0], rtol=atol[0])
    ours = projection_backward(grad, x, g, ids, w, b, "triton")
    for name, a, r in zip(("x", "topk_weights", "weight", "bias"), ours, ref_grads):
        assert (a is None) == (r is None), name
        if a is not None:
            torch.testing.assert_close(a.double(), r, atol=atol[1], rtol=atol[1], msg=name)


MODES = [(p, wt, b) for p in (False, True) for wt in (False, True) for b in (False, True)]


@pytest.mark.parametrize("per_slot,weighted,bias", MODES)
@pytest.mark.parametrize("T", [0, 1, 7])
def test_matches_the_slot_loop(T, per_slot, weighted, bias):
    (x, g), ids, w, b = _inputs(T, 2, 20, 12, per_slot, weighted, bias, seed=T)
    _check(x, g, ids, w, b)


@pytest.mark.parametrize("per_slot,weighted", [(False, True), (True, False)])
def test_larger_than_a_block_and_even_k(per_slot, weighted):
    (x, g), ids, w, b = _inputs(37, 3, 64, 48, per_slot, weighted, True, seed=3)
    _check(x, g, ids, w, b)


def test_every_slot_to_one_expert_and_k_equals_e():
    (x, g), _, w, b = _inputs(9, E, 20, 12, False, True, True, seed=4)
    _check(x, g, torch.arange(E).expand(9, E).clone(), w, b)
    (x, g), _, w, b = _inputs(9, 1, 20, 12, False, True, False, seed=5)
    _check(x, g, torch.full((9, 1), 3), w, b)


def test_non_contiguous_inputs():
    (x, g), ids, w, b = _inputs(11, 2, 20, 12, True, True, True, seed=6)
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)  # [T, K, D] with permuted strides
    w_nc = w.transpose(1, 2).contiguous().transpose(1, 2)  # [E, O, D] read through strides
    g_nc = g.t().contiguous().t()
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or g_nc.is_contiguous())
    _check(x_nc, g_nc, ids.t().contiguous().t(), w_nc, b)


def test_nan_propagates_to_its_token_only():
    (x, g), ids, w, b = _inputs(6, 2, 20, 12, False, True, False, seed=7)
    ids[2] = torch.tensor([1, 2])
    x[2, 3] = float("nan")
    out = projection_forward(x, g, ids, w, b, "triton")
    assert out[2].isnan().all() and not out[[0, 1, 3, 4, 5]].isnan().any()


def test_bf16_against_fp32():
    (x, g), ids, w, b = _inputs(13, 2, 24, 20, False, True, True, seed=8)
    ref = projection_forward(x, g, ids, w, b, "cpu")
    out = projection_forward(x.bfloat16(), g, ids, w.bfloat16(), b.bfloat16(), "triton")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_the_op_dispatches_to_triton_and_passes_opcheck():
    import kernel_moe.kernels.triton.projection as tp

    (x, g), ids, w, b = _inputs(7, 2, 20, 12, False, True, True, seed=10)
    calls = []
    forward = tp.projection_forward_triton
    tp.projection_forward_triton = lambda *a: calls.append(1) or forward(*a)
    try:
        out = torch.ops.kernel_moe.expert_projection(x, g, ids, w, b, "triton")
    finally:
        tp.projection_forward_triton = forward
    assert calls == [1]
    torch.testing.assert_close(out, projection_forward(x, g, ids, w, b, "cpu"), atol=1e-5, rtol=1e-5)
    for t in (x, g, w, b):
        t.requires_grad_()
    result = torch.library.opcheck(torch.ops.kernel_moe.expert_projection, (x, g, ids, w, b, "triton"))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("variant", ["moa", "switchhead"])
def test_sparse_expert_attention_on_the_triton_kernels(variant):
    import kernel_moe

    torch.manual_seed(0)
    ours = kernel_moe.SparseExpertAttention(32, 4, 2, top_k=2, variant=variant,
                                            config=kernel_moe.KernelConfig.for_moe(backend="triton"))
    ref = kernel_moe.SparseExpertAttention(32, 4, 2, top_k=2, variant=variant,
                                           config=kernel_moe.KernelConfig.for_moe(backend="cpu"))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 32)
    keep = torch.ones(2, 7)
    keep[0, 5:] = 0
    outs = []
    for layer in (ours, ref):
        xi = x.clone().requires_grad_()
        out = layer(xi, keep)
        out.square().sum().backward()
        outs.append([out.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for a, r in zip(outs[0][1:], outs[1][1:]):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
