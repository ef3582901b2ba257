"""transformers (v5 layout) MoE blocks: a router holding a [E, H] weight and an experts module
holding 3-D ``gate_up_proj`` / ``up_proj`` and ``down_proj`` parameters.

Nothing here is keyed on a model name. The experts layout comes from the flags transformers'
experts interface records (``is_transposed``, ``is_concatenated``, ``has_bias``,
``has_gate``) or, when absent, from the tensor shapes; the activation is identified by
evaluating ``act_fn`` (or an overridden ``_apply_gate``). The block's parts are found by
structure: the router is the submodule holding an [E, H] weight, a selection bias is any
[E] tensor of the block outside the experts, a shared expert is a dense FFN child mapping
H -> H, its gate a Linear(H, 1). Routing variants are proposed from the router's attributes
and pruned by running the router itself on a probe input (its outputs are recognised by
dtype and shape, never by position); the manager proves the survivors on the whole block.

Legend: T tokens, H hidden, E experts, K top-k, I intermediate, N up features.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.probe import POINTWISE, eval_mode, identify_activation, mismatch, probe_input
from kernel_moe.config import KernelConfig
from kernel_moe.kernels.contract import Activation
from kernel_moe.layers.spec import ExpertsOnlySpec, ExpertsSpec, MoESpec, RouterSpec
from kernel_moe.layers.weights import StackedWeight, get_attr_path
from kernel_moe.kernels.activations import apply_activation
from kernel_moe.routing.topk import RoutingSpec, route

SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
SHARED_GATE_NAMES = ("shared_expert_gate", "shared_gate")
TOPK_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "num_experts_per_token", "top_k_experts", "moe_k",
              "moe_top_k", "num_selected_experts", "experts_per_token")
GROUP_ATTRS = ("n_group", "num_expert_group", "num_group")
TOPK_GROUP_ATTRS = ("topk_group", "num_topk_group")
_SCALE_NAME = re.compile(r"(rout|moe|expert).*scal|scal.*(rout|moe|expert)", re.IGNORECASE)
ROUTER_PROBE_TOKENS = 32


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


def _float_attrs(obj: object, pattern: str) -> list[float]:
    """Finite numeric attribute values of ``obj`` whose name contains ``pattern``."""
    values = []
    for name, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
        if pattern in name.lower() and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                values.append(float(value))
    return values


def _activation_candidates(experts: nn.Module, has_gate: bool, glu_hint: str, intermediate: int) -> list[tuple] | Skip:
    """(activation, glu, alpha, limit) candidates proven on the experts' own gate/act function.

    A custom ``_apply_gate`` is evaluated on a probe wide enough to cross any clamp limit the
    module declares, so a clamp cannot hide behind small probe values."""
    act_fn = getattr(experts, "act_fn", None)
    act = identify_activation(act_fn) if act_fn is not None else None
    apply_gate = getattr(type(experts), "_apply_gate", None)
    custom_gate = has_gate and apply_gate is not None and apply_gate is not _default_gate_fn()
    if not custom_gate:
        if act is None:
            return Skip(f"experts activation {type(act_fn).__name__} is not one of silu, gelu, gelu_tanh, relu "
                        "(the fused op has no other activation)")
        return [(act, glu_hint if has_gate else "none", 1.702, math.inf)]
    limits = _float_attrs(experts, "limit")
    alphas = _float_attrs(experts, "alpha") or [1.702]
    options = [("gpt_oss", g, a, lim) for g in dict.fromkeys((glu_hint, "interleaved", "concat"))
               for a in alphas for lim in (limits or [math.inf])]
    if act is not None:
        options += [(act, g, 1.702, math.inf) for g in dict.fromkeys((glu_hint, "concat", "interleaved"))]
    like = experts.down_proj
    reach = max([4.0] + [3.0 * lim for lim in limits])
    h = probe_input((16, 2 * intermediate), like) * reach
    try:
        with torch.no_grad():
            ref = experts._apply_gate(h)
    except Exception as exc:
        return Skip(f"experts._apply_gate failed on a probe: {type(exc).__name__}: {exc}")
    for opt in options:
        if mismatch(apply_activation(h, Activation(*opt)), ref) is None:
            return [opt]
    clamp = f" with a clamp limit {limits[0]:g}" if limits else ""
    return Skip(f"{type(experts).__name__}._apply_gate computes a gate function{clamp} that the fused op does not "
                "(supported: act(gate) * up for silu/gelu/gelu_tanh/relu, and the GPT-OSS clamped GLU)")


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
        return Skip("experts apply a norm to each expert output before the routing weight (post-expert norm), "
                    "which the fused op does not compute")
    if w_up.shape[0] != E:
        return Skip(f"{_join(prefix, up_name)} holds {w_up.shape[0]} experts but down_proj holds {E} "
                    "(extra experts without a down projection, e.g. identity experts)")
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
        if (hidden is not None and H_w != hidden) or tuple(w_down.shape) != down_shape:
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
                activation=Activation(act, glu, alpha, limit),
            ))
    return specs or Skip(reason)


# --- the parts of a block ----------------------------------------------------------------------


@dataclass
class BlockParts:
    """What a block is made of, found by structure (paths relative to the block).

    The experts are either one stacked experts module (``experts_name``/``experts``) or, for
    blocks whose up and down projections live in separate modules, two 3-D parameters
    (``split``: their paths)."""

    experts_name: str
    experts: nn.Module | None
    num_experts: int
    hidden: int
    router_path: str  # the module owning the [E, H] weight
    router_owner: str  # the block's child that holds the router (called to observe routing)
    logits_bias: str | None
    selection_biases: list[str]
    shared: str | None
    shared_gate: str | None
    extra: list[str] = field(default_factory=list)
    split: tuple[str, str] | None = None
    experts_children: tuple[str, ...] = ()
    output_biases: list[str] = field(default_factory=list)


def _is_dense_ffn(module: nn.Module, hidden: int) -> bool:
    """A module whose parameters are Linear layers reading H and writing H (a dense FFN)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    own = {id(p) for p in module.parameters()}
    if not linears or own != {id(p) for m in linears for p in m.parameters()}:
        return False
    return any(m.in_features == hidden for m in linears) and any(m.out_features == hidden for m in linears)


def block_parts(module: nn.Module) -> BlockParts | Skip | None:
    """The parts of a block with a stacked experts child, or None when it has none."""
    found = [(n, c) for n, c in module.named_children() if is_stacked_experts(c)]
    split = None
    if len(found) > 1:
        return Skip(f"block holds {len(found)} experts modules ({', '.join(n for n, _ in found)}); "
                    "the fused layer routes to one")
    if found:
        ex_name, experts = found[0]
        E = experts.down_proj.shape[0]
        ex_children: tuple[str, ...] = (ex_name,)
    else:
        split = _split_experts(module)
        if split is None:
            return None
        ex_name, experts = "", None
        E = get_attr_path(module, split[0]).shape[0]
        ex_children = tuple(dict.fromkeys(p.split(".")[0] for p in split))
    routers = [
        (p, m) for p, m in module.named_modules()
        if p and p.split(".")[0] not in ex_children and isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() == 2 and m.weight.shape[0] == E
    ]
    if not routers:
        if split is not None:
            return None
        return Skip(f"{ex_name}: no router with a [{E}, H] weight found in the block")
    router_path, router = routers[0]
    H = router.weight.shape[1]
    if split is not None:
        a, b = (get_attr_path(module, p) for p in split)
        if not (_chains(a, b, H) or _chains(b, a, H)):
            return None
    owner = router_path.split(".")[0]
    rbias = getattr(router, "bias", None)
    logits_bias = router_path + ".bias" if isinstance(rbias, torch.Tensor) and rbias.numel() == E else None
    shared = shared_gate = None
    extra = []
    for name, child in module.named_children():
        if name in ex_children or name == owner or not any(True for _ in child.parameters()):
            continue
        if isinstance(child, nn.Linear) and child.in_features == H and child.out_features == 1 and shared_gate is None:
            shared_gate = name
        elif (_is_dense_ffn(child, H) or name in SHARED_NAMES) and shared is None:
            shared = name
        else:
            extra.append(name)
    if split is not None and extra:
        return None  # two 3-D weights inside a larger module: not recognised as an MoE block
    skip_prefixes = tuple(p + "." for p in (*ex_children, shared, shared_gate) if p)
    sel = []
    for path, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        if path.startswith(skip_prefixes) or path == logits_bias or path == router_path + ".weight":
            continue
        if t.is_floating_point() and t.numel() == E and t.dim() in (1, 2) and t.shape[-1] == E:
            sel.append(path)
    out_bias = [n for n, t in module.named_parameters(recurse=False) if t.dim() == 1 and t.numel() == H and n not in sel]
    return BlockParts(ex_name, experts, E, H, router_path, owner, logits_bias, sel, shared, shared_gate, extra,
                      split, ex_children, out_bias)


def _split_experts(module: nn.Module) -> tuple[str, str] | None:
    """Paths of the two 3-D parameters [E, ., .] of a block whose up and down projections live in
    separate child modules (the order is settled later by the shapes), or None. Parameters of
    convolutions and of stacked experts modules deeper in the tree do not count."""
    threed = []
    for path, owner in module.named_modules():
        if isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (path and is_stacked_experts(owner)):
            continue
        for name, t in owner.named_parameters(recurse=False):
            if t.dim() == 3 and t.is_floating_point():
                threed.append((f"{path}.{name}" if path else name, t))
    if len(threed) != 2 or threed[0][1].shape[0] != threed[1][1].shape[0]:
        return None
    if any("." not in p or p.count(".") > 2 for p, _ in threed):
        return None
    return threed[0][0], threed[1][0]


def _chains(up: torch.Tensor, down: torch.Tensor, hidden: int) -> bool:
    """Whether some transposition of (up, down) reads H, writes H and has N in (I, 2I)."""
    for up_t, down_t in itertools.product((False, True), repeat=2):
        N, H_up = (up.shape[2], up.shape[1]) if up_t else (up.shape[1], up.shape[2])
        I, H_down = (down.shape[1], down.shape[2]) if down_t else (down.shape[2], down.shape[1])
        if H_up == hidden and H_down == hidden and N in (I, 2 * I):
            return True
    return False


def split_experts_specs(block: nn.Module, parts: BlockParts) -> list[ExpertsSpec] | Skip:
    """Candidate ExpertsSpecs for two separate 3-D weights: every (up, down) assignment and
    transposition the shapes allow, each with the activations the block could apply."""
    H, E = parts.hidden, parts.num_experts
    a, b = parts.split  # type: ignore[misc]
    acts = [name for m in block.modules() if next(m.children(), None) is None and not any(True for _ in m.parameters())
            for name in [identify_activation(m)] if name is not None]
    acts = list(dict.fromkeys(acts)) or list(POINTWISE)
    specs = []
    for up_path, down_path in ((a, b), (b, a)):
        up, down = get_attr_path(block, up_path), get_attr_path(block, down_path)
        for up_t, down_t in itertools.product((False, True), repeat=2):
            N = up.shape[2] if up_t else up.shape[1]
            H_up = up.shape[1] if up_t else up.shape[2]
            I = down.shape[1] if down_t else down.shape[2]
            H_down = down.shape[2] if down_t else down.shape[1]
            if H_up != H or H_down != H or N not in (I, 2 * I):
                continue
            glus = ["concat", "interleaved"] if N == 2 * I else ["none"]
            for act, glu in itertools.product(acts, glus):
                specs.append(ExpertsSpec(num_experts=E, hidden=H, intermediate=I,
                                         up=StackedWeight(up_path, transposed=up_t),
                                         down=StackedWeight(down_path, transposed=down_t),
                                         activation=Activation(act, glu)))
    return specs or Skip(f"3-D weights {a} {tuple(get_attr_path(block, a).shape)} and {b} "
                         f"{tuple(get_attr_path(block, b).shape)} do not chain H={H} -> I -> H")


# --- routing candidates ----------------------------------------------------------------------


def _hint_objects(block: nn.Module, parts: BlockParts) -> list[object]:
    router = block.get_submodule(parts.router_path)
    owner = block.get_submodule(parts.router_owner)
    objs: list[object] = []
    for obj in (router, owner, block):
        if obj not in objs:
            objs.append(obj)
    for obj in list(objs):
        cfg = getattr(obj, "config", None)
        if cfg is not None and cfg not in objs:
            objs.append(cfg)
    return objs


def _int_attr(objs, names) -> int | None:
    for obj in objs:
        for n in names:
            v = getattr(obj, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def _scales(objs) -> list[float]:
    """Routed-output scaling factors declared by the router, block or config, then 1.0."""
    values = []
    for obj in objs:
        for name, v in (vars(obj).items() if hasattr(obj, "__dict__") else ()):
            if _SCALE_NAME.search(name) and isinstance(v, (int, float)) and not isinstance(v, bool):
                if math.isfinite(float(v)) and float(v) > 0:
                    values.append(float(v))
    return list(dict.fromkeys(values + [1.0]))


@dataclass(frozen=True)
class RoutingCandidate:
    routing: RoutingSpec
    selection_bias: str | None
    logits_bias: str | None


def routing_candidates(block: nn.Module, parts: BlockParts, top_k: int) -> list[RoutingCandidate]:
    """Routing interpretations of the block, most likely first (from the attributes' hints)."""
    objs = _hint_objects(block, parts)
    E = parts.num_experts
    norm_hint = next((v for o in objs for v in [getattr(o, "norm_topk_prob", None)] if isinstance(v, bool)), None)
    renorms = [norm_hint, not norm_hint] if norm_hint is not None else [True, False]
    scoring_hint = next((v for o in objs for v in [getattr(o, "scoring_func", None)] if v in ("softmax", "sigmoid")),
                        None)
    scorings = ["sigmoid", "softmax"] if parts.selection_biases or scoring_hint == "sigmoid" else ["softmax", "sigmoid"]
    G = _int_attr(objs, GROUP_ATTRS) or 1
    TG = _int_attr(objs, TOPK_GROUP_ATTRS) or 1
    groups = [(1, 1, "top2_sum")]
    if G > 1 and E % G == 0 and 1 <= TG <= G and top_k <= TG * (E // G):
        groups = [(G, TG, "top2_sum"), (G, TG, "max"), (1, 1, "top2_sum")]
    scales = _scales(objs)
    biases: list[str | None] = list(parts.selection_biases) + [None]
    logit_biases = [parts.logits_bias, None] if parts.logits_bias else [None]
    out: list[RoutingCandidate] = []

    def add(selection_bias: str | None, logits_bias: str | None, **routing: object) -> None:
        try:
            spec = RoutingSpec(E, top_k, **routing)  # type: ignore[arg-type]
        except ValueError:  # a combination the spec rejects (e.g. groups too small for k)
            return
        out.append(RoutingCandidate(spec, selection_bias, logits_bias))

    for lb in logit_biases:
        if lb is not None:  # a bias on the logits: GPT-OSS style top-k of the logits, then softmax
            for scale in scales:
                add(None, lb, scoring="softmax", order="topk_then_score", scaling=scale)
        for sel, scoring, renorm, (g, tg, gs), scale in itertools.product(biases, scorings, renorms, groups, scales):
            add(sel, lb, scoring=scoring, renormalize=renorm, scaling=scale, num_groups=g, topk_groups=tg,
                group_score=gs)
        for sel, renorm, scale in itertools.product(biases, renorms, scales):
            if sel is not None:
                add(sel, lb, scoring="sigmoid", renormalize=renorm, scaling=scale, selection_on="logits")
        if lb is None:
            for sel, scale in itertools.product(biases, scales):
                add(sel, lb, scoring="softmax", order="topk_then_score", scaling=scale)
    return list(dict.fromkeys(out))


@dataclass
class RouterObservation:
    """What the router returned on a probe: expert ids [T, K] and the float [T, K] tensors."""

    ids_TK: torch.Tensor
    weights_TK: list[torch.Tensor]
    bias_arg: str | None  # the selection bias passed as the router's second argument, if any


def _recognise(outputs: object, tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """Expert ids and same-shaped float tensors among a router's outputs (by dtype and shape)."""
    flat = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    ids = [t for t in tensors if not t.is_floating_point() and t.dtype != torch.bool and t.dim() >= 1
           and t.numel() % tokens == 0 and t.numel() // tokens >= 1]
    if len(ids) != 1:
        return None
    K = ids[0].numel() // tokens
    ids_TK = ids[0].reshape(tokens, K)
    floats = [t.reshape(tokens, K) for t in tensors if t.is_floating_point() and t.numel() == tokens * K]
    return ids_TK, floats


def observe_router(block: nn.Module, parts: BlockParts, x_TH: torch.Tensor) -> list[RouterObservation]:
    """Run the router child on the probe tokens (alone, then with each selection bias as its
    second argument) and keep what can be recognised."""
    owner = block.get_submodule(parts.router_owner)
    T = x_TH.shape[0]
    # [T, H] first (what most blocks pass; some routers take dim=1 as the expert axis), then [1, T, H]
    attempts: list[tuple[tuple, str | None]] = [((x_TH,), None), ((x_TH.unsqueeze(0),), None)]
    try:
        n_params = len(inspect.signature(owner.forward).parameters)
    except (TypeError, ValueError):
        n_params = 1
    if n_params >= 2:
        for path in parts.selection_biases:
            t = get_attr_path(block, path)
            attempts += [((x_TH, t), path), ((x_TH.unsqueeze(0), t), path)]
    seen: list[RouterObservation] = []
    done_bias: set[str | None] = set()
    for args, bias in attempts:
        if bias in done_bias:
            continue
        try:
            with torch.no_grad(), eval_mode(owner), torch.random.fork_rng(devices=[]):
                outputs = owner(*args)
        except Exception:
            continue
        found = _recognise(outputs, T)
        if found is not None:
            seen.append(RouterObservation(found[0], found[1], bias))
            done_bias.add(bias)
    return seen


def _candidate_route(block: nn.Module, parts: BlockParts, cand: RoutingCandidate,
                     x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w_EH = get_attr_path(block, parts.router_path + ".weight").float()
    b_E = get_attr_path(block, cand.logits_bias).float() if cand.logits_bias else None
    sel = get_attr_path(block, cand.selection_bias).float().reshape(-1) if cand.selection_bias else None
    with torch.no_grad():
        return route(F.linear(x_TH.float(), w_EH, b_E), cand.routing, sel)


def _agrees(ours: tuple[torch.Tensor, torch.Tensor], seen: RouterObservation, scaling: float,
            exact: bool) -> bool:
    """Same experts per token (as sets) and, where the router returns weights, the same weights
    (before or after the routed scaling factor, which some blocks apply themselves)."""
    w_TK, ids_TK = ours
    if ids_TK.shape != seen.ids_TK.shape:
        return False
    ids_sorted, order = ids_TK.sort(dim=-1)
    seen_sorted, seen_order = seen.ids_TK.long().sort(dim=-1)
    same_TK = (ids_sorted == seen_sorted).all(dim=-1)
    if same_TK.float().mean().item() < (1.0 if exact else 0.9):
        return False
    if not seen.weights_TK:
        return True
    ours_sorted = w_TK.gather(1, order)[same_TK].double()
    tol = 1e-4 if exact else 3e-2
    for w in seen.weights_TK:
        theirs = w.gather(1, seen_order)[same_TK].double()
        for s in dict.fromkeys((1.0, scaling)):
            ref = ours_sorted / s
            if torch.allclose(theirs, ref, rtol=tol, atol=tol * max(1e-6, ref.abs().max().item())):
                return True
    return False


def prune_by_router(block: nn.Module, parts: BlockParts, candidates: list[RoutingCandidate],
                    like: torch.Tensor) -> tuple[list[RoutingCandidate], bool]:
    """Keep the candidates that reproduce what the router itself returns on a probe; (kept,
    observed) where ``observed`` says whether the router's outputs could be read at all."""
    x_TH = probe_input((ROUTER_PROBE_TOKENS, parts.hidden), like, seed=7)
    observations = observe_router(block, parts, x_TH)
    if not observations:
        return candidates, False
    exact = like.dtype in (torch.float32, torch.float64)
    kept = []
    for cand in candidates:
        usable = [o for o in observations if o.bias_arg in (None, cand.selection_bias)]
        try:
            ours = _candidate_route(block, parts, cand, x_TH)
        except Exception:
            continue
        if any(_agrees(ours, o, cand.routing.scaling, exact) for o in usable):
            kept.append(cand)
    return kept, True


def _top_k(block: nn.Module, parts: BlockParts, like: torch.Tensor, observe: bool = True) -> int | None:
    """k from the router/block/config attributes, else from the shape of the router's expert ids."""
    objs = _hint_objects(block, parts)
    k = _int_attr(objs, TOPK_ATTRS)
    if k is not None and 1 <= k <= parts.num_experts:
        return k
    if not observe:
        return None
    observations = observe_router(block, parts, probe_input((4, parts.hidden), like, seed=7))
    if observations and 1 <= observations[0].ids_TK.shape[-1] <= parts.num_experts:
        return int(observations[0].ids_TK.shape[-1])
    return None


class TransformersMoEAdapter:
    """Adapter for transformers MoE blocks with 3-D stacked expert weights."""

    name = "transformers"

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[MoESpec] | Skip | None:
        if not config.swap_moe:
            return None
        parts = block_parts(module)
        if parts is None or isinstance(parts, Skip):
            return parts
        if parts.extra:
            return Skip(f"block also computes {', '.join(parts.extra)} (besides router, experts and shared expert), "
                        "which the fused layer does not")
        if parts.split is not None:
            ex_specs = split_experts_specs(module, parts)
        else:
            ex_specs = experts_specs(parts.experts, parts.experts_name, parts.hidden)
        if isinstance(ex_specs, Skip):
            return ex_specs
        like = ex_specs[0].down.get(module)
        on_meta = like.device.type == "meta"  # nothing can run: candidates from the attributes alone
        k = _top_k(module, parts, like, observe=not on_meta)
        if k is None:
            return Skip("top-k not found on the router, block or config, nor in the router's outputs")
        routings = routing_candidates(module, parts, k)
        if not on_meta:
            routings, _ = prune_by_router(module, parts, routings, like)
        if not routings:
            router = module.get_submodule(parts.router_owner)
            return Skip(f"router {type(router).__name__} computes a routing none of the supported variants reproduce "
                        "(softmax/sigmoid scores, top-k before or after scoring, group-limited top-k, selection bias, "
                        "renormalisation, scaling)")
        jitter = getattr(module, "jitter_noise", 0.0)
        specs = []
        fp32_options = (False, True) if like.dtype not in (torch.float32, torch.float64) else (False,)
        for out_bias in parts.output_biases + [None]:
            for experts_spec in ex_specs:
                for cand, fp32 in itertools.product(routings, fp32_options):
                    # low precision: scores in fp32, or (as some routers do) in the logits' dtype
                    for score_dtype in ("float32",) if fp32 or len(fp32_options) == 1 else ("float32", "input"):
                        routing = dataclasses.replace(cand.routing, score_dtype=score_dtype)
                        rspec = RouterSpec(weight=parts.router_path + ".weight", bias=cand.logits_bias,
                                           routing=routing, selection_bias=cand.selection_bias, fp32_logits=fp32)
                        specs.append(MoESpec(router=rspec, experts=experts_spec, shared_expert=parts.shared,
                                             shared_gate=parts.shared_gate, output_bias=out_bias,
                                             input_jitter=float(jitter) if isinstance(jitter, (int, float)) else 0.0))
        return specs


def _takes_routing(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes (hidden_states, top_k_index, top_k_weights)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 3


class TransformersExpertsAdapter:
    """Adapter for a stacked experts module on its own (``forward(hidden, top_k_index,
    top_k_weights)``), used when its block was not swapped whole."""

    name = "transformers-experts"

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[ExpertsOnlySpec] | Skip | None:
        if not config.swap_moe or not is_stacked_experts(module):
            return None
        if not _takes_routing(module):
            sig = ", ".join(inspect.signature(module.forward).parameters)
            return Skip(f"experts forward({sig}) does not take (hidden_states, top_k_index, top_k_weights): "
                        "the routing weights are applied elsewhere")
        hidden = getattr(module, "hidden_dim", None) or getattr(module, "hidden_size", None)
        specs = experts_specs(module, "", hidden if isinstance(hidden, int) else None)
        if isinstance(specs, Skip):
            return specs
        return [ExpertsOnlySpec(experts=s) for s in specs]
