"""Hand-written MoE blocks: a gate ``nn.Linear(H, E)`` and an ``nn.ModuleList`` of E expert MLPs.

Recognized by structure, whatever the attribute names: the experts are the block's
ModuleList child whose items share one class and hold two Linear layers (up, down) or three
(gate, up, down); the router is a Linear(H, E) elsewhere in the block (directly or inside
a gating submodule). Which Linear is the gate, the activation, the routing variant and top-k
are then settled by computation: the first candidate whose output matches the original on a
probe input is the one swapped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from kernel_moe.adapters.base import Skip
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


def _top_k_hints(module: nn.Module, router_owner: nn.Module, num_experts: int) -> list[int]:
    """k declared by the block or its router's owner, else every k up to MAX_PROBED_K (the probe decides)."""
    k = int_attr((module, router_owner), TOPK_ATTRS, 1, num_experts)
    return [k] if k is not None else list(range(1, min(num_experts, MAX_PROBED_K) + 1))


class HandwrittenMoEAdapter:
    """Adapter for plain-PyTorch MoE blocks (gate Linear + ModuleList of expert MLPs)."""

    name = "handwritten"

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[MoESpec] | Skip | None:
        if not config.swap_moe:
            return None
        lists = [(n, c) for n, c in module.named_children() if isinstance(c, nn.ModuleList) and len(c) > 0]
        last_skip: Skip | None = None
        for list_name, experts in lists:
            if len({type(m) for m in experts}) != 1:
                continue
            E = len(experts)
            routers = [
                (p, m)
                for p, m in module.named_modules()
                if isinstance(m, nn.Linear) and m.out_features == E and not p.startswith(list_name + ".")
            ]
            if not routers:
                continue
            hidden = routers[0][1].in_features
            if not any(isinstance(m, nn.Linear) for m in experts[0].modules()):
                continue
            form = prove_expert_form(experts[0], hidden, config.verify_tokens)
            if isinstance(form, Skip):
                last_skip = Skip(f"{list_name}: {form.reason}")
                continue
            shapes = {tuple(tuple(p.shape) for p in m.parameters()) for m in experts}
            if len(shapes) != 1:
                last_skip = Skip(f"{list_name}: experts differ in parameter shapes")
                continue
            return self._specs(module, list_name, experts, routers, hidden, form)
        return last_skip

    def _specs(self, module, list_name, experts, routers, hidden, form: ExpertForm) -> list[MoESpec]:
        E = len(experts)
        inter = experts[0].get_submodule(form.up[0]).out_features
        experts_spec = form_experts_spec(form, [f"{list_name}.{e}." for e in range(E)], hidden, inter)
        specs = []
        for router_path, router in routers:
            owner = module.get_submodule(router_path.rpartition(".")[0]) if "." in router_path else module
            for k in _top_k_hints(module, owner, E):
                for scoring, renorm in ROUTING_VARIANTS:
                    routing = TopKRouting(num_experts=E, top_k=k, scoring=scoring, renormalize=renorm)
                    rspec = LinearRouter(
                        weight=router_path + ".weight",
                        bias=router_path + ".bias" if router.bias is not None else None,
                        routing=routing,
                    )
                    specs.append(MoESpec(router=rspec, experts=experts_spec))
        return specs
