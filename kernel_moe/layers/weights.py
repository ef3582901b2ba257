"""Where a swapped layer finds its expert weights, without copying them.

Weights are looked up by attribute path on every forward (never cached), so ``.to()``,
``load_state_dict`` and optimizer updates are seen at once. Two sources:

- :class:`StackedWeight`: one 3-D Parameter holding all experts (transformers' experts
  modules), used as is or as a transposed view.
- :class:`ExpertListWeight`: one or more 2-D Parameters per expert (hand-written
  ``nn.ModuleList`` experts). At bind time they are re-pointed into one contiguous
  [E, N, X] storage (``param.data`` becomes a view of it): the Parameters stay the same
  objects with the same values, no memory is doubled, and the op receives the stacked
  tensor without a per-forward copy. With gradients enabled the stack is rebuilt
  differentiably so every per-expert Parameter gets its gradient.
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


@dataclass(frozen=True)
class StackedWeight:
    """A 3-D tensor at ``path`` laid out [E, out, in], or [E, in, out] when ``transposed``."""

    path: str
    transposed: bool = False

    def bind(self, layer: nn.Module) -> None:
        """Nothing to prepare: the parameter already holds every expert."""

    def get(self, layer: nn.Module) -> torch.Tensor:
        w = get_attr_path(layer, self.path)
        return w.transpose(1, 2) if self.transposed else w

    def paths(self) -> list[str]:
        return [self.path]

    def assemble(self, lookup) -> torch.Tensor:
        """The [E, out, in] tensor from ``lookup(path)`` (a checkpoint's tensors, not the layer's)."""
        w = lookup(self.path)
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


WeightSource = StackedWeight | ExpertListWeight
