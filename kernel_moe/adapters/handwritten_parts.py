"""Where the parts of a hand-written MoE block are: its expert containers and router weights.

Found by structure only; which of them the block really uses is settled by the probe:

- expert containers: ModuleLists and ModuleDicts (experts in key order) of the block, direct
  children or nested in a child (``self.moe.experts``), up to :data:`MAX_DEPTH` levels down;
- routers: Linear(H, E) layers and raw 2-D Parameters [E, H] (read as ``F.linear(x, W)``) or
  [H, E] (read as ``x @ W``), anywhere in the block outside the experts and outside any item of a
  ModuleList / ModuleDict. A router and its experts never sit in the same child: such a child is
  the MoE block itself (it is matched when the walk reaches it), not a part of this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

MAX_DEPTH = 3
"""How deep below the block an expert container may sit (1: a direct child)."""

CAPACITY_ATTRS = ("expert_capacity", "capacity", "capacity_factor")
"""Attribute names by which a block or its router declares an expert capacity."""


@dataclass(frozen=True)
class RouterWeight:
    """A router candidate: the weight's path, whether it is stored [H, E], its bias path (Linear
    routers only), its H, and the path of the module that owns it ("" for the block)."""

    weight: str
    transposed: bool
    bias: str | None
    hidden: int
    owner: str


def _top(path: str) -> str:
    return path.split(".")[0]


def declared_capacity(module: nn.Module) -> str | None:
    """``path.name=value`` of the first expert capacity the block or a submodule declares (a
    number named in CAPACITY_ATTRS), else None. A capacity drops tokens only on inputs long enough
    to overflow it, which the probe of a hand-written block is not: such blocks are not proposed."""
    for path, m in module.named_modules():
        for name in CAPACITY_ATTRS:
            value = getattr(m, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return f"{path + '.' if path else ''}{name}={value}"
    return None


def expert_containers(module: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """(path, [(key, expert), ...]) of every non-empty ModuleList / ModuleDict of the block up to
    MAX_DEPTH levels down, not inside another one, in module order (none when the block itself is
    a container: it has no forward to prove)."""
    found: list[tuple[str, list[tuple[str, nn.Module]]]] = []
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return found
    for path, child in module.named_modules():
        if not path or path.count(".") >= MAX_DEPTH or any(path.startswith(p + ".") for p, _ in found):
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) and len(child) > 0:
            found.append((path, list(child.named_children())))
    return found


def router_weights(module: nn.Module, num_experts: int, container: str) -> list[RouterWeight]:
    """Router candidates for E = ``num_experts`` experts held at path ``container``: Linear(H, E)
    layers first, then raw 2-D Parameters in either orientation, none in the container's child."""
    linears, raw = [], []
    listed = [p for p, m in module.named_modules() if isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    for path, m in module.named_modules():
        if path and (_top(path) == _top(container) or any(path.startswith(p + ".") for p in listed)):
            continue
        owner = path
        if isinstance(m, nn.Linear):
            if m.out_features == num_experts:
                bias = f"{path}.bias" if m.bias is not None else None
                linears.append(RouterWeight(f"{path}.weight", False, bias, m.in_features, owner))
            continue
        if isinstance(m, nn.Embedding):
            continue
        for name, p in m.named_parameters(recurse=False):
            full = f"{path}.{name}" if path else name
            if p.dim() != 2 or not p.is_floating_point() or (not path and _top(full) == _top(container)):
                continue
            if p.shape[0] == num_experts:
                raw.append(RouterWeight(full, False, None, int(p.shape[1]), owner))
            if p.shape[1] == num_experts:
                raw.append(RouterWeight(full, True, None, int(p.shape[0]), owner))
    return linears + raw


__all__ = ["CAPACITY_ATTRS", "MAX_DEPTH", "RouterWeight", "declared_capacity", "expert_containers", "router_weights"]
