"""transformers (v5 layout) MoE blocks: a router holding a [E, H] weight and an experts module
holding 3-D ``gate_up_proj`` / ``up_proj`` and ``down_proj`` parameters.

Nothing here is keyed on a model name. The layout comes from the flags transformers'
experts interface records (``is_transposed``, ``is_concatenated``, ``has_bias``,
``has_gate``) or, when absent, from the tensor shapes; the activation is identified by
evaluating ``act_fn`` (or an overridden ``_apply_gate``); routing variants are proposed from
the router's attributes and proven on a probe input by the manager.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.probe import identify_activation, mismatch, probe_input
from kernel_moe.config import KernelConfig
from kernel_moe.layers.spec import ExpertsOnlySpec, ExpertsSpec, MoESpec, RouterSpec
from kernel_moe.layers.weights import StackedWeight
from kernel_moe.reference.activations import apply_activation
from kernel_moe.routing.topk import RoutingSpec

SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
SHARED_GATE_NAMES = ("shared_expert_gate", "shared_gate")


def is_stacked_experts(module: nn.Module) -> bool:
    """An experts module with 3-D up (gate_up_proj or up_proj) and down_proj parameters."""
    up = getattr(module, "gate_up_proj", None)
    if not isinstance(up, torch.Tensor):
        up = getattr(module, "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3


def _default_gate_fn():
    try:
        from transformers.integrations.moe import _default_apply_gate
    except Exception:
        return None
    return _default_apply_gate


def _activation_candidates(experts: nn.Module, has_gate: bool, glu_hint: str, intermediate: int) -> list[tuple] | Skip:
    """(activation, glu, alpha, limit) candidates proven on the experts' own gate/act function."""
    act_fn = getattr(experts, "act_fn", None)
    act = identify_activation(act_fn) if act_fn is not None else None
    apply_gate = getattr(type(experts), "_apply_gate", None)
    custom_gate = has_gate and apply_gate is not None and apply_gate is not _default_gate_fn()
    if not custom_gate:
        if act is None:
            return Skip(f"experts activation {type(act_fn).__name__} is not one of silu, gelu, gelu_tanh, relu")
        return [(act, glu_hint if has_gate else "none", 1.702, math.inf)]
    alpha = float(getattr(experts, "alpha", 1.702))
    limit = float(getattr(experts, "limit", math.inf))
    options = [("gpt_oss", g, alpha, limit) for g in ("interleaved", "concat")]
    if act is not None:
        options += [(act, g, 1.702, math.inf) for g in ("concat", "interleaved")]
    like = experts.down_proj
    h = probe_input((16, 2 * intermediate), like) * 4
    try:
        with torch.no_grad():
            ref = experts._apply_gate(h)
    except Exception as exc:
        return Skip(f"experts._apply_gate failed on a probe: {type(exc).__name__}: {exc}")
    for opt in options:
        if mismatch(apply_activation(h, *opt), ref) is None:
            return [opt]
    return Skip(f"{type(experts).__name__}._apply_gate computes a gate function that is not supported")


def _int_attr(objs, names, default=None):
    for obj in objs:
        for n in names:
            v = getattr(obj, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return default


def _routing_candidates(block: nn.Module, router: nn.Module, num_experts: int, has_sel_bias: bool,
                        has_router_bias: bool) -> list[RoutingSpec] | Skip:
    cfg = getattr(block, "config", None) or getattr(router, "config", None)
    objs = [router, block] + ([cfg] if cfg is not None else [])
    k = _int_attr(objs, ("top_k", "num_experts_per_tok", "moe_topk", "num_experts_per_token"))
    if k is None or not 1 <= k <= num_experts:
        return Skip(f"top-k not found on the router or block (got {k!r})")
    scaling = 1.0
    for obj in objs:
        v = getattr(obj, "routed_scaling_factor", None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            scaling = float(v)
            break
    n_group = _int_attr(objs, ("n_group", "num_expert_group"), 1) or 1
    topk_group = _int_attr(objs, ("topk_group",), 1) or 1
    norm_hint = None
    for obj in objs:
        v = getattr(obj, "norm_topk_prob", None)
        if isinstance(v, bool):
            norm_hint = v
            break
    renorms = [norm_hint, not norm_hint] if norm_hint is not None else [True, False]
    scorings = ["sigmoid", "softmax"] if has_sel_bias else ["softmax", "sigmoid"]
    groups = [(n_group, topk_group)] if n_group > 1 and num_experts % n_group == 0 else [(1, 1)]
    specs = []
    if has_router_bias:
        specs.append(RoutingSpec(num_experts, k, "softmax", "topk_then_score"))
    for scoring in scorings:
        for renorm in renorms:
            for scale in dict.fromkeys((scaling, 1.0)):
                for g, tg in groups:
                    specs.append(RoutingSpec(num_experts, k, scoring, "score_then_topk", renorm, scale, g, tg))
    if not has_router_bias:
        specs.append(RoutingSpec(num_experts, k, "softmax", "topk_then_score"))
    return specs


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def experts_specs(experts: nn.Module, prefix: str, hidden: int | None) -> list[ExpertsSpec] | Skip:
    """Candidate ExpertsSpecs for a stacked experts module at attribute path ``prefix``.

    ``hidden`` comes from the router when known; otherwise it is read from the weight shapes
    (both layouts are proposed when the shapes alone do not settle it)."""
    has_gate = isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
    up_name = "gate_up_proj" if has_gate else "up_proj"
    w_up, w_down = getattr(experts, up_name), experts.down_proj
    E = w_down.shape[0]
    if getattr(experts, "has_post_expert_norm", False):
        return Skip("experts apply a post-expert norm, which the fused op does not compute")
    flag = getattr(experts, "is_transposed", None)
    layouts = [flag] if isinstance(flag, bool) else [False, True]
    glu_hint = "concat" if getattr(experts, "is_concatenated", True) else "interleaved"
    has_bias = getattr(experts, "has_bias", None)
    if has_bias is None:
        has_bias = isinstance(getattr(experts, up_name + "_bias", None), torch.Tensor)
    specs: list[ExpertsSpec] = []
    reason = f"{_join(prefix, up_name)} shape {tuple(w_up.shape)} and down_proj {tuple(w_down.shape)} do not chain"
    for transposed in layouts:
        H_w, N = (w_up.shape[1], w_up.shape[2]) if transposed else (w_up.shape[2], w_up.shape[1])
        down_shape = (E, N // 2 if has_gate else N, H_w) if transposed else (E, H_w, N // 2 if has_gate else N)
        if (hidden is not None and H_w != hidden) or tuple(w_down.shape) != down_shape or w_up.shape[0] != E:
            continue
        I = N // 2 if has_gate else N
        acts = _activation_candidates(experts, has_gate, glu_hint, I)
        if isinstance(acts, Skip):
            return acts
        for act, glu, alpha, limit in acts:
            specs.append(ExpertsSpec(
                num_experts=E, hidden=H_w, intermediate=I,
                up=StackedWeight(_join(prefix, up_name), transposed=transposed),
                down=StackedWeight(_join(prefix, "down_proj"), transposed=transposed),
                up_bias=StackedWeight(_join(prefix, up_name + "_bias")) if has_bias else None,
                down_bias=StackedWeight(_join(prefix, "down_proj_bias")) if has_bias else None,
                activation=act, glu=glu, alpha=alpha, limit=limit,
            ))
    return specs or Skip(reason)


class TransformersMoEAdapter:
    """Adapter for transformers MoE blocks with 3-D stacked expert weights."""

    name = "transformers"

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[MoESpec] | Skip | None:
        if not config.swap_moe:
            return None
        found = [(n, c) for n, c in module.named_children() if is_stacked_experts(c)]
        if not found:
            return None
        ex_name, experts = found[0]
        E = experts.down_proj.shape[0]
        routers = [
            (p, m) for p, m in module.named_modules()
            if p and not p.startswith(ex_name) and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2 and m.weight.shape[0] == E
        ]
        if not routers:
            return Skip(f"{ex_name}: no router with a [{E}, H] weight found in the block")
        router_path, router = routers[0]
        H = router.weight.shape[1]
        ex_specs = experts_specs(experts, ex_name, H)
        if isinstance(ex_specs, Skip):
            return ex_specs
        sel_bias = f"{router_path}.e_score_correction_bias" if isinstance(
            getattr(router, "e_score_correction_bias", None), torch.Tensor) else None
        router_bias = router_path + ".bias" if isinstance(getattr(router, "bias", None), torch.Tensor) else None
        routings = _routing_candidates(module, router, E, sel_bias is not None, router_bias is not None)
        if isinstance(routings, Skip):
            return routings
        shared = next((n for n in SHARED_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
        shared_gate = next((n for n in SHARED_GATE_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
        jitter = getattr(module, "jitter_noise", 0.0)
        specs = []
        for experts_spec in ex_specs:
            for routing in routings:
                for fp32 in (False, True):
                    rspec = RouterSpec(weight=router_path + ".weight", bias=router_bias, routing=routing,
                                       selection_bias=sel_bias, fp32_logits=fp32)
                    specs.append(MoESpec(router=rspec, experts=experts_spec, shared_expert=shared,
                                         shared_gate=shared_gate,
                                         input_jitter=float(jitter) if isinstance(jitter, (int, float)) else 0.0))
        return specs


class TransformersExpertsAdapter:
    """Adapter for a stacked experts module on its own (``forward(hidden, top_k_index,
    top_k_weights)``), used when its block was not swapped whole."""

    name = "transformers-experts"

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[ExpertsOnlySpec] | Skip | None:
        if not config.swap_moe or not is_stacked_experts(module):
            return None
        hidden = getattr(module, "hidden_dim", None) or getattr(module, "hidden_size", None)
        specs = experts_specs(module, "", hidden if isinstance(hidden, int) else None)
        if isinstance(specs, Skip):
            return specs
        return [ExpertsOnlySpec(experts=s) for s in specs]
