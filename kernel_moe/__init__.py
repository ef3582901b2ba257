"""kernel_moe: fused Mixture-of-Experts kernels for torch.compile.

    import kernel_moe
    manager = kernel_moe.UnifiedManager(kernel_moe.KernelConfig.for_moe(top_k=2))
    model = manager.optimize(model)          # manager.report: what was swapped, what skipped and why
    model = torch.compile(model, fullgraph=True)

Importing this package registers the ``kernel_moe::`` custom ops; it never initialises
CUDA and does not need triton.
"""

from __future__ import annotations

import logging
import sys

from kernel_moe.config import KernelConfig
from kernel_moe.errors import KernelMoEError, UnsupportedInputError, UnsupportedModuleError
from kernel_moe.layers import FusedExperts, FusedFFN, FusedMoE
from kernel_moe.layers.offload import offload_stats
from kernel_moe.layers.attention import SparseExpertAttention
from kernel_moe.manager import UnifiedManager, optimize, restore
from kernel_moe.moe import AuxLossFreeMoE, OptimizedTopKGating
from kernel_moe.report import OptimizeReport

logging.getLogger("kernel_moe").addHandler(logging.NullHandler())


def register_experts_implementation() -> bool:
    """Make ``model.set_experts_implementation("kernel_moe")`` available in transformers."""
    from kernel_moe.adapters.transformers_interface import register

    return register()


if "transformers" in sys.modules:
    register_experts_implementation()

__version__ = "0.1.0"

__all__ = [
    "AuxLossFreeMoE",
    "OptimizedTopKGating",
    "FusedExperts",
    "FusedFFN",
    "FusedMoE",
    "KernelConfig",
    "KernelMoEError",
    "OptimizeReport",
    "SparseExpertAttention",
    "UnifiedManager",
    "UnsupportedInputError",
    "UnsupportedModuleError",
    "offload_stats",
    "optimize",
    "register_experts_implementation",
    "restore",
    "__version__",
]
