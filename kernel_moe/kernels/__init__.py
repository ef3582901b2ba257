"""Fused MoE Triton kernels and their launch helpers (no nn.Module, no torch.library).

Importing this package does not import triton: the public functions are resolved on first
access, so ``import kernel_moe`` works where triton is missing, and
``from kernel_moe.kernels import fused_experts_triton`` imports triton only then.
:func:`triton_available` says whether they can be used. The block-size config helpers do
not need triton.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from kernel_moe.kernels.block_config import (
    config_file_name,
    default_kernel_config,
    get_kernel_config,
    validate_kernel_config,
)

_LAZY = {
    "topk_gating": "kernel_moe.kernels.routing",
    "align_by_expert": "kernel_moe.kernels.routing",
    "AlignedRouting": "kernel_moe.kernels.routing",
    "fused_experts_triton": "kernel_moe.kernels.fused_moe",
    "moe_up_projection": "kernel_moe.kernels.fused_moe",
    "moe_down_projection": "kernel_moe.kernels.fused_moe",
    "fused_experts_backward_triton": "kernel_moe.kernels.backward",
    "default_backward_config": "kernel_moe.kernels.backward",
}

__all__ = [
    "AlignedRouting",
    "align_by_expert",
    "config_file_name",
    "default_backward_config",
    "default_kernel_config",
    "fused_experts_backward_triton",
    "fused_experts_triton",
    "get_kernel_config",
    "moe_down_projection",
    "moe_up_projection",
    "topk_gating",
    "triton_available",
    "validate_kernel_config",
]


def triton_available() -> bool:
    """True when triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kernel_moe.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
