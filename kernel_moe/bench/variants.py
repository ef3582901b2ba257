"""The implementations a benchmark compares, each built from a deep copy of the model, so the
caller's model is never touched.

- ``original``: the model as given.
- ``compiled``: ``torch.compile`` of the original.
- ``optimized``: ``kernel_moe.optimize`` applied.
- ``optimized+compiled``: ``kernel_moe.optimize`` then ``torch.compile``.
- baselines: a string names a transformers experts implementation (``"eager"``,
  ``"grouped_mm"``, ``"batched_mm"``) set with ``model.set_experts_implementation``; a
  ``(name, factory)`` pair builds any module, ``factory()`` or ``factory(copy_of_model)``.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kernel_moe.bench.settings import BenchSettings

logger = logging.getLogger("kernel_moe")

DEFAULT_VARIANTS = ("original", "optimized", "optimized+compiled")
BUILTIN_VARIANTS = ("original", "compiled", "optimized", "optimized+compiled")
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")

Spec = str | Callable  # a built-in variant or experts implementation name, or a factory


class VariantUnavailable(Exception):
    """A variant cannot be built on this model or installation (the message says why)."""


@dataclass
class Variant:
    """One built implementation: what is timed and the module underneath it."""

    name: str
    run_module: Callable  # what is timed (may be a torch.compile wrapper)
    eager_module: nn.Module  # the module underneath (used for routing counts and parameters)
    equivalent: bool  # computes the original's function (checked against it)
    info: dict = field(default_factory=dict)


def check_variants(variants: Sequence[str]) -> list[str]:
    """The built-in variants to measure, in order, without repeats."""
    for v in variants:
        if v not in BUILTIN_VARIANTS:
            raise ValueError(f"MoEBenchmark.variants has {v!r}; allowed: {', '.join(BUILTIN_VARIANTS)}")
    return list(dict.fromkeys(variants))


def check_baselines(baselines: Sequence[str | tuple[str, Callable]]) -> list[tuple[str, Spec]]:
    """Baselines as ``(name, spec)`` pairs: a name stands for itself."""
    out: list[tuple[str, Spec]] = []
    for b in baselines:
        if isinstance(b, str):
            if b not in EXPERTS_IMPLEMENTATIONS and b not in BUILTIN_VARIANTS:
                allowed = ", ".join((*EXPERTS_IMPLEMENTATIONS, *BUILTIN_VARIANTS))
                raise ValueError(f"MoEBenchmark.baselines has {b!r}; allowed: {allowed} or (name, factory)")
            out.append((b, b))
        elif isinstance(b, tuple) and len(b) == 2 and isinstance(b[0], str) and callable(b[1]):
            out.append((b[0], b[1]))
        else:
            raise ValueError(
                f"MoEBenchmark.baselines has {b!r}; allowed: an experts implementation name or (name, factory)"
            )
    return out


class VariantBuilder:
    """Builds variants of ``model`` on ``device`` in ``dtype``, in eval mode."""

    def __init__(
        self, model: nn.Module, device: torch.device, dtype: torch.dtype, settings: BenchSettings, group: str
    ) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.optimize_config = settings.optimize_config
        self.compile_kwargs = dict(settings.compile_kwargs)
        self.group = group

    def copy(self) -> nn.Module:
        return copy.deepcopy(self.model).to(device=self.device, dtype=self.dtype).eval()

    def _compile(self, module: nn.Module) -> Callable:
        return torch.compile(module, **self.compile_kwargs)

    def _optimized(self) -> tuple[nn.Module, dict]:
        from kernel_moe.manager import UnifiedManager

        manager = UnifiedManager(self.optimize_config)
        module = manager.optimize(self.copy())  # a bare MoE block comes back as its fused layer
        report = manager.report
        info = {"swapped": len(report.swapped), "report": str(report)}
        if not report.swapped:
            logger.warning("bench: kernel_moe.optimize swapped no module of %s", self.group)
        return module.eval(), info

    def build(self, name: str, spec: Spec) -> Variant:
        """The variant ``name`` built from ``spec``; raises :class:`VariantUnavailable` when it
        cannot be built here."""
        if spec in ("original", "compiled"):
            m = self.copy()
            return Variant(name, m if spec == "original" else self._compile(m), m, True)
        if spec in ("optimized", "optimized+compiled"):
            m, info = self._optimized()
            return Variant(name, m if spec == "optimized" else self._compile(m), m, True, info)
        if isinstance(spec, str):
            return self._experts_implementation(name, spec)
        return self._factory(name, spec)

    def _experts_implementation(self, name: str, implementation: str) -> Variant:
        m = self.copy()
        setter = getattr(m, "set_experts_implementation", None)
        if not callable(setter):
            raise VariantUnavailable(f"{type(m).__name__} has no set_experts_implementation()")
        try:
            setter(implementation)
        except (ValueError, ImportError, NotImplementedError) as exc:
            raise VariantUnavailable(f"set_experts_implementation({implementation!r}) failed: {exc}") from exc
        return Variant(name, m, m, True, {"experts_implementation": implementation})

    def _factory(self, name: str, factory: Callable) -> Variant:
        params = [
            p
            for p in inspect.signature(factory).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        built = factory(self.copy()) if params else factory()
        if not isinstance(built, nn.Module):
            raise VariantUnavailable(f"factory for {name!r} returned {type(built).__name__}, not an nn.Module")
        built = built.to(device=self.device, dtype=self.dtype).eval()
        return Variant(name, built, built, False, {"factory": getattr(factory, "__name__", repr(factory))})
