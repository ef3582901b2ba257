"""Recognizes hand-written SwitchHead attention modules (Csordás et al. 2024, shaped like
``SparseExpertAttention(variant="switchhead")``) and proves them by computation.

Structure: R = h*E value experts mapping D -> d and R output experts mapping d -> D, either two
3-D Parameters ([R, d, D] / [R, D, d], or [R, D, d] / [R, d, D] read transposed) or per-expert
bias-free Linears (a ModuleList of R, or a ModuleList of h ModuleLists of E; head-major: expert e
of head j is entry j*E + e); two bias-free router Linears D -> R (source: values, destination:
outputs); dense query and key projections as two bias-free Linear(D -> F) or one Linear(D -> 2F)
with F = h*d; optionally an output bias [D]; a ``top_k``-like attribute; no other parameter.
Heads follow from the shapes (h = F / d); what structure cannot tell (which router is the source,
which projection the query, causal or not) becomes candidates, proven by computation
(adapters/attention_proof.py: outputs in eval and train mode, gradients, then each kind of mask).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

from torch import nn

from kernel_moe.adapters.attention_proof import prove_attention_candidates
from kernel_moe.adapters.base import Skip
from kernel_moe.config import KernelConfig
from kernel_moe.layers.attention import SparseExpertAttention
from kernel_moe.layers.switchhead_attention import HandwrittenSwitchHeadSpec
from kernel_moe.layers.weights import ExpertListWeight, StackedWeight

TOP_K_ATTRS = ("top_k", "k", "moe_k", "num_experts_per_tok", "n_selected")


@dataclasses.dataclass(frozen=True)
class _Experts:
    """One reading of the module's value and output experts: R experts D -> d and d -> D, the
    heads the layout fixes (nested lists) or None, how many Parameters they hold, their prefixes."""

    R: int
    d: int
    D: int
    w_v: object
    w_o: object
    heads: int | None
    n_params: int
    skip: tuple[str, ...]


def _stacked_options(module: nn.Module) -> Iterator[_Experts]:
    cube = [(n, p) for n, p in module.named_parameters() if p.dim() == 3]
    if len(cube) != 2:
        return
    for (nv, v), (no, o) in itertools.permutations(cube, 2):
        for tv, to in itertools.product((False, True), repeat=2):
            R, d, D = v.shape[0], v.shape[2 if tv else 1], v.shape[1 if tv else 2]
            o_shape = (o.shape[0], o.shape[2], o.shape[1]) if to else tuple(o.shape)
            if o_shape == (R, D, d):
                yield _Experts(R, d, D, StackedWeight(nv, tv), StackedWeight(no, to), None, 2, ())


def _linear_lists(module: nn.Module) -> Iterator[tuple[str, list[str], nn.Linear, int | None]]:
    """(name, weight paths head-major, first Linear, heads or None) of ModuleLists of bias-free
    Linears of one shape, flat or nested one level (h lists of E)."""
    for name, m in module.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        if all(isinstance(c, nn.Linear) for c in m):
            yield name, [f"{name}.{i}.weight" for i in range(len(m))], m[0], None
        elif all(isinstance(c, nn.ModuleList) and len(c) == len(m[0]) and all(isinstance(x, nn.Linear) for x in c)
                 for c in m):
            yield (name, [f"{name}.{j}.{e}.weight" for j in range(len(m)) for e in range(len(m[0]))], m[0][0],
                   len(m))


def _list_options(module: nn.Module) -> Iterator[_Experts]:
    lists = []
    for name, paths, first, heads in _linear_lists(module):
        linears = [module.get_submodule(p.rsplit(".", 1)[0]) for p in paths]
        if all(lin.bias is None and lin.weight.shape == first.weight.shape for lin in linears):
            lists.append((name, paths, first, heads))
    for (nv, pv, v, hv), (no, po, o, ho) in itertools.permutations(lists, 2):
        if len(pv) == len(po) and hv == ho and (o.in_features, o.out_features) == (v.out_features, v.in_features):
            yield _Experts(len(pv), v.out_features, v.in_features, ExpertListWeight(tuple((p,) for p in pv), "w_v"),
                           ExpertListWeight(tuple((p,) for p in po), "w_o"), hv, 2 * len(pv), (nv, no))


def _shared(module: nn.Module, ex: _Experts) -> Iterator[tuple]:
    """(source, destination, query, key, bias, heads, parameter count) readings of the parts beside
    the experts ``ex``; nothing when they do not fit."""
    lins = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear) and n
            and not any(n == s or n.startswith(s + ".") for s in ex.skip)}
    if any(m.bias is not None or m.in_features != ex.D for m in lins.values()) or len(lins) not in (3, 4):
        return
    vectors = [n for n, p in module.named_parameters(recurse=False) if tuple(p.shape) == (ex.D,)]
    bias = vectors[0] if len(vectors) == 1 else None
    count = len(lins) + (bias is not None)
    for routers in itertools.combinations(lins, 2):
        rest = [n for n in lins if n not in routers]
        if any(lins[n].out_features != ex.R for n in routers):
            continue
        if len(rest) == 2 and lins[rest[0]].out_features == lins[rest[1]].out_features:
            F_ = lins[rest[0]].out_features
            qk = [((a, None), (b, None)) for a, b in itertools.permutations(f"{n}.weight" for n in rest)]
        elif len(rest) == 1 and lins[rest[0]].out_features % 2 == 0:
            F_, w = lins[rest[0]].out_features // 2, f"{rest[0]}.weight"
            qk = [((w, 0), (w, 1)), ((w, 1), (w, 0))]
        else:
            continue
        h = F_ // ex.d
        if F_ % ex.d or ex.R % h or (ex.heads is not None and ex.heads != h):
            continue
        for source, destination in itertools.permutations(f"{n}.weight" for n in routers):
            for query, key in qk:
                yield source, destination, query, key, bias, h, count


@dataclasses.dataclass(frozen=True)
class SwitchHeadCandidates:
    """The candidate specs of one hand-written SwitchHead module, proven together (the manager
    asks ``prove``)."""

    specs: tuple[HandwrittenSwitchHeadSpec, ...]
    hidden: int

    def prove(self, module: nn.Module, config: KernelConfig) -> HandwrittenSwitchHeadSpec | Skip:
        return prove_attention_candidates(module, self.specs, self.hidden, config, "SwitchHead")


def handwritten_switchhead_candidates(module: nn.Module) -> SwitchHeadCandidates | None:
    """Candidate specs of a hand-written SwitchHead module, the likeliest first (None: not one)."""
    top_k = next((getattr(module, a) for a in TOP_K_ATTRS if isinstance(getattr(module, a, None), int)), None)
    if top_k is None:
        return None
    n_params = sum(1 for _ in module.parameters())
    specs, hidden = [], None
    for ex in itertools.chain(_stacked_options(module), _list_options(module)):
        for source, destination, query, key, bias, h, count in _shared(module, ex):
            E = ex.R // h
            if n_params != ex.n_params + count or not 1 <= top_k <= E:
                continue
            hidden = ex.D
            specs += [HandwrittenSwitchHeadSpec(source, destination, query, key, ex.w_v, ex.w_o, bias, h, causal,
                                                num_experts=E, top_k=top_k) for causal in (True, False)]
    return None if not specs else SwitchHeadCandidates(tuple(dict.fromkeys(specs)), hidden)


class HandwrittenSwitchHeadAdapter:
    """Hand-written SwitchHead attention modules (see the module docstring)."""

    name = "handwritten-switchhead-attention"

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[SwitchHeadCandidates] | None:
        if isinstance(module, SparseExpertAttention):
            return None  # already kernel_moe's own layer
        found = handwritten_switchhead_candidates(module)
        return None if found is None else [found]


__all__ = ["HandwrittenSwitchHeadAdapter", "handwritten_switchhead_candidates"]
