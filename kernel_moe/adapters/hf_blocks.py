"""The parts of a transformers (v5) MoE block, found by structure (never by a model name).

The experts are a stacked experts child or two 3-D parameters of separate child modules; the
router is the submodule holding an [E, H] weight outside them; a selection bias is any [E]
tensor of the block outside the experts; a shared expert is a child made of Linear layers
mapping H -> H (or named like one), its gate a Linear(H, 1); an output bias is an [H]
parameter of the block itself. Whatever else the block holds is listed as ``extra``.

Legend: H hidden, E experts.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.hf_experts import is_stacked_experts
from kernel_moe.adapters.structure import chain_layouts, linear_layers
from kernel_moe.layers.weights import get_attr_path

SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")


@dataclass(frozen=True)
class RouterPlace:
    """Where a block routes (paths relative to the block).

    - ``path``: the module owning the [E, H] weight.
    - ``owner``: the block's child that holds it (called alone to observe the routing).
    - ``logits_bias``: an [E] bias of that module (added to the logits), if any.
    - ``selection_biases``: the block's other [E] tensors outside the experts and shared expert
      (candidate selection biases).
    - ``flat``: the weight is stored flat, [E * H], and read as its [E, H] view."""

    path: str
    owner: str
    logits_bias: str | None
    selection_biases: tuple[str, ...]
    flat: bool = False


@dataclass(frozen=True)
class BlockParts:
    """What a block is made of (paths relative to the block).

    - ``experts``: one path, the stacked experts child; or two, the 3-D weights of a block whose
      up and down projections live in separate modules (which is up is settled by the shapes).
    - ``shared`` / ``shared_gate``: a shared expert and its Linear(H, 1) gate.
    - ``output_biases``: [H] parameters of the block (candidates for a bias added to its output).
    - ``extra``: children with parameters that are none of the above.
    - ``routed_ids``: G, the ids the router scores, when more than the E experts hold weights: ids
      in [E, G) are experts without weights (identity or zero experts); None when G = E.
    - ``layout``: how ``experts`` hold the weights: "stacked" (a transformers experts child with
      3-D weights), "split" (two 3-D weights of separate children), "packed" (two or three 2-D
      Parameters [E * I, H] of one module, each packing every expert's rows: DBRX) or "list" (a
      container child of E identical expert MLPs made of Linear layers: Switch Transformers).
    - ``shared_weighted``: ``shared`` is a stacked experts child the block calls with per-token
      weights, those of the router's ids after the E routed ones (G - E shared experts)."""

    experts: tuple[str, ...]
    num_experts: int
    hidden: int
    router: RouterPlace
    shared: str | None = None
    shared_gate: str | None = None
    output_biases: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    routed_ids: int | None = None
    layout: str = "stacked"
    shared_weighted: bool = False

    @property
    def num_ids(self) -> int:
        """G, the size of the id space the router chooses from (E unless there are weightless experts)."""
        return self.routed_ids or self.num_experts

    @property
    def split(self) -> tuple[str, str] | None:
        """The two 3-D weight paths of a split-experts block, else None."""
        return (self.experts[0], self.experts[1]) if self.layout == "split" else None

    @property
    def experts_children(self) -> tuple[str, ...]:
        """The block's children that hold the experts."""
        return tuple(dict.fromkeys(p.split(".")[0] for p in self.experts))


def _is_dense_ffn(module: nn.Module, hidden: int) -> bool:
    """A module made of Linear layers only, one reading H and one writing H (a dense FFN)."""
    linears = linear_layers(module)
    return bool(linears) and any(m.in_features == hidden for _, m in linears) and any(
        m.out_features == hidden for _, m in linears)


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


def _packed_shapes_fit(shapes: set[tuple[int, ...]], E: int, H: int) -> bool:
    """Whether 2-D weights of these shapes pack E experts' rows over H: each [E * N, H], or [E * H, N]
    (an expert's [H, N] block of rows: gate and up stored input-major)."""
    return all((C == H and R % E == 0 and R > E) or (R == E * H and C != H) for R, C in shapes)


def _packed_experts(module: nn.Module) -> tuple[tuple[str, ...], int] | None:
    """(paths, E) of two or three 2-D Parameters that are all the parameters of a child (held by one
    of its modules, not a Linear or Embedding), each packing every expert's rows ([E * N, H], or
    [E * H, N]), with a router elsewhere in the block, not in a dense FFN (a shared MLP): an [E, H]
    weight (DBRX) or a flat [E * H] one (OLMo-core)."""
    for name, child in module.named_children():
        owners = [(sub, m) for sub, m in child.named_modules() if any(True for _ in m.parameters(recurse=False))]
        if len(owners) != 1 or isinstance(owners[0][1], (nn.Linear, nn.Embedding)):
            continue
        sub, owner = owners[0]
        params = list(owner.named_parameters(recurse=False))
        shapes = {tuple(p.shape) for _, p in params}
        if not 2 <= len(params) <= 3 or any(len(shape) != 2 for shape in shapes):
            continue
        prefix = ".".join(p for p in (name, sub) if p)
        paths = tuple(f"{prefix}.{p}" for p, _ in params)
        for _, router in _routers(module, (name,), lambda rows: rows >= 2):
            E, H = router.weight.shape
            if _packed_shapes_fit(shapes, E, H):
                return paths, E
        for H in sorted({C for _, C in shapes}):
            for _, _, E in _flat_routers(module, (name,), H):
                if _packed_shapes_fit(shapes, E, H):
                    return paths, E
    return None


def _expert_list(module: nn.Module) -> tuple[tuple[str, ...], int] | None:
    """((child,), E) of a container child (not a ModuleList: those are hand-written blocks, see
    ``adapters/handwritten.py``) whose parametrised children are E >= 2 modules of one class with
    equal parameter shapes, each made of Linear layers only (expert MLPs); parameter-free children
    (a dropout) may sit beside them."""
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList):
            continue
        items = [c for _, c in child.named_children() if any(True for _ in c.parameters())]
        if len(items) < 2 or len({type(c) for c in items}) != 1 or any(True for _ in child.parameters(recurse=False)):
            continue
        if len({tuple(tuple(p.shape) for p in c.parameters()) for c in items}) == 1 and all(
                linear_layers(c) for c in items):
            return (name,), len(items)
    return None


def _positional_params(module: nn.Module) -> int | None:
    """How many positional parameters ``module.forward`` takes (None: any number, or unknown)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])


def weighted_shared_experts(module: nn.Module) -> tuple[str, str] | None:
    """(routed experts child, shared experts child) of a block with two stacked experts children:
    one called with the routing (hidden states, ids, weights), the other with the hidden states and
    per-token weights of its own (Inkling's shared experts, weighted by the router); else None."""
    found = [(n, _positional_params(c)) for n, c in module.named_children() if is_stacked_experts(c)]
    routed = [n for n, count in found if count is None or count >= 3]
    weighted = [n for n, count in found if count == 2]
    return (routed[0], weighted[0]) if len(found) == 2 and len(routed) == 1 and len(weighted) == 1 else None


def _find_experts(module: nn.Module) -> tuple[tuple[str, ...], int, str] | Skip | None:
    """(experts paths, E, layout): one stacked experts child, else two split 3-D weights, else
    packed 2-D weights, else a container of expert MLPs; None when the block has none of them. A
    second stacked child weighted per token by the router (see :func:`weighted_shared_experts`) is
    the block's shared expert."""
    found = [n for n, c in module.named_children() if is_stacked_experts(c)]
    pair = weighted_shared_experts(module) if len(found) > 1 else None
    if pair is not None:
        found = [pair[0]]
    if len(found) > 1:
        return Skip(f"block holds {len(found)} experts modules ({', '.join(found)}); the fused layer routes to one")
    if found:
        return (found[0],), module.get_submodule(found[0]).down_proj.shape[0], "stacked"
    split = _split_experts(module)
    if split is not None:
        return split, get_attr_path(module, split[0]).shape[0], "split"
    for layout, find in (("packed", _packed_experts), ("list", _expert_list)):
        found_layout = find(module)
        if found_layout is not None:
            return (*found_layout, layout)
    return None


def _selection_biases(module: nn.Module, num_experts: int, skip: tuple[str, ...], router: str,
                      logits_bias: str | None) -> tuple[str, ...]:
    """Floating [E] (or [1, E]) parameters and buffers of the block outside the ``skip`` children,
    the router weight and its logits bias."""
    prefixes = tuple(p + "." for p in skip)
    found = []
    for path, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        if path.startswith(prefixes) or path in (logits_bias, router + ".weight"):
            continue
        if t.is_floating_point() and t.numel() == num_experts and t.dim() in (1, 2) and t.shape[-1] == num_experts:
            found.append(path)
    return tuple(found)


def _lone_matrix(child: nn.Module) -> bool:
    """Whether ``child`` holds exactly one 2-D parameter (a linear router, not an MLP or an FFN)."""
    return sum(1 for p in child.parameters() if p.dim() == 2) == 1


def _in_dense_ffn(module: nn.Module, path: str, hidden: int) -> bool:
    """Whether the block's child holding ``path`` is a dense FFN H -> H (a shared MLP, not a router)."""
    return _is_dense_ffn(module.get_submodule(path.split(".")[0]), hidden)


def _routers(module: nn.Module, children: tuple[str, ...], rows) -> list[tuple[str, nn.Module]]:
    """Submodules outside the experts ``children`` and outside dense FFNs holding a 2-D weight whose
    row count ``rows`` accepts."""
    return [(p, m) for p, m in module.named_modules()
            if p and p.split(".")[0] not in children and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2 and rows(m.weight.shape[0]) and not _in_dense_ffn(module, p, m.weight.shape[1])]


def _flat_routers(module: nn.Module, children: tuple[str, ...], hidden: int) -> list[tuple[str, nn.Module, int]]:
    """(path, module, E) of submodules outside the experts ``children`` holding a flat floating
    ``weight`` [E * H] (H = ``hidden``, E >= 2): a router stored 1-D so that it shards evenly."""
    found = []
    for p, m in module.named_modules():
        w = getattr(m, "weight", None)
        if (not p or p.split(".")[0] in children or not isinstance(w, torch.Tensor) or w.dim() != 1
                or not w.is_floating_point() or w.numel() % hidden or w.numel() < 2 * hidden):
            continue
        found.append((p, m, w.numel() // hidden))
    return found


def _no_router(module: nn.Module, children: tuple[str, ...], experts: str, num_experts: int) -> str:
    """Why no router was found: a child whose Linear scores E ids (or E + 1: a skip class) among
    several matrices is an MLP router, else there is no [E, H] weight at all."""
    for name, child in module.named_children():
        if name in children:
            continue
        scorers = [p for p, m in child.named_modules()
                   if isinstance(m, nn.Linear) and m.out_features in (num_experts, num_experts + 1)]
        matrices = sum(1 for p in child.parameters() if p.dim() == 2)
        if scorers and matrices > 1:
            return (f"its router {name} ({type(child).__name__}) computes the logits with an MLP of {matrices} "
                    f"matrices (scores from {name}.{scorers[-1]}), not one linear map [{num_experts}, H]; the fused "
                    "layer's router is linear")
    return f"{experts}: no router with a [{num_experts}, H] weight found in the block"


def block_parts(module: nn.Module) -> BlockParts | Skip | None:
    """The parts of a block with a stacked experts child (or two split 3-D expert weights), or
    None when it has none."""
    experts = _find_experts(module)
    if experts is None or isinstance(experts, Skip):
        return experts
    paths, E, layout = experts
    split = layout == "split"
    children = tuple(dict.fromkeys(p.split(".")[0] for p in paths))
    routers = _routers(module, children, lambda rows: rows == E)
    flat = False
    if not routers and layout == "packed":  # a flat [E * H] router
        columns = {int(get_attr_path(module, p).shape[1]) for p in paths}
        routers = [(p, m) for H in sorted(columns) for p, m, n in _flat_routers(module, children, H) if n == E]
        flat = bool(routers)
    if not routers and layout == "stacked":  # a router over more ids than experts with weights
        hiddens = get_attr_path(module, paths[0] + ".down_proj").shape[1:]
        routers = [(p, m) for p, m in _routers(module, children, lambda rows: rows > E)
                   if m.weight.shape[1] in hiddens and _lone_matrix(module.get_submodule(p.split(".")[0]))]
    if not routers:
        return None if layout in ("split", "list") else Skip(_no_router(module, children, paths[0], E))
    router_path, router = routers[0]
    G = E if flat else router.weight.shape[0]
    H = router.weight.numel() // E if flat else router.weight.shape[1]
    if split:
        a, b = (get_attr_path(module, p).shape for p in paths)
        if not (chain_layouts(a, b, H) or chain_layouts(b, a, H)):
            return None
    owner = router_path.split(".")[0]
    rbias = getattr(router, "bias", None)
    logits_bias = router_path + ".bias" if isinstance(rbias, torch.Tensor) and rbias.numel() == G else None
    pair = weighted_shared_experts(module) if layout == "stacked" else None
    shared = pair[1] if pair is not None and G > E else None
    shared_gate = None
    extra = []
    for name, child in module.named_children():
        if name in children or name == owner or name == shared or not any(True for _ in child.parameters()):
            continue
        if isinstance(child, nn.Linear) and child.in_features == H and child.out_features == 1 and shared_gate is None:
            shared_gate = name
        elif (_is_dense_ffn(child, H) or name in SHARED_NAMES) and shared is None:
            shared = name
        else:
            extra.append(name)
    if split and extra:
        return None  # two 3-D weights inside a larger module: not recognised as an MoE block
    skip = tuple(p for p in (*children, shared, shared_gate) if p)
    sel = _selection_biases(module, E if pair is not None and shared else G, skip, router_path, logits_bias)
    out_bias = tuple(n for n, t in module.named_parameters(recurse=False)
                     if t.dim() == 1 and t.numel() == H and n not in sel)
    place = RouterPlace(router_path, owner, logits_bias, sel, flat)
    return BlockParts(paths, E, H, place, shared, shared_gate, out_bias, tuple(extra), G if G != E else None,
                      layout, shared_weighted=pair is not None and shared is not None)


__all__ = ["BlockParts", "RouterPlace", "block_parts"]
