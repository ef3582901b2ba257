"""SwappedLayer: what every module kernel_moe swaps in has in common.

It adopts the original module's children, parameters and buffers under the same names (so
``state_dict`` keys and Parameter objects are unchanged), keeps the original for
``restore()`` and training fallbacks, and binds per-expert weights into stacked storage
(again after ``.to()`` and the like). It is built once with all it needs: the spec and the
user's :class:`~kernel_moe.config.KernelConfig` (backend, determinism, routing features).
"""

from __future__ import annotations

import torch
from torch import nn

from kernel_moe.config import KernelConfig


class SwappedLayer(nn.Module):
    """Common base of the swapped-in layers: adopts the original's children (same state_dict
    keys and Parameter objects), keeps the original for restore(), binds stacked weights."""

    def __init__(self, original: nn.Module, spec, config: KernelConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else KernelConfig()
        if not isinstance(config, KernelConfig):
            raise ValueError(f"{type(self).__name__}(config={config!r}): config must be a KernelConfig or None")
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, param in original.named_parameters(recurse=False):
            self.register_parameter(name, param)
        persistent = set(original.state_dict(keep_vars=True).keys())
        for name, buf in original.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name in persistent)
        self.__dict__["_original"] = original
        self.spec = spec
        self.kernel_config = config
        self.backend = config.backend
        self.deterministic = config.deterministic
        self._stacked_weights: dict[str, torch.Tensor] = {}
        self.quantized_experts: nn.Module | None = None  # see layers/quantized.py
        self.original_released = False  # the original's expert weights were released (quantized / offloaded)
        self.expert_parallel = None  # an ExpertParallel when the experts are sharded (layers/expert_parallel.py)
        self.released_sources: tuple = ()  # weight sources whose tensors were released (layers/quantized.py)
        self.offloaded_experts: nn.Module | None = None  # see layers/offload.py
        self.training = original.training

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_original"]

    def runs_original(self, *inputs: torch.Tensor) -> bool:
        """Whether this call must run the original module: in training when the fused path does
        not reproduce the original's training forward, and whenever autograd records the call
        when the fused backward does not reproduce the original's gradients."""
        spec = self.spec
        if self.training and spec.training_fallback is not None:
            return True
        if spec.gradient_fallback is None or not torch.is_grad_enabled():
            return False
        return any(t.requires_grad for t in inputs) or any(p.requires_grad for p in self.parameters())

    def _weight_sources(self) -> list:
        return []

    def experts_spec(self):
        """The ExpertsSpec of the experts this layer holds: the spec's, or this rank's share of
        them when expert parallelism sharded the layer."""
        return self.spec.experts if self.expert_parallel is None else self.expert_parallel.experts

    def _live_sources(self) -> list:
        """The weight sources still present (quantization or offloading may have released some)."""
        return [s for s in self._weight_sources() if all(s is not r for r in self.released_sources)]

    def _bind_weights(self) -> None:
        for source in self._live_sources():
            source.bind(self)

    def _apply(self, fn, recurse: bool = True):
        """After .to()/.half()/..., re-point per-expert weights into fresh stacked storage."""
        result = super()._apply(fn, recurse)
        self._bind_weights()  # a no-op for weights already stacked
        return result

    def features(self) -> str:
        """The features the config adds on top of the proven computation ("" when none)."""
        return ""

    def details(self) -> str:
        """What the report says about this layer: what it computes, the features the config
        added, and when it runs the original module instead."""
        sharding = self.expert_parallel.describe() if self.expert_parallel is not None else ""
        notes = [self.spec.describe(), self.features(), getattr(self, "quantization_note", ""), sharding,
                 getattr(self, "offload_note", ""),
                 *self.spec.fallback_notes()]
        return "; ".join(n for n in notes if n)

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, backend={self.backend}"
