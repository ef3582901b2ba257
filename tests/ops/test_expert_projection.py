"""kernel_moe::expert_projection (the gather and combine halves of the experts op): opcheck of the
op and its backward, gradients by gradcheck in fp64, dropped slots, and input errors."""

from __future__ import annotations

import pytest
import torch

from kernel_moe.errors import UnsupportedInputError
from kernel_moe.ops.projection import run_projection

T, K, E, D, O = 7, 2, 5, 6, 4


def _inputs(per_slot: bool, weighted: bool, bias: bool, dtype=torch.float32, T=T):
    gen = torch.Generator().manual_seed(int(per_slot) + 2 * int(weighted) + 4 * int(bias) + T)
    x = torch.randn((T, K, D) if per_slot else (T, D), generator=gen, dtype=dtype)
    ids = torch.randint(0, E, (T, K), generator=gen)
    if T:
        ids[0, 1] = -1  # a dropped slot
        ids[-1, 0] = E  # another one
    w = torch.randn(E, O, D, generator=gen, dtype=dtype)
    b = torch.randn(E, O, generator=gen, dtype=dtype) if bias else None
    g = torch.rand(T, K, generator=gen, dtype=dtype) if weighted else None
    return x, g, ids, w, b


def _naive(x, g, ids, w, b):
    """Slot by slot."""
    out = torch.zeros(T, K, w.shape[1], dtype=x.dtype)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            if 0 <= e < E:
                row = x[t, k] if x.dim() == 3 else x[t]
                out[t, k] = row @ w[e].t() + (0 if b is None else b[e])
    return out if g is None else (out * g[..., None]).sum(1)


MODES = [(p, wt, b) for p in (False, True) for wt in (False, True) for b in (False, True)]


@pytest.mark.parametrize("per_slot,weighted,bias", MODES)
def test_forward_equals_slot_by_slot(per_slot, weighted, bias):
    args = _inputs(per_slot, weighted, bias)
    torch.testing.assert_close(run_projection(*args), _naive(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_slot,weighted,bias", MODES)
def test_gradcheck(per_slot, weighted, bias):
    x, g, ids, w, b = _inputs(per_slot, weighted, bias, torch.float64)
    leaves = [t.requires_grad_() for t in (x, g, w, b) if t is not None]

    def fn(*ts):
        it = iter(ts)
        x_, g_ = next(it), (next(it) if weighted else None)
        w_, b_ = next(it), (next(it) if bias else None)
        return run_projection(x_, g_, ids, w_, b_)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("per_slot,weighted,bias,tokens", [(*m, T) for m in MODES] + [(False, True, True, 0)])
def test_opcheck(per_slot, weighted, bias, tokens):
    x, g, ids, w, b = _inputs(per_slot, weighted, bias, T=tokens)
    for t in (x, g, w, b):
        if t is not None:
            t.requires_grad_()
    result = torch.library.opcheck(torch.ops.kernel_moe.expert_projection, (x, g, ids, w, b))
    assert result and all(v == "SUCCESS" for v in result.values()), result


def test_errors_name_the_input():
    x, g, ids, w, b = _inputs(False, True, True)
    with pytest.raises(UnsupportedInputError, match="x must be"):
        run_projection(x[:, :3], g, ids, w, b)
    with pytest.raises(UnsupportedInputError, match="topk_weights"):
        run_projection(x, g[:, :1], ids, w, b)
    with pytest.raises(UnsupportedInputError, match="bias"):
        run_projection(x, g, ids, w, b[:, :1])
    with pytest.raises(UnsupportedInputError, match="dtype"):
        run_projection(x.double(), g, ids, w, b)


@pytest.mark.parametrize("per_slot,weighted,bias", MODES)
def test_opcheck_backward(per_slot, weighted, bias):
    x, g, ids, w, b = _inputs(per_slot, weighted, bias)
    out_shape = (T, O) if weighted else (T, K, O)
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(5))
    result = torch.library.opcheck(torch.ops.kernel_moe.expert_projection_backward, (grad, x, g, ids, w, b))
    assert result and all(v == "SUCCESS" for v in result.values()), result
