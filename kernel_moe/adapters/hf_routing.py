"""How a transformers (v5) block routes: candidate readings of its router, pruned by running it.

Readings (:class:`RouterReading`) are proposed from the attributes of the router, its owner,
the block and their configs (top-k, groups, scoring, renormalisation, scaling) and from the
biases the block holds, most likely first. Each is then checked against what the router itself
returns on a probe input (its outputs are recognised by dtype and shape, never by position);
the manager proves the survivors on the whole block.

Legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernel_moe.adapters.hf_blocks import BlockParts
from kernel_moe.adapters.probe import eval_mode, probe_input
from kernel_moe.adapters.structure import TOPK_ATTRS, int_attr, numeric_attrs
from kernel_moe.layers.weights import get_attr_path
from kernel_moe.routing.topk import ROUTER_SCORINGS, TopKRouting, route

GROUP_ATTRS = ("n_group", "num_expert_group", "num_group")
TOPK_GROUP_ATTRS = ("topk_group", "num_topk_group")
_SCALE_NAME = re.compile(r"(rout|moe|expert).*scal|scal.*(rout|moe|expert)", re.IGNORECASE)
_JITTER_NAME = re.compile(r"jitter", re.IGNORECASE)
_LOGIT_SCALE_NAME = re.compile(r"^(output_multiplier|logits?_(scale|multiplier))$")
ROUTER_PROBE_TOKENS = 32


def hint_objects(block: nn.Module, parts: BlockParts) -> list[object]:
    """Where routing attributes are declared: the router, its owner, the block, their configs."""
    objs: list[object] = []
    for obj in (block.get_submodule(parts.router.path), block.get_submodule(parts.router.owner), block):
        if obj not in objs:
            objs.append(obj)
    for obj in list(objs):
        cfg = getattr(obj, "config", None)
        if cfg is not None and cfg not in objs:
            objs.append(cfg)
    return objs


def _scales(objs: list[object]) -> list[float]:
    """Routed-output scaling factors declared by the router, block or config, then 1.0."""
    values = [v for obj in objs for v in numeric_attrs(obj, _SCALE_NAME.search) if v > 0]
    return list(dict.fromkeys(values + [1.0]))


@dataclass(frozen=True)
class RouterReading:
    """One reading of a block's router: the top-k routing of its logits, the paths of the
    selection bias and logits bias it uses (None: not used), and the factor it multiplies its
    logits by."""

    routing: TopKRouting
    selection_bias: str | None
    logits_bias: str | None
    logit_scale: float = 1.0
    weight_scale: str | None = None


def _score_function(module: nn.Module) -> str | None:
    """The per-expert scoring a parameter-free child of the router computes (its ``score_fn``),
    found by evaluating it: "sigmoid" or "sqrtsoftplus"; None when no child computes either."""
    x = torch.linspace(-8.0, 8.0, 65, dtype=torch.float64)
    known = {"sigmoid": torch.sigmoid(x), "sqrtsoftplus": F.softplus(x).sqrt()}
    for child in module.children():
        if any(True for _ in child.parameters()):
            continue
        try:
            with torch.no_grad():
                y = child(x)
        except Exception:
            continue
        for name, ref in known.items():
            if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.allclose(y.double(), ref, atol=1e-9):
                return name
    return None


def _scorings(objs: list[object], router: nn.Module, selection: bool) -> list[str]:
    """Scorings to try, most likely first: the one the router's score function computes or its
    config declares (``scoring_func``), then softmax and sigmoid (sigmoid first next to a
    selection bias)."""
    declared = next((v for o in objs for v in [getattr(o, "scoring_func", None)] if v in ROUTER_SCORINGS), None)
    hint = _score_function(router) or declared
    plain = ["sigmoid", "softmax"] if selection or hint == "sigmoid" else ["softmax", "sigmoid"]
    return list(dict.fromkeys(([hint] if hint else []) + plain))


def _first_bool(objs: list[object], name: str) -> bool | None:
    return next((v for o in objs for v in [getattr(o, name, None)] if isinstance(v, bool)), None)


def _shared_readings(block: nn.Module, parts: BlockParts, top_k: int, scales: list[float]) -> list[RouterReading]:
    """Readings of a router whose ids after the E routed ones weigh the block's shared experts
    (``parts.shared_weighted``): per-expert scores renormalised over the chosen and the shared ones,
    with each selection bias (or none), each scaling, and each one-element parameter of the router
    as a learnable weight scale (or none)."""
    S = parts.num_ids - parts.num_experts
    shared = block.get_submodule(parts.shared)
    if S < 1 or get_attr_path(shared, "down_proj").shape[0] != S:
        return []
    router = block.get_submodule(parts.router.path)
    weight_scales = [f"{parts.router.path}.{n}" for n, p in router.named_parameters(recurse=False)
                     if p.numel() == 1 and p.is_floating_point()] + [None]
    out = []
    for sel, scoring, scale, ws in itertools.product([*parts.router.selection_biases, None],
                                                      ["sigmoid", "sqrtsoftplus"], scales, weight_scales):
        routing = TopKRouting(parts.num_experts, top_k, scoring=scoring, renormalize=True, scaling=scale,
                              shared_ids=S)
        out.append(RouterReading(routing, sel, None, weight_scale=ws))
    return out


def router_readings(block: nn.Module, parts: BlockParts, top_k: int) -> list[RouterReading]:
    """Readings of the block's router, most likely first (from the attributes' hints)."""
    if parts.shared_weighted:
        return _shared_readings(block, parts, top_k, _scales(hint_objects(block, parts)))
    objs = hint_objects(block, parts)
    E = parts.num_ids
    norm_hint = _first_bool(objs, "norm_topk_prob")
    renorms = [norm_hint, not norm_hint] if norm_hint is not None else [True, False]
    selection = parts.router.selection_biases
    scorings = _scorings(objs, block.get_submodule(parts.router.path), bool(selection))
    G = int_attr(objs, GROUP_ATTRS) or 1
    TG = int_attr(objs, TOPK_GROUP_ATTRS) or 1
    groups = [(1, 1, "top2_sum")]
    if G > 1 and E % G == 0 and 1 <= TG <= G and top_k <= TG * (E // G):
        groups = [(G, TG, "top2_sum"), (G, TG, "max"), (1, 1, "top2_sum")]
    scales = list(dict.fromkeys(_scales(objs) + ([1.0 / top_k] if top_k > 1 else [])))  # a router dividing by k
    biases: list[str | None] = list(selection) + [None]
    logit_biases = [parts.router.logits_bias, None] if parts.router.logits_bias else [None]
    out: list[RouterReading] = []

    def add(selection_bias: str | None, logits_bias: str | None, **routing: object) -> None:
        try:
            spec = TopKRouting(E, top_k, **routing)  # type: ignore[arg-type]
        except ValueError:  # a combination the routing rejects (e.g. groups too small for k)
            return
        out.append(RouterReading(spec, selection_bias, logits_bias))

    router_obj = block.get_submodule(parts.router.path)
    logit_scales = [v for v in numeric_attrs(router_obj, _LOGIT_SCALE_NAME.search) if v > 0 and v != 1.0]
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
    # SparseMixer (Phi-3.5-MoE): rounds of masked softmaxes at the threshold the router declares
    # as its jitter epsilon; the router's own outputs decide whether it routes this way
    for eps, scale in itertools.product(dict.fromkeys(numeric_attrs(router_obj, _JITTER_NAME.search)), scales):
        if eps >= 0:
            add(None, None, scoring="sparsemixer", mixer_eps=eps, scaling=scale)
    scaled = [dataclasses.replace(r, logit_scale=m) for m in logit_scales for r in out]
    return list(dict.fromkeys(scaled + out))


@dataclass
class ObservedRouting:
    """What the router itself returned on a probe: expert ids [T, K] and the float [T, K] tensors."""

    ids_TK: torch.Tensor
    weights_TK: list[torch.Tensor]
    bias_arg: str | None  # the selection bias passed as the router's second argument, if any


def _dense_choice(tensors: list[torch.Tensor], tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """Ids and weights from a float [T, E] tensor holding the routing weights of the chosen experts
    and zeros elsewhere, the same number K < E of nonzeros in every row (Llama 4's router scores)."""
    for t in tensors:
        if not (t.is_floating_point() and t.dim() >= 2 and t.numel() % tokens == 0):
            continue
        scores_TE = t.reshape(tokens, -1)
        nonzero_T = (scores_TE != 0).sum(dim=-1)
        K = int(nonzero_T[0]) if tokens else 0
        if 1 <= K < scores_TE.shape[1] and bool((nonzero_T == K).all()):
            ids_TK = scores_TE.abs().topk(K, dim=-1).indices
            return ids_TK, [scores_TE.gather(1, ids_TK)]
    return None


def _dispatch_ids(t: torch.Tensor, tokens: int, num_ids: int) -> torch.Tensor | None:
    """Expert ids [T, K] of a one-hot dispatch mask [.., E] (integer 0/1, the same K < E ones in
    every row: Switch Transformers' router), else None."""
    if t.is_floating_point() or t.dim() < 2 or t.shape[-1] != num_ids or t.numel() != tokens * num_ids:
        return None
    mask_TE = t.reshape(tokens, num_ids).long()
    counts_T = mask_TE.sum(dim=-1)
    K = int(counts_T[0]) if tokens else 0
    if not (1 <= K < num_ids and bool(((mask_TE == 0) | (mask_TE == 1)).all()) and bool((counts_T == K).all())):
        return None
    return mask_TE.topk(K, dim=-1).indices


def _recognise(outputs: object, tokens: int, num_ids: int) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """Expert ids and same-shaped float tensors among a router's outputs (by dtype and shape); ids
    may come as a one-hot dispatch mask (:func:`_dispatch_ids`); without ids, a dense [T, E] tensor of
    the chosen experts' weights (see :func:`_dense_choice`)."""
    flat = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    dispatched = [d for d in (_dispatch_ids(t, tokens, num_ids) for t in tensors) if d is not None]
    if len(dispatched) == 1:
        K = dispatched[0].shape[1]
        return dispatched[0], [t.reshape(tokens, K) for t in tensors if t.is_floating_point()
                               and t.numel() == tokens * K]
    ids = [t for t in tensors if not t.is_floating_point() and t.dtype != torch.bool and t.dim() >= 1
           and t.numel() % tokens == 0 and t.numel() // tokens >= 1]
    if not ids:
        return _dense_choice(tensors, tokens)
    if len(ids) != 1:
        return None
    K = ids[0].numel() // tokens
    ids_TK = ids[0].reshape(tokens, K)
    floats = [t.reshape(tokens, K) for t in tensors if t.is_floating_point() and t.numel() == tokens * K]
    return ids_TK, floats


def observe_router(block: nn.Module, parts: BlockParts, x_TH: torch.Tensor) -> list[ObservedRouting]:
    """Run the router child on the probe tokens (alone, then with each selection bias as its
    second argument) and keep what can be recognised."""
    owner = block.get_submodule(parts.router.owner)
    T = x_TH.shape[0]
    # [T, H] first (what most blocks pass; some routers take dim=1 as the expert axis), then [1, T, H]
    attempts: list[tuple[tuple, str | None]] = [((x_TH,), None), ((x_TH.unsqueeze(0),), None)]
    try:
        n_params = len(inspect.signature(owner.forward).parameters)
    except (TypeError, ValueError):
        n_params = 1
    if n_params >= 2:
        for path in parts.router.selection_biases:
            t = get_attr_path(block, path)
            attempts += [((x_TH, t), path), ((x_TH.unsqueeze(0), t), path)]
    seen: list[ObservedRouting] = []
    done_bias: set[str | None] = set()
    for args, bias in attempts:
        if bias in done_bias:
            continue
        try:
            with torch.no_grad(), eval_mode(owner), torch.random.fork_rng(devices=[]):
                outputs = owner(*args)
        except Exception:
            continue
        found = _recognise(outputs, T, parts.num_ids)
        if found is not None:
            seen.append(ObservedRouting(found[0], found[1], bias))
            done_bias.add(bias)
    return seen


def _reading_route(block: nn.Module, parts: BlockParts, reading: RouterReading,
                   x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K], ids [T, K]) the reading computes from the router weight on ``x_TH``."""
    w_EH = get_attr_path(block, parts.router.path + ".weight").float()
    if parts.router.flat:  # [E * H] -> its [E, H] view
        w_EH = w_EH.view(-1, parts.hidden)
    b_E = get_attr_path(block, reading.logits_bias).float() if reading.logits_bias else None
    sel_E = get_attr_path(block, reading.selection_bias).float().reshape(-1) if reading.selection_bias else None
    with torch.no_grad():
        weights_TK, ids_TK = route(F.linear(x_TH.float(), w_EH, b_E) * reading.logit_scale, reading.routing, sel_E)
        if reading.weight_scale is not None:
            weights_TK = weights_TK * get_attr_path(block, reading.weight_scale).float()
        return weights_TK, ids_TK


def _agrees(ours: tuple[torch.Tensor, torch.Tensor], seen: ObservedRouting, scaling: float,
            exact: bool) -> bool:
    """Same experts per token (as sets) and, where the router returns weights, the same weights
    (before or after the routed scaling factor, which some blocks apply themselves)."""
    w_TK, ids_TK = ours
    if ids_TK.shape != seen.ids_TK.shape:
        return False
    ids_sorted, order = ids_TK.sort(dim=-1)
    seen_sorted, seen_order = seen.ids_TK.long().sort(dim=-1)
    same_T = (ids_sorted == seen_sorted).all(dim=-1)
    if same_T.float().mean().item() < (1.0 if exact else 0.9):
        return False
    if not seen.weights_TK:
        return True
    ours_sorted = w_TK.gather(1, order)[same_T].double()
    tol = 1e-4 if exact else 3e-2
    for w in seen.weights_TK:
        theirs = w.gather(1, seen_order)[same_T].double()
        for s in dict.fromkeys((1.0, scaling)):
            ref = ours_sorted / s
            if torch.allclose(theirs, ref, rtol=tol, atol=tol * max(1e-6, ref.abs().max().item())):
                return True
    return False


def prune_by_router(block: nn.Module, parts: BlockParts, readings: list[RouterReading],
                    like: torch.Tensor) -> tuple[list[RouterReading], bool]:
    """Keep the readings that reproduce what the router itself returns on a probe; (kept,
    observed) where ``observed`` says whether the router's outputs could be read at all."""
    x_TH = probe_input((ROUTER_PROBE_TOKENS, parts.hidden), like, seed=7)
    observations = observe_router(block, parts, x_TH)
    if not observations:
        return readings, False
    exact = like.dtype in (torch.float32, torch.float64)
    kept = []
    for reading in readings:
        usable = [o for o in observations if o.bias_arg in (None, reading.selection_bias)]
        try:
            ours = _reading_route(block, parts, reading, x_TH)
        except Exception:
            continue
        if any(_agrees(ours, o, reading.routing.scaling, exact) for o in usable):
            kept.append(reading)
    return kept, True


def find_top_k(block: nn.Module, parts: BlockParts, like: torch.Tensor, observe: bool = True) -> int | None:
    """k from the router/block/config attributes, else from the shape of the router's expert ids."""
    E = parts.num_ids
    k = int_attr(hint_objects(block, parts), TOPK_ATTRS, 1, E)
    if k is not None or not observe:
        return k
    observations = observe_router(block, parts, probe_input((4, parts.hidden), like, seed=7))
    if observations and 1 <= observations[0].ids_TK.shape[-1] <= E:
        return int(observations[0].ids_TK.shape[-1])
    return None


__all__ = ["ObservedRouting", "RouterReading", "find_top_k", "observe_router", "prune_by_router", "router_readings"]
