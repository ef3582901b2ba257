"""Where a swapped layer finds its expert weights, without copying them.

Weights are looked up by attribute path on every forward (never cached), so ``.to()``,
``load_state_dict`` and optimizer updates are seen at once. Three sources:

- :class:`StackedWeight`: one 3-D Parameter holding all experts (transformers' experts
  modules), used as is or as a transposed view.
- :class:`ExpertListWeight`: one or more 2-D Parameters per expert (hand-written
  ``nn.ModuleList`` experts). At bind time they are re-pointed into one contiguous
  [E, N, X] storage (``param.data`` becomes a view of it): the Parameters stay the same
  objects with the same values, no memory is doubled, and the op receives the stacked
  tensor without a per-forward copy. With gradients enabled the stack is rebuilt
  differentiably so every per-expert Parameter gets its gradient.
- :class:`PairedRowsWeight`: packed 2-D gate and up Parameters [E * I, H] (DBRX), re-pointed into
  one row-interleaved storage the same way.

A :class:`StackedWeight` also reads a packed 2-D Parameter [E * rows, cols] as its 3-D view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def get_attr_path(root: nn.Module, path: str) -> torch.Tensor:
    """``root.a.b.c`` for path "a.b.c" (works for ModuleList indices too)."""
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def weight_rows(root: nn.Module, path: str, part: int | None) -> torch.Tensor:
    """The tensor at ``path`` of ``root``, or its first (``part`` 0) or second (1) half of rows: one
    projection of a fused pair (queries and keys in one Linear)."""
    t = get_attr_path(root, path)
    return t if part is None else t.chunk(2, dim=0)[part]


@dataclass(frozen=True)
class StackedWeight:
    """A 3-D tensor at ``path`` laid out [E, out, in], or [E, in, out] when ``transposed``. With
    ``experts`` = E, the tensor is a packed 2-D [E * rows, cols] one (expert e holds rows
    e * rows .. (e + 1) * rows - 1), read as its [E, rows, cols] view."""

    path: str
    transposed: bool = False
    experts: int | None = None

    def bind(self, layer: nn.Module) -> None:
        """Nothing to prepare: the parameter already holds every expert."""

    def get(self, layer: nn.Module) -> torch.Tensor:
        w = get_attr_path(layer, self.path)
        if self.experts is not None:
            w = w.view(self.experts, -1, w.shape[-1])
        return w.transpose(1, 2) if self.transposed else w

    def paths(self) -> list[str]:
        return [self.path]

    def assemble(self, lookup) -> torch.Tensor:
        """The [E, out, in] tensor from ``lookup(path)`` (a checkpoint's tensors, not the layer's)."""
        w = lookup(self.path)
        if self.experts is not None:
            w = w.view(self.experts, -1, w.shape[-1])
        return w.transpose(1, 2) if self.transposed else w


@dataclass(frozen=True)
class ExpertListWeight:
    """Per-expert 2-D weights (or 1-D biases) concatenated along dim 0 for each expert.

    ``parts[e]`` lists the attribute paths of expert e, e.g. ``("experts.0.w1.weight",
    "experts.0.w3.weight")`` for a gate/up pair that becomes one [2I, H] block.
    ``key`` names the stacked tensor on the layer.
    """

    parts: tuple[tuple[str, ...], ...]
    key: str

    def _params(self, layer: nn.Module) -> list[list[torch.Tensor]]:
        return [[get_attr_path(layer, p) for p in expert] for expert in self.parts]

    def bind(self, layer: nn.Module) -> None:
        """Re-point every per-expert Parameter into one contiguous stacked storage."""
        params = self._params(layer)
        with torch.no_grad():
            stacked = torch.stack([torch.cat([p.detach() for p in expert], dim=0) for expert in params])
            for e, expert in enumerate(params):
                offset = 0
                for p in expert:
                    rows = p.shape[0]
                    p.data = stacked[e, offset : offset + rows]
                    offset += rows
        layer._stacked_weights[self.key] = stacked

    def is_bound(self, layer: nn.Module) -> bool:
        """True when every per-expert tensor still is its view of the stacked storage (a
        Parameter replaced or moved since bind() is not)."""
        stacked = layer._stacked_weights.get(self.key)
        if stacked is None:
            return False
        base, step = stacked.data_ptr(), stacked.element_size()
        for e, expert in enumerate(self._params(layer)):
            offset = 0
            for p in expert:
                expected = base + (e * stacked.stride(0) + offset * stacked.stride(1)) * step
                if p.dtype != stacked.dtype or p.device != stacked.device or p.data_ptr() != expected:
                    return False
                offset += p.shape[0]
        return True

    def get(self, layer: nn.Module) -> torch.Tensor:
        if torch.is_grad_enabled() and any(p.requires_grad for ps in self._params(layer) for p in ps):
            return torch.stack([torch.cat(list(expert), dim=0) for expert in self._params(layer)])
        if not torch.compiler.is_compiling() and not self.is_bound(layer):
            self.bind(layer)
        return layer._stacked_weights[self.key]

    def paths(self) -> list[str]:
        return [p for expert in self.parts for p in expert]

    def assemble(self, lookup) -> torch.Tensor:
        """The stacked [E, out, in] tensor from ``lookup(path)`` (a checkpoint's tensors)."""
        return torch.stack([torch.cat([lookup(p) for p in expert], dim=0) for expert in self.parts])


@dataclass(frozen=True)
class PairedRowsWeight:
    """Two packed 2-D weights [E * I, H], gate rows and up rows (expert e holds rows e * I ..
    (e + 1) * I - 1 of each), as one [E, 2I, H] tensor with gate and up rows interleaved
    (``glu="interleaved"``), without a copy.

    At bind time both Parameters are re-pointed into one storage [E * I, 2, H]: ``gate.data`` is
    its [:, 0] rows and ``up.data`` its [:, 1] rows (2-D views with row stride 2H: the Parameters
    stay the same objects with the same values), and its [E, 2I, H] view is what the op reads.
    With gradients enabled it is rebuilt differentiably, as :class:`ExpertListWeight` does."""

    gate: str
    up: str
    experts: int
    key: str = "up"

    def _params(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return get_attr_path(layer, self.gate), get_attr_path(layer, self.up)

    def bind(self, layer: nn.Module) -> None:
        """Re-point the gate and up Parameters into one row-interleaved storage."""
        gate, up = self._params(layer)
        with torch.no_grad():
            rows = torch.stack([gate.detach(), up.detach()], dim=1)  # [E * I, 2, H]
            gate.data = rows[:, 0]
            up.data = rows[:, 1]
        layer._stacked_weights[self.key] = rows.view(self.experts, -1, rows.shape[-1])

    def is_bound(self, layer: nn.Module) -> bool:
        """True when both Parameters still are their views of the bound storage."""
        stacked = layer._stacked_weights.get(self.key)
        if stacked is None:
            return False
        gate, up = self._params(layer)
        H = stacked.shape[-1]
        return (gate.dtype == up.dtype == stacked.dtype and gate.device == up.device == stacked.device
                and gate.data_ptr() == stacked.data_ptr()
                and up.data_ptr() == stacked.data_ptr() + H * stacked.element_size()
                and gate.stride() == up.stride() == (2 * H, 1) and 2 * gate.numel() == stacked.numel())

    def get(self, layer: nn.Module) -> torch.Tensor:
        gate, up = self._params(layer)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return torch.stack([gate, up], dim=1).view(self.experts, -1, gate.shape[-1])
        if not torch.compiler.is_compiling() and not self.is_bound(layer):
            self.bind(layer)
        return layer._stacked_weights[self.key]

    def paths(self) -> list[str]:
        return [self.gate, self.up]

    def assemble(self, lookup) -> torch.Tensor:
        """The [E, 2I, H] row-interleaved tensor from ``lookup(path)`` (a checkpoint's tensors)."""
        gate, up = lookup(self.gate), lookup(self.up)  # [E * I, H] each
        return torch.stack([gate, up], dim=1).view(self.experts, -1, gate.shape[-1])


WeightSource = StackedWeight | ExpertListWeight | PairedRowsWeight
