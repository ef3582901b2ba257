"""MoE blocks no adapter can swap, recognised by structure so the report can say why.

Asked last. It proposes nothing; it returns a :class:`Skip` naming what makes a block an MoE
(a router with an [E, H] weight next to per-expert weights) and what keeps it from being
fused, so that every MoE block of a model shows in the report as swapped or skipped. Only
direct children are inspected, so one block gives one record, not one per ancestor.

Shapes recognised as per-expert weights (E from the router):

- 3-D parameters [E, ., .] outside the transformers experts layout;
- a container (ModuleList, ModuleDict or ``expert_0 .. expert_n`` children) of E identical
  MLPs or Linear layers that the hand-written adapter did not take (capacity-based routers,
  experts chosen by an input index, ...);
- raw 2-D parameters of one module (not Linear or Embedding) packing all experts as [E * I, H];
- embedding tables with E rows in a block that declares ``num_experts == E``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.handwritten import HandwrittenMoEAdapter
from kernel_moe.adapters.hf_blocks import block_parts
from kernel_moe.adapters.hf_experts import is_stacked_experts
from kernel_moe.adapters.structure import linear_layers
from kernel_moe.config import KernelConfig

_INDEXED = re.compile(r"^(?:[A-Za-z_]*?_?)?\d+$")
_EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _routers(module: nn.Module, exclude: str) -> dict[int, str]:
    """{E: path} of the 2-D weights [E, H] (E >= 2) outside child ``exclude``: router candidates."""
    found: dict[int, str] = {}
    for path, m in module.named_modules():
        if not path or path.split(".")[0] == exclude:
            continue
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Embedding) or not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] < 2:
            continue
        found.setdefault(int(w.shape[0]), path)
    return found


def _mlp_like(module: nn.Module) -> bool:
    """Parameters only from at most three Linear layers (a single Linear counts)."""
    linears = linear_layers(module)
    return linears is not None and 1 <= len(linears) <= 3


def _expert_items(container: nn.Module) -> list[nn.Module] | None:
    """The experts of a container: its parametrised children when they are >= 2 identical
    MLP-like modules held in a ModuleList/ModuleDict or named like ``expert_0``."""
    items = [(n, c) for n, c in container.named_children() if any(True for _ in c.parameters())]
    if len(items) < 2:
        return None
    indexed = isinstance(container, (nn.ModuleList, nn.ModuleDict)) or all(_INDEXED.match(n) for n, _ in items)
    if not indexed or len({type(c) for _, c in items}) != 1:
        return None
    shapes = {tuple(tuple(p.shape) for p in c.parameters()) for _, c in items}
    if len(shapes) != 1 or not all(_mlp_like(c) for _, c in items):
        return None
    return [c for _, c in items]


def _capacity_note(module: nn.Module) -> str:
    for m in module.modules():
        cap = getattr(m, "expert_capacity", None)
        if isinstance(cap, int) and not isinstance(cap, bool):
            return f"; its router drops tokens beyond an expert capacity ({cap}), which a probe cannot prove"
    return ""


def describe_unsupported(module: nn.Module) -> str | None:
    """Why ``module`` is an MoE block that cannot be swapped, or None when it does not look like one."""
    for name, child in module.named_children():
        if is_stacked_experts(child) or isinstance(child, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        routers = _routers(module, name)
        stacked = [(p, t) for p, t in child.named_parameters(recurse=False) if t.dim() >= 3]
        E = stacked[0][1].shape[0] if stacked else 0
        if stacked and all(t.shape[0] == E for _, t in stacked) and E in routers:
            shapes = ", ".join(f"{name}.{p} {_shape(t)}" for p, t in stacked)
            return (f"experts hold 3-D weights ({shapes}) split across modules, outside the layout kernel_moe maps "
                    f"(one experts module with gate_up_proj/up_proj and down_proj); router {routers[E]}")
        items = _expert_items(child)
        if items is not None:
            E = len(items)
            kind = type(items[0]).__name__
            where = f"{E} {kind} experts in {name} ({type(child).__name__})"
            if E in routers:
                return (f"{where} with router {routers[E]}: not a layout the hand-written adapter proves "
                        f"(a ModuleList of expert MLPs with a gate Linear){_capacity_note(module)}")
            if "expert" in name.lower():
                return f"{where} but no router [E, H] in the block: the experts are chosen outside it (by an input)"
        owners = [(sub, m) for sub, m in child.named_modules() if any(True for _ in m.parameters(recurse=False))]
        packed = [] if len(owners) != 1 or isinstance(owners[0][1], (nn.Linear, nn.Embedding)) else [
            (f"{owners[0][0]}.{p}" if owners[0][0] else p, t)
            for p, t in owners[0][1].named_parameters(recurse=False) if t.dim() == 2]
        for E, rpath in routers.items():
            H = module.get_submodule(rpath).weight.shape[1]
            if (len(packed) >= 2 and len(packed) == len(list(child.parameters()))
                    and all(t.shape[0] % E == 0 and t.shape[0] > E and t.shape[1] == H for _, t in packed)):
                shapes = ", ".join(f"{name}.{p} {_shape(t)}" for p, t in packed)
                return (f"expert weights are packed 2-D tensors [E*I, H] ({shapes}), but the only weight that could "
                        f"route them, {rpath}, belongs to a dense FFN (a shared MLP, not a router)")
    declared = [getattr(module, a) for a in _EXPERT_COUNT_ATTRS if isinstance(getattr(module, a, None), int)]
    if declared and declared[0] >= 2:
        E = declared[0]
        tables = [n for n, c in module.named_children() if isinstance(c, nn.Embedding) and c.num_embeddings == E]
        if tables:
            return (f"experts are rows of embedding tables ({', '.join(tables)}: {E} rows) rather than expert MLPs; "
                    "the fused op computes expert MLPs")
    return None


class UnsupportedMoEAdapter:
    """Reports MoE blocks that no other adapter handles, with the reason (never swaps)."""

    name = "unsupported-moe"

    def candidates(self, module: nn.Module, config: KernelConfig) -> Skip | None:
        if not config.swap_moe or is_stacked_experts(module):
            return None
        if any(is_stacked_experts(c) for c in module.children()) or block_parts(module) is not None:
            return None
        reason = describe_unsupported(module)
        if reason is None:
            return None
        if HandwrittenMoEAdapter().candidates(module, config) is not None:
            return None
        return Skip(reason)


__all__ = ["UnsupportedMoEAdapter", "describe_unsupported"]
