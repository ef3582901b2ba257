"""Structure the adapters recognise alike: attributes that declare top-k (or any small int), numeric
attributes found by name, modules made only of Linear layers, and the one weight-layout
resolver (which transposition of an up and a down weight chains H -> N -> I -> H).

Legend: E experts, H hidden, N up features (I, or 2I when gated), I intermediate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

TOPK_ATTRS = ("top_k", "num_experts_per_tok", "num_activated_experts", "n_activated_experts", "moe_topk", "num_experts_per_token", "top_k_experts", "moe_k",
              "moe_top_k", "num_selected_experts", "experts_per_token", "topk", "k", "n_active")
"""Attribute names a block, its router or its config use for the experts each token picks."""

BOTH_TRANSPOSITIONS = ((False, False), (False, True), (True, False), (True, True))
"""(up transposed, down transposed): every way two separately stored weights may be laid out."""


def int_attr(objs: Iterable[object], names: Iterable[str], lo: int | None = None, hi: int | None = None) -> int | None:
    """The first int attribute (bools excluded) among ``names`` of each object in turn, taking
    only values in [lo, hi] when bounds are given; None when there is none."""
    names = tuple(names)
    for obj in objs:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                if (lo is None or value >= lo) and (hi is None or value <= hi):
                    return value
    return None


def numeric_attrs(obj: object, wanted: Callable[[str], object]) -> list[float]:
    """Finite int/float attribute values of ``obj`` (bools excluded) whose name ``wanted`` accepts."""
    values = []
    for name, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
        if wanted(name) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                values.append(float(value))
    return values


def linear_layers(module: nn.Module) -> list[tuple[str, nn.Linear]] | None:
    """The module's Linear layers as (path, layer) when their parameters are all the parameters the
    module has (a dense FFN, an expert MLP, a lone Linear), else None."""
    linears = [(p, m) for p, m in module.named_modules() if isinstance(m, nn.Linear)]
    own = {id(p) for p in module.parameters()}
    if own != {id(p) for _, m in linears for p in m.parameters()}:
        return None
    return linears


@dataclass(frozen=True)
class ChainLayout:
    """One reading of an up weight and a down weight that chains H -> N -> I -> H.

    Up is [E, N, H] ([E, H, N] when ``up_transposed``); down is [E, H, I] ([E, I, H] when
    ``down_transposed``); N is 2I when ``gated`` (gate and up features), else I."""

    up_transposed: bool
    down_transposed: bool
    hidden: int
    intermediate: int
    gated: bool


def chain_layouts(
    up_shape: Iterable[int],
    down_shape: Iterable[int],
    hidden: int | None = None,
    gated: bool | None = None,
    transpositions: Iterable[tuple[bool, bool]] = BOTH_TRANSPOSITIONS,
) -> list[ChainLayout]:
    """Every transposition (in the order given) under which 3-D ``up_shape`` and ``down_shape``
    chain: both read and write the same H (``hidden`` when known), hold the same E, and N is I
    or 2I (only one of them when ``gated`` says)."""
    up, down = tuple(up_shape), tuple(down_shape)
    if len(up) != 3 or len(down) != 3 or up[0] != down[0]:
        return []
    found = []
    for up_t, down_t in transpositions:
        H_up, N = (up[1], up[2]) if up_t else (up[2], up[1])
        I, H_down = (down[1], down[2]) if down_t else (down[2], down[1])
        if H_up != H_down or (hidden is not None and H_up != hidden):
            continue
        for is_gated in (False, True) if gated is None else (gated,):
            if N == (2 * I if is_gated else I):
                found.append(ChainLayout(up_t, down_t, H_up, I, is_gated))
    return found


def same_transposition(flag: object) -> tuple[tuple[bool, bool], ...]:
    """Transpositions of weights stored alike (one experts module): the module's own
    ``is_transposed`` flag when it has one, else both layouts, untransposed first."""
    if isinstance(flag, bool):
        return ((flag, flag),)
    return ((False, False), (True, True))


def tensor_attr(obj: object, name: str) -> torch.Tensor | None:
    """``obj.name`` when it is a tensor, else None."""
    value = getattr(obj, name, None)
    return value if isinstance(value, torch.Tensor) else None


__all__ = [
    "BOTH_TRANSPOSITIONS",
    "ChainLayout",
    "TOPK_ATTRS",
    "chain_layouts",
    "int_attr",
    "linear_layers",
    "numeric_attrs",
    "same_transposition",
    "tensor_attr",
]
