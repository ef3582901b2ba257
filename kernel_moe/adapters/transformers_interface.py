"""kernel_moe as an implementation of transformers' experts interface.

After :func:`register` (done by ``import kernel_moe`` when transformers is already imported,
or by calling it), ``model.set_experts_implementation("kernel_moe")`` or
``config._experts_implementation = "kernel_moe"`` makes every experts module of the model run
``kernel_moe::fused_experts`` while transformers keeps its own router. Each experts module's
layout is read from the interface's flags and its activation proven once on a probe (eagerly,
at the first call or in :func:`prepare`); run one eager forward or call ``prepare(model)``
before ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.transformers import declared_hidden, experts_specs, is_stacked_experts
from kernel_moe.errors import KernelMoEError, UnsupportedModuleError
from kernel_moe.layers.experts import run_experts
from kernel_moe.layers.spec import ExpertsSpec

IMPLEMENTATION_NAME = "kernel_moe"
_SPEC_ATTR = "_kernel_moe_experts_spec"


def _spec_for(experts: nn.Module) -> ExpertsSpec:
    specs = experts_specs(experts, "", declared_hidden(experts))
    if isinstance(specs, Skip):
        raise UnsupportedModuleError(f"{type(experts).__name__}: {specs.reason}")
    if len(specs) != 1:
        raise UnsupportedModuleError(
            f"{type(experts).__name__}: the weight layout is ambiguous without an is_transposed flag")
    return specs[0]


def prepare(model: nn.Module) -> int:
    """Read and cache the layout of every experts module the interface dispatches (those
    transformers decorated with its experts flags); call before torch.compile. Raises
    UnsupportedModuleError naming the module when one cannot run on kernel_moe."""
    count = 0
    for module in model.modules():
        if is_stacked_experts(module) and hasattr(module, "has_gate"):
            module.__dict__[_SPEC_ATTR] = _spec_for(module)
            count += 1
    return count


def kernel_moe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts interface function: hidden_states [T, H], top_k_index/top_k_weights [T, K] -> [T, H]."""
    if getattr(self, "_is_expert_parallel", False):
        raise KernelMoEError("the kernel_moe experts implementation does not support expert parallelism")
    spec = self.__dict__.get(_SPEC_ATTR)
    if spec is None:
        if torch.compiler.is_compiling():
            raise KernelMoEError(
                "kernel_moe experts implementation: call kernel_moe.adapters.transformers_interface.prepare(model) "
                "or run one eager forward before torch.compile")
        spec = self.__dict__[_SPEC_ATTR] = _spec_for(self)
    x_TH = hidden_states.reshape(-1, spec.hidden)
    out_TH = run_experts(self, spec, x_TH, top_k_weights.reshape(top_k_index.shape), top_k_index, "auto")
    return out_TH.reshape(hidden_states.shape)


def register() -> bool:
    """Register "kernel_moe" in transformers' experts interface; False when transformers has none."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(IMPLEMENTATION_NAME, kernel_moe_experts_forward)
    return True
