"""Hand-written MoE blocks: a gate ``nn.Linear(H, E)`` and an ``nn.ModuleList`` of E expert MLPs.

Recognized by structure, whatever the attribute names: the experts are a ModuleList or
ModuleDict of the block (a child, or nested in one: ``self.moe.experts``) whose items share one
class and hold two Linear layers (up, down) or three (gate, up, down); the router is a
Linear(H, E) or a raw Parameter [E, H] / [H, E] elsewhere in the block (directly or inside a
gating submodule), see :mod:`kernel_moe.adapters.handwritten_parts`. Which Linear is the gate, the activation, the routing variant and top-k
are then settled by computation: the first candidate whose output matches the original on a
probe input is the one swapped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.handwritten_parts import declared_capacity, expert_containers, router_weights
from kernel_moe.adapters.probe import POINTWISE, first_match, leaf_activations, probe_input, run_module
from kernel_moe.adapters.structure import TOPK_ATTRS, int_attr
from kernel_moe.config import KernelConfig
from kernel_moe.kernels.contract import Activation
from kernel_moe.kernels.cpu.mlp import Expert, mlp_forward
from kernel_moe.layers.spec import ExpertsSpec, LinearRouter, MoESpec
from kernel_moe.layers.weights import ExpertListWeight
from kernel_moe.routing.topk import TopKRouting

MAX_PROBED_K = 8
ROUTING_VARIANTS = (
    ("softmax", True),
    ("softmax", False),
    ("sigmoid", True),
    ("sigmoid", False),
)
_GATE_NAME = re.compile(r"(^|[._])(gate|w1|wi_0|gate_proj)($|[._])")


@dataclass(frozen=True)
class ExpertForm:
    """How one expert MLP is wired: Linear paths (relative to the expert) and activation."""

    up: tuple[str, ...]  # one path (fc1) or two (gate, up), concatenated in this order
    down: str
    activation: str
    glu: str
    bias: bool


def expert_forms(expert: nn.Module, hidden: int) -> list[ExpertForm] | Skip:
    """Candidate wirings of an expert MLP, from its Linear layers' shapes."""
    linears = [(p, m) for p, m in expert.named_modules() if isinstance(m, nn.Linear)]
    acts = leaf_activations(expert)
    act_candidates = list(dict.fromkeys(acts)) or list(POINTWISE)
    if len(acts) > 1 and len(set(acts)) > 1:
        return Skip(f"expert holds several different activations {acts}")
    biases = {m.bias is not None for _, m in linears}
    if len(biases) > 1:
        return Skip("expert mixes Linear layers with and without bias")
    bias = biases == {True}
    if len(linears) == 2:
        (pu, up), (pd, down) = linears
        if up.in_features != hidden or down.out_features != hidden or up.out_features != down.in_features:
            (pd, down), (pu, up) = linears
        if up.in_features != hidden or down.out_features != hidden or up.out_features != down.in_features:
            return Skip(f"expert Linear shapes do not chain {hidden}->I->{hidden}")
        return [ExpertForm((pu,), pd, a, "none", bias) for a in act_candidates]
    if len(linears) == 3:
        ins = [(p, m) for p, m in linears if m.in_features == hidden and m.out_features != hidden]
        outs = [(p, m) for p, m in linears if m.out_features == hidden and m.in_features != hidden]
        if len(ins) != 2 or len(outs) != 1 or ins[0][1].out_features != ins[1][1].out_features:
            return Skip(f"expert has 3 Linear layers that are not gate/up [{hidden}->I] and down [I->{hidden}]")
        (p1, _), (p2, _) = ins
        orders = [(p1, p2), (p2, p1)]
        if _GATE_NAME.search(p2) and not _GATE_NAME.search(p1):
            orders.reverse()
        return [ExpertForm(o, outs[0][0], a, "concat", bias) for o in orders for a in act_candidates]
    return Skip(f"expert has {len(linears)} Linear layers; supported: 2 (up, down) or 3 (gate, up, down)")


def form_experts_spec(form: ExpertForm, prefixes: list[str], hidden: int, intermediate: int) -> ExpertsSpec:
    """The ExpertsSpec of experts wired as ``form``, one per attribute-path prefix: their Linear
    weights (and biases) are stacked per expert, gate and up concatenated in ``form.up`` order."""

    def stacked(paths: tuple[str, ...], suffix: str, key: str) -> ExpertListWeight:
        return ExpertListWeight(tuple(tuple(pre + p + suffix for p in paths) for pre in prefixes), key=key)

    return ExpertsSpec(
        num_experts=len(prefixes), hidden=hidden, intermediate=intermediate,
        up=stacked(form.up, ".weight", "up"), down=stacked((form.down,), ".weight", "down"),
        up_bias=stacked(form.up, ".bias", "up_bias") if form.bias else None,
        down_bias=stacked((form.down,), ".bias", "down_bias") if form.bias else None,
        activation=Activation(form.activation, form.glu),
    )


def _form_reference(expert: nn.Module, form: ExpertForm):
    """The fused computation of one expert under a candidate wiring, as a module for probing."""

    class _Candidate(nn.Module):
        def forward(self, x):
            parts = [expert.get_submodule(p) for p in form.up]
            w_up = torch.cat([m.weight for m in parts], dim=0)
            b_up = torch.cat([m.bias for m in parts], dim=0) if form.bias else None
            down = expert.get_submodule(form.down)
            weights = Expert(w_up, down.weight, b_up, down.bias if form.bias else None)
            return mlp_forward(x, weights, Activation(form.activation, form.glu))

    return _Candidate()


def prove_expert_form(expert: nn.Module, hidden: int, tokens: int) -> ExpertForm | Skip:
    forms = expert_forms(expert, hidden)
    if isinstance(forms, Skip):
        return forms
    like = next(expert.parameters())
    if like.device.type == "meta":
        return Skip("parameters are on the meta device, so the expert MLP cannot be probed")
    x = probe_input((tokens, hidden), like)
    try:
        ref = run_module(expert, x)
    except Exception as exc:  # not a callable MLP (an attention expert's projections, a container)
        return Skip(f"the expert's forward failed on a probe input ({type(exc).__name__}: {str(exc)[:120]})")
    match = first_match(forms, lambda f: _form_reference(expert, f), ref, (x,))
    if match.candidate is None:
        return Skip(f"expert MLP not recognized: no candidate matched the probe ({match.reason(300)})")
    return match.candidate


def _top_k_hints(holders: tuple[nn.Module, ...], num_experts: int) -> list[int]:
    """k declared by the block, its router's owner or its experts' owner, else every k up to
    MAX_PROBED_K (the probe decides)."""
    k = int_attr(holders, TOPK_ATTRS, 1, num_experts)
    return [k] if k is not None else list(range(1, min(num_experts, MAX_PROBED_K) + 1))


def _parent(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path.rpartition(".")[0]) if "." in path else module


class HandwrittenMoEAdapter:
    """Adapter for plain-PyTorch MoE blocks: a router (a Linear or a raw Parameter, in the block or
    a gating child) and a ModuleList / ModuleDict of expert MLPs (a child or nested deeper)."""

    name = "handwritten"

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[MoESpec] | Skip | None:
        if not config.swap_moe:
            return None
        last_skip: Skip | None = None
        for list_name, items in expert_containers(module):
            experts = [m for _, m in items]
            if len({type(m) for m in experts}) != 1:
                continue
            routers = router_weights(module, len(experts), list_name)
            if not routers or not any(isinstance(m, nn.Linear) for m in experts[0].modules()):
                continue
            form: ExpertForm | Skip | None = None
            for hidden in dict.fromkeys(r.hidden for r in routers):
                form = prove_expert_form(experts[0], hidden, config.verify_tokens)
                if not isinstance(form, Skip):
                    break
            if isinstance(form, Skip):  # reported for direct children only: deeper lists are often not experts
                last_skip = Skip(f"{list_name}: {form.reason}") if "." not in list_name else last_skip
                continue
            shapes = {tuple(tuple(p.shape) for p in m.parameters()) for m in experts}
            if len(shapes) != 1:
                last_skip = Skip(f"{list_name}: experts differ in parameter shapes")
                continue
            capacity = declared_capacity(module)
            if capacity is not None:
                return Skip(f"{len(experts)} experts in {list_name} with a router, but the block declares an expert "
                            f"capacity ({capacity}) that drops tokens on long inputs, which the hand-written adapter "
                            "does not reproduce")
            prefixes = [f"{list_name}.{key}." for key, _ in items]
            return self._specs(module, list_name, prefixes, [r for r in routers if r.hidden == hidden], form)
        return last_skip

    def _specs(self, module, list_name, prefixes, routers, form: ExpertForm) -> list[MoESpec]:
        E = len(prefixes)
        first = module.get_submodule(prefixes[0][:-1])
        hidden = routers[0].hidden
        inter = first.get_submodule(form.up[0]).out_features
        experts_spec = form_experts_spec(form, prefixes, hidden, inter)
        specs = []
        for router in routers:
            owner = module.get_submodule(router.owner) if router.owner else module
            for k in _top_k_hints((module, owner, _parent(module, list_name)), E):
                for scoring, renorm in ROUTING_VARIANTS:
                    routing = TopKRouting(num_experts=E, top_k=k, scoring=scoring, renormalize=renorm)
                    rspec = LinearRouter(weight=router.weight, bias=router.bias, routing=routing,
                                         transposed=router.transposed)
                    specs.append(MoESpec(router=rspec, experts=experts_spec))
        return specs
