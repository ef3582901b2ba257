"""Hand-written mixture-of-attention-heads modules (a tutorial's MoA: a gate, per-expert query and
output projections, shared keys and values, a loop over experts) are recognized by structure and
swapped for FusedHandwrittenMoA only when proven by computation; outputs and gradients then equal
the original's, and what computation cannot confirm is left alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import kernel_moe
from kernel_moe.layers.moa_attention import FusedHandwrittenMoA

D, E, K, HEADS, HEAD_DIM = 32, 4, 2, 2, 8


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(D, HEADS * HEAD_DIM, bias=False)
        self.out = nn.Linear(HEADS * HEAD_DIM, D, bias=False)


class TutorialMoA(nn.Module):
    """MoA written out: softmax over all experts then top-k (no renormalization, as in the MoA paper)
    or renormalized; explicit softmax attention; per-expert loop."""

    def __init__(self, stacked: bool = False, fused_kv: bool = False, causal: bool = True,
                 renormalize: bool = False) -> None:
        super().__init__()
        self.top_k, self.num_heads, self.causal, self.renormalize = K, HEADS, causal, renormalize
        self.gate = nn.Linear(D, E, bias=False)
        F_ = HEADS * HEAD_DIM
        if stacked:
            self.w_q = nn.Parameter(torch.randn(E, F_, D) / math.sqrt(D))
            self.w_o = nn.Parameter(torch.randn(E, D, F_) / math.sqrt(F_))
        else:
            self.experts = nn.ModuleList(Expert() for _ in range(E))
        if fused_kv:
            self.kv = nn.Linear(D, 2 * F_, bias=False)
        else:
            self.k = nn.Linear(D, F_, bias=False)
            self.v = nn.Linear(D, F_, bias=False)
        self.bias = nn.Parameter(torch.randn(D) * 0.1)

    def _q(self, e, x):
        return x @ self.w_q[e].t() if hasattr(self, "w_q") else self.experts[e].query(x)

    def _o(self, e, x):
        return x @ self.w_o[e].t() if hasattr(self, "w_o") else self.experts[e].out(x)

    def forward(self, x, mask=None):
        """mask: boolean padding mask [B, T] (True: a real token), optional."""
        B, T, _ = x.shape
        probs = torch.softmax(self.gate(x), dim=-1)
        w, ids = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            w = w / w.sum(-1, keepdim=True)
        k, v = self.kv(x).chunk(2, -1) if hasattr(self, "kv") else (self.k(x), self.v(x))
        k = k.view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
        v = v.view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
        out = torch.zeros_like(x)
        for e in range(E):
            b, t, slot = torch.where(ids == e)
            q = self._q(e, x[b, t]).view(-1, HEADS, HEAD_DIM)
            scores = torch.einsum("mhd,mhsd->mhs", q, k[b]) / math.sqrt(HEAD_DIM)
            if self.causal:
                scores = scores.masked_fill(torch.arange(T)[None, None, :] > t[:, None, None], float("-inf"))
            if mask is not None:
                scores = scores.masked_fill(~mask[b][:, None, :], float("-inf"))
            o = torch.einsum("mhs,mhsd->mhd", scores.softmax(-1), v[b]).reshape(len(b), -1)
            out = out.index_put((b, t), self._o(e, o) * w[b, t, slot, None], accumulate=True)
        return out + self.bias


class Model(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.attn = TutorialMoA(**kw)
        self.head = nn.Linear(D, D)

    def forward(self, x, mask=None):
        return self.head(self.attn(x) if mask is None else self.attn(x, mask))


CASES = {
    "modulelist_separate_kv": dict(),
    "stacked_fused_kv": dict(stacked=True, fused_kv=True),
    "bidirectional_renormalized": dict(causal=False, renormalize=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_handwritten_moa_is_swapped_and_equal(case):
    torch.manual_seed(0)
    model = Model(**CASES[case])
    original = copy.deepcopy(model)
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert [r.name for r in report.swapped] == ["attn"], report
    layer = model.attn
    assert isinstance(layer, FusedHandwrittenMoA)
    assert layer.spec.causal == CASES[case].get("causal", True)
    assert layer.spec.renormalize == CASES[case].get("renormalize", False)
    assert layer.spec.num_heads == HEADS
    assert list(model.state_dict()) == list(original.state_dict())
    assert ("bool keys", "keep") in layer.spec.masks, layer.spec
    calls = []
    layer.original.register_forward_pre_hook(lambda m, a: calls.append(1))
    x, keep = torch.randn(3, 9, D), torch.ones(3, 9, dtype=torch.bool)
    keep[0, 6:], keep[2, 3] = False, False  # right padding, and a hole
    for mask in (None, keep):
        with torch.no_grad():
            torch.testing.assert_close(model(x, mask), original(x, mask), atol=1e-5, rtol=1e-5)
        grads = []
        for m in (model, original):
            m.zero_grad()
            xi = x.clone().requires_grad_()
            m(xi, mask).square().sum().backward()
            grads.append([xi.grad] + [p.grad for p in m.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not calls, "the proven calls ran the original module"
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    assert torch._dynamo.explain(layer)(x, keep).graph_break_count == 0


def test_a_mask_kind_the_module_does_not_take_runs_the_original():
    torch.manual_seed(0)
    model = Model()
    kernel_moe.optimize(model)
    calls = []
    model.attn.original.register_forward_pre_hook(lambda m, a: calls.append(1))
    additive = torch.zeros(2, 1, 5, 5)  # the module takes boolean padding masks only
    assert not any(kind.startswith("float") for kind, _ in model.attn.spec.masks)
    with pytest.raises(TypeError):
        model(torch.randn(2, 5, D), additive)
    assert calls == [1]


def test_a_moa_the_candidates_cannot_reproduce_stays():
    torch.manual_seed(0)
    model = Model()
    model.attn.forward = lambda x, f=model.attn.forward: f(x).tanh()  # not a MoA any more
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert not report.swapped
    assert "not proven" in {r.name: r.reason for r in report.skipped}["attn"]


def test_sparse_expert_attention_itself_is_left_alone():
    model = nn.Sequential(kernel_moe.SparseExpertAttention(D, E, HEADS, top_k=K), nn.Linear(D, D))
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert not report.swapped and not report.skipped
    assert isinstance(model[0], kernel_moe.SparseExpertAttention)
