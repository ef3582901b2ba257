"""Expert layouts of transformers (v5) blocks, as candidate :class:`ExpertsSpec`.

Two layouts: a stacked experts module holding 3-D ``gate_up_proj`` (or ``up_proj``) and
``down_proj`` parameters, and two 3-D parameters living in separate child modules of a block.
The transposition comes from the flags transformers' experts interface records
(``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``) or, when absent, from the
shapes (:func:`~kernel_moe.adapters.structure.chain_layouts`); the activation is identified by
evaluating ``act_fn`` (or an overridden ``_apply_gate``), never by a model name.

Legend: T tokens, H hidden, E experts, I intermediate, N up features.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import torch
from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.handwritten import form_experts_spec, prove_expert_form
from kernel_moe.adapters.probe import POINTWISE, identify_activation, leaf_activations, mismatch, probe_input
from kernel_moe.adapters.structure import (
    ChainLayout,
    chain_layouts,
    numeric_attrs,
    same_transposition,
    tensor_attr,
)
from kernel_moe.kernels.activations import POINTWISE_KINDS, apply_activation
from kernel_moe.kernels.contract import Activation
from kernel_moe.layers.spec import ExpertsSpec, PostNorm
from kernel_moe.layers.weights import PairedRowsWeight, StackedWeight, get_attr_path


PROBE_TOKENS = 16


def is_stacked_experts(module: nn.Module) -> bool:
    """An experts module with 3-D up (gate_up_proj or up_proj) and down_proj parameters."""
    up = tensor_attr(module, "gate_up_proj")
    if up is None:
        up = tensor_attr(module, "up_proj")
    down = tensor_attr(module, "down_proj")
    return up is not None and down is not None and up.dim() == 3 and down.dim() == 3


def declared_hidden(experts: nn.Module) -> int | None:
    """The hidden size an experts module declares (``hidden_dim`` or ``hidden_size``), if any."""
    hidden = getattr(experts, "hidden_dim", None) or getattr(experts, "hidden_size", None)
    return hidden if isinstance(hidden, int) else None


def _default_gate_fn():
    try:
        from transformers.integrations.moe import _default_apply_gate
    except Exception:
        return None
    return _default_apply_gate


def _named(fragment: str):
    """A name test: whether an attribute name contains ``fragment`` (any case)."""
    return lambda name: fragment in name.lower()


def _module_numbers(module: nn.Module, fragment: str) -> list[float]:
    """Numeric attributes named like ``fragment`` of ``module`` and its submodules (the caps of a
    softcap held by the activation, a clamp limit on the experts), in module order, each once."""
    return list(dict.fromkeys(v for m in module.modules() for v in numeric_attrs(m, _named(fragment)) if v > 0))


def _gate_options(act: str | None, glus: tuple[str, ...], limits: list[float], caps: list[float],
                  alphas: list[float]) -> list[Activation]:
    """Gated activations a custom gate function may compute, most likely first: GPT-OSS's clamped
    GLU, act(gate) * up clamped at each declared limit (or not), and the softcapped SwiGLU with the
    declared caps in either role. Without an ``act_fn`` every pointwise activation is a candidate."""
    bounds = [*limits, math.inf]
    options = [Activation("gpt_oss", g, a, lim) for g in glus for a in alphas for lim in (limits or [math.inf])]
    options += [Activation(kind, g, limit=lim) for kind in ([act] if act else POINTWISE_KINDS) for g in glus
                for lim in bounds]
    cap_pairs = [(a, b) for a in [*caps, math.inf] for b in [*caps, math.inf] if (a, b) != (math.inf, math.inf)]
    options += [Activation("silu", g, limit=lim, gate_softcap=a, up_softcap=b) for (a, b) in cap_pairs
                for g in glus for lim in bounds]
    return options


def _activation_candidates(experts: nn.Module, has_gate: bool, glu_hint: str,
                           intermediate: int) -> list[Activation] | Skip:
    """Activations proven on the experts' own gate/act function.

    A custom ``_apply_gate`` is evaluated on a probe of unit-scale rows and rows wide enough to
    cross any clamp limit or softcap the module declares, so neither can hide behind small probe
    values (and neither hides the shape of the activation near zero)."""
    act_fn = getattr(experts, "act_fn", None)
    act = identify_activation(act_fn) if act_fn is not None else None
    apply_gate = getattr(type(experts), "_apply_gate", None)
    custom_gate = has_gate and apply_gate is not None and apply_gate is not _default_gate_fn()
    if not custom_gate:
        if act is None:
            return Skip(f"experts activation {type(act_fn).__name__} is not one of {', '.join(POINTWISE_KINDS)} "
                        "(the fused op has no other activation)")
        return [Activation(act, glu_hint if has_gate else "none")]
    limits = numeric_attrs(experts, _named("limit"))
    caps = _module_numbers(experts, "softcap")
    alphas = numeric_attrs(experts, _named("alpha")) or [1.702]
    options = _gate_options(act, tuple(dict.fromkeys((glu_hint, "concat", "interleaved"))), limits, caps, alphas)
    reach = max([4.0] + [3.0 * v for v in limits + caps])
    unit = probe_input((16, 2 * intermediate), experts.down_proj)
    h_TN = torch.cat([unit, unit * reach])
    try:
        with torch.no_grad():
            ref_TI = experts._apply_gate(h_TN)
    except Exception as exc:
        return Skip(f"experts._apply_gate failed on a probe: {type(exc).__name__}: {exc}")
    for opt in options:
        if mismatch(apply_activation(h_TN, opt), ref_TI) is None:
            return [opt]
    declared = ([f"a clamp limit {limits[0]:g}"] if limits else []) + ([f"softcaps {caps}"] if caps else [])
    return Skip(f"{type(experts).__name__}._apply_gate computes a gate function"
                + (f" (declaring {' and '.join(declared)})" if declared else "") + " that the fused op does not "
                f"(supported: act(gate) * up for {'/'.join(POINTWISE_KINDS)}, clamped at a declared limit or not, "
                "the softcapped SwiGLU with declared caps, and the GPT-OSS clamped GLU)")


def post_expert_norm(experts: nn.Module, prefix: str, sizes: tuple[int, ...]) -> PostNorm | Skip:
    """The norm an experts module applies to each expert output (transformers' ``has_post_expert_norm``:
    its ``post_expert_norm`` child), identified by evaluating it on a probe: the output scaled by
    ``offset + weight`` then RMS-normalised with the module's ``eps`` (the op's post-expert norm).
    ``sizes``: the dims of the down projection, one of which is H."""
    norm = getattr(experts, "post_expert_norm", None)
    weight = tensor_attr(norm, "weight") if isinstance(norm, nn.Module) else None
    eps = getattr(norm, "eps", None)
    if weight is None or weight.dim() != 1 or weight.shape[0] not in sizes or not isinstance(eps, float):
        return Skip("experts declare a post-expert norm without a post_expert_norm module holding a weight [H] and "
                    "an eps, which the fused op cannot read")
    y_TH = probe_input((PROBE_TOKENS, weight.shape[0]), weight, seed=11) * 3.0
    with torch.no_grad():
        ref_TH = norm(y_TH)
        for offset in (1.0, 0.0):
            z_TH = y_TH.double() * (weight.double() + offset)
            ours_TH = z_TH * torch.rsqrt(z_TH.square().mean(dim=-1, keepdim=True) + eps)
            if mismatch(ours_TH.to(ref_TH.dtype), ref_TH) is None:
                return PostNorm(_join(prefix, "post_expert_norm.weight"), offset, eps)
    return Skip(f"experts apply a post-expert norm ({type(norm).__name__}) that is not the fused op's (each output "
                "scaled by a weight [H], or 1 + weight, then RMS-normalised)")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _spec(num_experts: int, layout: ChainLayout, up: str, down: str, activation: Activation,
          biases: tuple[str, str] | None = None) -> ExpertsSpec:
    """The ExpertsSpec of 3-D weights at paths ``up`` and ``down`` read as ``layout``."""
    return ExpertsSpec(
        num_experts=num_experts, hidden=layout.hidden, intermediate=layout.intermediate,
        up=StackedWeight(up, transposed=layout.up_transposed),
        down=StackedWeight(down, transposed=layout.down_transposed),
        up_bias=StackedWeight(biases[0]) if biases else None,
        down_bias=StackedWeight(biases[1]) if biases else None,
        activation=activation,
    )


def experts_specs(experts: nn.Module, prefix: str, hidden: int | None,
                  routed_ids: int | None = None) -> list[ExpertsSpec] | Skip:
    """Candidate ExpertsSpecs for a stacked experts module at attribute path ``prefix``.

    ``hidden`` comes from the router when known; otherwise it is read from the weight shapes
    (both layouts are proposed when the shapes alone do not settle it). ``routed_ids``: G when
    the block's router scores more ids than down_proj holds experts (weightless experts); the up
    projection may then hold G experts, of which the E with a down projection are used."""
    has_gate = tensor_attr(experts, "gate_up_proj") is not None
    up_name = "gate_up_proj" if has_gate else "up_proj"
    w_up, w_down = getattr(experts, up_name), experts.down_proj
    E = w_down.shape[0]
    post_norm = None
    if getattr(experts, "has_post_expert_norm", False):
        post_norm = post_expert_norm(experts, prefix, w_down.shape[1:])
        if isinstance(post_norm, Skip):
            return post_norm
    if w_up.shape[0] not in (E, routed_ids):
        return Skip(f"{_join(prefix, up_name)} holds {w_up.shape[0]} experts but down_proj holds {E} "
                    "(extra experts without a down projection, e.g. identity experts)")
    glu_hint = "concat" if getattr(experts, "is_concatenated", True) else "interleaved"
    has_bias = getattr(experts, "has_bias", None)
    if has_bias is None:
        has_bias = tensor_attr(experts, up_name + "_bias") is not None
    biases = (_join(prefix, up_name + "_bias"), _join(prefix, "down_proj_bias")) if has_bias else None
    layouts = chain_layouts((E, *w_up.shape[1:]), w_down.shape, hidden, gated=has_gate,
                            transpositions=same_transposition(getattr(experts, "is_transposed", None)))
    specs: list[ExpertsSpec] = []
    for layout in layouts:
        acts = _activation_candidates(experts, has_gate, glu_hint, layout.intermediate)
        if isinstance(acts, Skip):
            return acts
        specs += [replace(_spec(E, layout, _join(prefix, up_name), _join(prefix, "down_proj"), act, biases),
                          post_norm=post_norm) for act in acts]
    return specs or Skip(f"{_join(prefix, up_name)} shape {tuple(w_up.shape)} and down_proj {tuple(w_down.shape)} "
                         "do not chain")


def _split_biases(block: nn.Module, up_path: str, down_path: str, num_experts: int,
                  layout: ChainLayout) -> tuple[str, str] | None:
    """Paths of the experts' biases beside split 3-D weights: the 2-D parameters [E, N] and [E, H]
    named after each weight (``<weight>_bias``), or None when the experts have none."""
    N = layout.intermediate * (2 if layout.gated else 1)
    found = []
    for path, features in ((up_path, N), (down_path, layout.hidden)):
        owner_path, _, name = path.rpartition(".")
        t = tensor_attr(block.get_submodule(owner_path) if owner_path else block, name + "_bias")
        if t is None or tuple(t.shape) != (num_experts, features):
            return None
        found.append(path + "_bias")
    return found[0], found[1]


def split_experts_specs(block: nn.Module, paths: tuple[str, str], hidden: int) -> list[ExpertsSpec] | Skip:
    """Candidate ExpertsSpecs for two 3-D weights at ``paths`` in separate modules of ``block``:
    every (up, down) assignment and transposition the shapes allow, each with the activations
    the block could apply."""
    a, b = paths
    acts = list(dict.fromkeys(leaf_activations(block))) or list(POINTWISE)
    specs = []
    for up_path, down_path in ((a, b), (b, a)):
        up, down = get_attr_path(block, up_path), get_attr_path(block, down_path)
        owner = block.get_submodule(up_path.rpartition(".")[0])
        for layout in chain_layouts(up.shape, down.shape, hidden):
            glus = ["concat", "interleaved"] if layout.gated else ["none"]
            options = [Activation(act, glu) for act, glu in itertools.product(acts, glus)]
            if layout.gated:  # GPT-OSS's clamped GLU, at a limit the experts declare (or none)
                limits = [v for v in numeric_attrs(owner, _named("limit")) if v > 0] or [math.inf]
                alphas = numeric_attrs(owner, _named("alpha")) or [1.702]
                options += [Activation("gpt_oss", g, al, lim) for g in glus for al in alphas for lim in limits]
            biases = _split_biases(block, up_path, down_path, up.shape[0], layout)
            specs += [_spec(up.shape[0], layout, up_path, down_path, act, biases) for act in options]
    return specs or Skip(f"3-D weights {a} {tuple(get_attr_path(block, a).shape)} and {b} "
                         f"{tuple(get_attr_path(block, b).shape)} do not chain H={hidden} -> I -> H")


def packed_experts_specs(block: nn.Module, paths: tuple[str, ...], num_experts: int,
                         hidden: int) -> list[ExpertsSpec] | Skip:
    """Candidate ExpertsSpecs for packed 2-D weights [E * I, H] at ``paths`` (DBRX): three are gate,
    up and down in some order (gate and up read row-interleaved without a copy, down as the [E, I, H]
    view of a transposed [E, H, I]), two are up and down; every order, declared order first, with the
    activations the experts' module computes."""
    E = num_experts
    shapes = {p: tuple(get_attr_path(block, p).shape) for p in paths}
    if any(shape[1] != hidden for shape in shapes.values()):
        listed = ", ".join(f"{p} {list(shape)}" for p, shape in shapes.items())
        return Skip(f"packed expert weights ({listed}) store gate and up as [E*H, I] blocks, which the fused "
                    "op does not read")
    rows = shapes[paths[0]][0]
    owner = block.get_submodule(paths[0].rpartition(".")[0])
    acts = list(dict.fromkeys(leaf_activations(owner))) or list(POINTWISE)
    specs = []
    for order in itertools.permutations(paths):
        down = StackedWeight(order[-1], transposed=True, experts=E)
        if len(order) == 3:
            up, glu = PairedRowsWeight(order[0], order[1], E), "interleaved"
        else:
            up, glu = StackedWeight(order[0], experts=E), "none"
        specs += [ExpertsSpec(num_experts=E, hidden=hidden, intermediate=rows // E, up=up, down=down,
                              activation=Activation(act, glu)) for act in acts]
    return specs or Skip(f"packed expert weights {', '.join(paths)} give no candidate")


def list_experts_specs(block: nn.Module, name: str, hidden: int) -> list[ExpertsSpec] | Skip:
    """The ExpertsSpec of a container ``name`` of identical expert MLPs (Switch Transformers): the
    wiring of one expert (which Linear is up, gate, down; the activation) proven on a probe, each
    expert's Linear weights stacked as the hand-written adapter stacks a ModuleList."""
    container = block.get_submodule(name)
    items = [(n, c) for n, c in container.named_children() if any(True for _ in c.parameters())]
    form = prove_expert_form(items[0][1], hidden, PROBE_TOKENS)
    if isinstance(form, Skip):
        return Skip(f"{name}: {form.reason}")
    inter = items[0][1].get_submodule(form.up[0]).out_features
    return [form_experts_spec(form, [f"{name}.{n}." for n, _ in items], hidden, inter)]


__all__ = ["declared_hidden", "experts_specs", "is_stacked_experts", "list_experts_specs", "packed_experts_specs",
           "post_expert_norm", "split_experts_specs"]
