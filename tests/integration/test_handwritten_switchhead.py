"""Hand-written SwitchHead modules (value and output experts per head, sigmoid top-k gates on the
source and destination tokens, dense queries and keys) are recognized by structure and swapped for
FusedHandwrittenSwitchHead only when proven by computation, with and without their masks; outputs
and gradients then equal the original's. Modules that look like SwitchHead but compute something
else stay, with the reason in the report."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import kernel_moe
from kernel_moe.layers.switchhead_attention import FusedHandwrittenSwitchHead

D, H, E, K, DH = 32, 2, 4, 2, 8


class StackedSwitchHead(nn.Module):
    """SwitchHead with stacked expert tensors in (in, out) layout, indexed head * E + expert, as the
    paper's formulas read: v_h = sum_k s_k x W_v[h, e_k], out = sum_h sum_k d_k a_h W_o[h, e_k].
    Takes a boolean padding mask [B, T] (True: a real token). The keyword arguments make decoys."""

    def __init__(self, causal: bool = True, gate: str = "sigmoid", used_k: int = K, scale: float = 1.0,
                 unused_expert: bool = False, mask_as_bias: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_experts, self.moe_k = H, E, K
        self.causal, self.gate, self.used_k, self.scale, self.unused_expert = causal, gate, used_k, scale, unused_expert
        self.mask_as_bias = mask_as_bias
        self.q = nn.Linear(D, H * DH, bias=False)
        self.k = nn.Linear(D, H * DH, bias=False)
        self.v = nn.Parameter(torch.randn(H * E, D, DH) / math.sqrt(D))
        self.o = nn.Parameter(torch.randn(H * E, DH, D) / math.sqrt(DH))
        self.sel_v = nn.Linear(D, H * E, bias=False)
        self.sel_o = nn.Linear(D, H * E, bias=False)

    def _select(self, sel: nn.Linear, x: torch.Tensor):
        logits = sel(x).view(*x.shape[:2], H, E)
        scores = torch.sigmoid(logits) if self.gate == "sigmoid" else torch.softmax(logits, -1)
        g, i = scores.topk(self.used_k, dim=-1)  # [B, T, H, k]
        return g, i + torch.arange(H)[:, None] * E

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        gv, iv = self._select(self.sel_v, x)
        if self.unused_expert:  # the last value expert of each head never runs
            iv = torch.where(iv % E == E - 1, iv - 1, iv)
        v = (torch.einsum("btd,bthkde->bthke", x, self.v[iv]) * gv[..., None]).sum(3).transpose(1, 2)
        q = self.q(x).view(B, T, H, DH).transpose(1, 2)
        k = self.k(x).view(B, T, H, DH).transpose(1, 2)
        s = q @ k.transpose(-1, -2) / math.sqrt(DH) * self.scale
        if self.causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        if mask is not None and self.mask_as_bias:  # a mask decoy: the flags are added to the scores
            s = s + mask[:, None, None, :].to(s.dtype)
        elif mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        a = (s.softmax(-1) @ v).transpose(1, 2)  # [B, T, H, DH]
        go, io = self._select(self.sel_o, x)
        return (torch.einsum("bthe,bthkem->bthkm", a, self.o[io]) * go[..., None]).sum((2, 3))


class LoopSwitchHead(nn.Module):
    """SwitchHead written with per-expert Linears and loops over heads and experts: one fused
    query-key Linear, value / output experts as ModuleLists (nested per head, or flat head-major),
    an output bias; takes an additive attention mask [B, 1, T, T]."""

    def __init__(self, flat: bool = False, causal: bool = False) -> None:
        super().__init__()
        self.num_heads, self.top_k, self.causal, self.flat = H, K, causal, flat
        self.qk = nn.Linear(D, 2 * H * DH, bias=False)
        self.src_gate = nn.Linear(D, H * E, bias=False)
        self.dst_gate = nn.Linear(D, H * E, bias=False)

        def experts(n_in, n_out):
            if flat:
                return nn.ModuleList(nn.Linear(n_in, n_out, bias=False) for _ in range(H * E))
            return nn.ModuleList(nn.ModuleList(nn.Linear(n_in, n_out, bias=False) for _ in range(E)) for _ in range(H))

        self.value_experts = experts(D, DH)
        self.output_experts = experts(DH, D)
        self.out_bias = nn.Parameter(torch.randn(D) * 0.1)

    def _expert(self, experts, j, e):
        return experts[j * E + e] if self.flat else experts[j][e]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k = self.qk(x).view(B, T, 2, H, DH).unbind(2)
        src = torch.sigmoid(self.src_gate(x)).view(B, T, H, E).topk(self.top_k, dim=-1)
        dst = torch.sigmoid(self.dst_gate(x)).view(B, T, H, E).topk(self.top_k, dim=-1)
        out = torch.zeros_like(x) + self.out_bias
        for j in range(H):
            v = torch.zeros(B, T, DH)
            for e in range(E):
                b, t, slot = torch.where(src.indices[:, :, j] == e)
                y = self._expert(self.value_experts, j, e)(x[b, t]) * src.values[b, t, j, slot, None]
                v = v.index_put((b, t), y, accumulate=True)
            s = torch.einsum("btd,bsd->bts", q[:, :, j], k[:, :, j]) / math.sqrt(DH)
            if self.causal:
                s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            if attn_mask is not None:
                s = s + attn_mask[:, 0]
            a = s.softmax(-1) @ v  # [B, T, DH]
            for e in range(E):
                b, t, slot = torch.where(dst.indices[:, :, j] == e)
                y = self._expert(self.output_experts, j, e)(a[b, t]) * dst.values[b, t, j, slot, None]
                out = out.index_put((b, t), y, accumulate=True)
        return out


class Model(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn
        self.head = nn.Linear(D, D)

    def forward(self, x, mask=None):
        return self.head(self.attn(x) if mask is None else self.attn(x, mask))


def padding(B: int, T: int) -> torch.Tensor:
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, T - 3:] = False
    keep[-1, 2] = False
    return keep


def additive(B: int, T: int) -> torch.Tensor:
    allowed = padding(B, T)[:, None, None, :] | torch.eye(T, dtype=torch.bool)
    return torch.zeros(B, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)


CASES = {
    "stacked_causal_bool_mask": (lambda: StackedSwitchHead(), padding, "bool keys", "keep", True),
    "stacked_bidirectional": (lambda: StackedSwitchHead(causal=False), padding, "bool keys", "keep", False),
    "nested_lists_additive_mask": (lambda: LoopSwitchHead(), additive, "float heads", "add", False),
    "flat_list_causal": (lambda: LoopSwitchHead(flat=True, causal=True), additive, "float heads", "add", True),
}


def _grads(model, x, mask):
    xi = x.clone().requires_grad_()
    model(xi, mask).square().sum().backward()
    grads = [xi.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("case", list(CASES))
def test_handwritten_switchhead_is_swapped_and_equal(case):
    make, make_mask, kind, reading, causal = CASES[case]
    torch.manual_seed(0)
    model = Model(make())
    original = copy.deepcopy(model)
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert [r.name for r in report.swapped] == ["attn"], report
    layer = model.attn
    assert isinstance(layer, FusedHandwrittenSwitchHead)
    assert (layer.spec.num_heads, layer.spec.num_experts, layer.spec.top_k, layer.spec.causal) == (H, E, K, causal)
    assert (kind, reading) in layer.spec.masks, layer.spec
    assert list(model.state_dict()) == list(original.state_dict())
    calls = []
    layer.original.register_forward_pre_hook(lambda m, a: calls.append(1))
    x = torch.randn(3, 9, D)
    for mask in (None, make_mask(3, 9)):
        with torch.no_grad():
            torch.testing.assert_close(model(x, mask), original(x, mask), atol=1e-5, rtol=1e-5)
        for a, b in zip(_grads(model, x, mask), _grads(original, x, mask)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not calls, "the proven calls ran the original module"
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    assert torch._dynamo.explain(layer)(x, make_mask(3, 9)).graph_break_count == 0


def test_an_unproven_mask_kind_runs_the_original():
    torch.manual_seed(0)
    model = Model(StackedSwitchHead())
    original = copy.deepcopy(model)
    kernel_moe.optimize(model)
    calls = []
    model.attn.original.register_forward_pre_hook(lambda m, a: calls.append(1))
    x, mask = torch.randn(2, 6, D), padding(2, 6).float()  # a float [B, T] mask: not a proven kind
    assert "float keys" not in dict(model.attn.spec.masks)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask.bool()), original(x, mask.bool()), atol=1e-5, rtol=1e-5)
        assert not calls
        try:
            expected = original(x, mask)
        except Exception as exc:
            with pytest.raises(type(exc)):
                model(x, mask)
        else:
            torch.testing.assert_close(model(x, mask), expected)
    assert calls == [1]


DECOYS = {
    "softmax_gates": dict(gate="softmax"),
    "uses_top_1_declares_top_2": dict(used_k=1),
    "a_value_expert_never_used": dict(unused_expert=True),
    "extra_score_scale": dict(scale=0.5),
}


@pytest.mark.parametrize("decoy", list(DECOYS))
def test_a_module_that_only_looks_like_switchhead_stays(decoy):
    torch.manual_seed(0)
    model = Model(StackedSwitchHead(**DECOYS[decoy]))
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert not report.swapped
    assert isinstance(model.attn, StackedSwitchHead)
    assert "not proven equivalent" in {r.name: r.reason for r in report.skipped}["attn"]


def test_sparse_expert_attention_switchhead_is_left_alone():
    model = nn.Sequential(kernel_moe.SparseExpertAttention(D, E, H, top_k=K, variant="switchhead"), nn.Linear(D, D))
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert not report.swapped and not report.skipped


def test_a_mask_the_module_reads_some_other_way_runs_the_original():
    torch.manual_seed(0)
    model = Model(StackedSwitchHead(mask_as_bias=True))
    original = copy.deepcopy(model)
    report = kernel_moe.optimize(model, return_report=True)[1]
    assert [r.name for r in report.swapped] == ["attn"]
    assert "bool keys" not in dict(model.attn.spec.masks)
    assert "not proven bool [B, T]" in str(report), str(report)
    calls = []
    model.attn.original.register_forward_pre_hook(lambda m, a: calls.append(1))
    x, keep = torch.randn(2, 6, D), padding(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x, keep), original(x, keep), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), original(x), atol=1e-5, rtol=1e-5)
    assert calls == [1]
