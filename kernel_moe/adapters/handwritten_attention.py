"""Recognizes hand-written mixture-of-attention-heads modules (MoA, shaped like
``SparseExpertAttention(variant="moa")``) and proves them by computation.

Structure: per-expert query projections [E, F, D] and output projections [E, D, F], either two
3-D Parameters or E expert modules holding exactly a Linear(D -> F) and a Linear(F -> D) (or two
ModuleLists of such Linears), all bias-free; one bias-free router Linear(D -> E); shared keys and
values as two bias-free Linear(D -> F) or one Linear(D -> 2F); optionally an output bias [D]; no
other parameter. What structure cannot tell (heads per expert, causal or not, the key/value
order, whether the top-k softmax weights are renormalized) becomes candidates, the module's own
head-count attribute first. The proof (adapters/attention_proof.py) runs the original and each
candidate on a seeded probe ``x [2, T, D]``; the first that agrees is checked in train mode and for
gradients, which decide the fallbacks, then with every kind of mask the forward accepts.
SwitchHead-style modules (value/output experts per head) are adapters/handwritten_switchhead.py's.
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
from kernel_moe.layers.moa_attention import HandwrittenMoASpec
from kernel_moe.layers.weights import ExpertListWeight, StackedWeight

HEAD_ATTRS = ("num_heads_per_expert", "num_heads", "n_heads", "heads")


def _linears(module: nn.Module, skip: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Bias-free or not, every Linear of ``module`` outside the ``skip`` prefixes."""
    return {n: m for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and n and not any(n == s or n.startswith(s + ".") for s in skip)}


def _expert_options(module: nn.Module) -> Iterator[tuple]:
    """(E, F, D, w_q, w_o, expert prefixes) readings of the module's expert projections: two 3-D
    Parameters, E expert modules of two bias-free Linears, or two ModuleLists of E Linears."""
    cube = [(n, p) for n, p in module.named_parameters() if p.dim() == 3]
    for (nq, q), (no, o) in itertools.permutations(cube if len(cube) == 2 else [], 2):
        E, F_, D = q.shape
        if tuple(o.shape) == (E, D, F_):
            yield E, F_, D, StackedWeight(nq), StackedWeight(no), ()
    lists = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m) >= 2]
    for name, experts in lists:
        pair = [(n, m) for n, m in experts[0].named_modules() if isinstance(m, nn.Linear)]
        if len(pair) != 2 or any(sum(1 for _ in e.parameters()) != 2 for e in experts):
            continue
        for (nq, q), (no, o) in itertools.permutations(pair):
            if _linear_stack(experts, nq, q) and _linear_stack(experts, no, o) and \
                    (o.in_features, o.out_features) == (q.out_features, q.in_features):
                yield (len(experts), q.out_features, q.in_features, _listed(name, len(experts), f".{nq}", "w_q"),
                       _listed(name, len(experts), f".{no}", "w_o"), (name,))
    plain = [(n, m) for n, m in lists if all(isinstance(x, nn.Linear) for x in m)]
    for (nq, q), (no, o) in itertools.permutations(plain, 2):
        if len(q) == len(o) and _linear_stack(q, "", q[0]) and _linear_stack(o, "", o[0]) and \
                (o[0].in_features, o[0].out_features) == (q[0].out_features, q[0].in_features):
            yield (len(q), q[0].out_features, q[0].in_features, _listed(nq, len(q), "", "w_q"),
                   _listed(no, len(o), "", "w_o"), (nq, no))


def _linear_stack(experts: nn.ModuleList, name: str, like: nn.Linear) -> bool:
    """Every expert's ``name`` is a bias-free Linear shaped like ``like``."""
    for e in experts:
        m = e.get_submodule(name) if name else e
        if not isinstance(m, nn.Linear) or m.bias is not None or m.weight.shape != like.weight.shape:
            return False
    return True


def _listed(prefix: str, E: int, suffix: str, key: str) -> ExpertListWeight:
    return ExpertListWeight(tuple((f"{prefix}.{e}{suffix}.weight",) for e in range(E)), key)


def _shared(module: nn.Module, E: int, F_: int, D: int, skip: tuple[str, ...]):
    """(router path, [(key, value) readings], bias path | None, parameter count) of the shared
    parts for experts (E, F, D), or None when they do not fit."""
    lins = _linears(module, skip)
    if any(m.bias is not None for m in lins.values()):
        return None
    routers = [n for n, m in lins.items() if (m.in_features, m.out_features) == (D, E)]
    single = [n for n, m in lins.items() if (m.in_features, m.out_features) == (D, F_)]
    fused = [n for n, m in lins.items() if (m.in_features, m.out_features) == (D, 2 * F_)]
    if len(routers) != 1 or len(lins) != 1 + len(single) + len(fused):
        return None
    if len(single) == 2 and not fused:
        a, b = (f"{n}.weight" for n in single)
        kv = [((a, None), (b, None)), ((b, None), (a, None))]
    elif len(fused) == 1 and not single:
        w = f"{fused[0]}.weight"
        kv = [((w, 0), (w, 1)), ((w, 1), (w, 0))]
    else:
        return None
    vectors = [n for n, p in module.named_parameters(recurse=False) if tuple(p.shape) == (D,)]
    bias = vectors[0] if len(vectors) == 1 else None
    return f"{routers[0]}.weight", kv, bias, len(lins) + (bias is not None)


@dataclasses.dataclass(frozen=True)
class MoACandidates:
    """The candidate specs of one hand-written MoA module, proven together (the manager asks
    ``prove``): what structure cannot tell is decided by computation."""

    specs: tuple[HandwrittenMoASpec, ...]
    hidden: int

    def prove(self, module: nn.Module, config: KernelConfig) -> HandwrittenMoASpec | Skip:
        return prove_handwritten_moa(module, self, config)


def handwritten_moa_candidates(module: nn.Module) -> MoACandidates | None:
    """Candidate specs of a hand-written MoA module, the likeliest first (None: not one)."""
    top_k = next((getattr(module, a) for a in ("top_k", "k", "num_experts_per_tok")
                  if isinstance(getattr(module, a, None), int)), None)
    if top_k is None:
        return None
    n_params = sum(1 for _ in module.parameters())
    for E, F_, D, w_q, w_o, skip in _expert_options(module):
        shared = _shared(module, E, F_, D, skip)
        if shared is None or not 1 <= top_k <= E:
            continue
        router, kv_options, bias, n_shared = shared
        if n_params != (2 if not skip else 2 * E) + n_shared:
            continue  # parameters this reading does not account for
        declared = [getattr(module, a) for a in HEAD_ATTRS if isinstance(getattr(module, a, None), int)]
        heads = [h for h in dict.fromkeys(declared + list(range(1, F_ + 1))) if h >= 1 and F_ % h == 0]
        return MoACandidates(tuple(
            HandwrittenMoASpec(router, w_q, w_o, key, value, bias, h, causal, renorm, num_experts=E, top_k=top_k)
            for h in heads for causal in (True, False) for renorm in (True, False) for key, value in kv_options), D)
    return None


class HandwrittenMoAAdapter:
    """Hand-written mixture-of-attention-heads modules (see the module docstring)."""

    name = "handwritten-moa-attention"

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[MoACandidates] | None:
        if isinstance(module, SparseExpertAttention):
            return None  # already kernel_moe's own layer
        found = handwritten_moa_candidates(module)
        return None if found is None else [found]


def prove_handwritten_moa(module: nn.Module, found: MoACandidates, config: KernelConfig) -> HandwrittenMoASpec | Skip:
    """The first candidate whose layer computes what ``module`` computes on the probe, with its
    fallbacks and proven masks (adapters/attention_proof.py); else why none."""
    return prove_attention_candidates(module, found.specs, found.hidden, config, "MoA")


__all__ = ["HandwrittenMoAAdapter", "handwritten_moa_candidates", "prove_handwritten_moa"]
