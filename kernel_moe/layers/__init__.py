"""nn.Modules swapped into user models; their forward calls kernel_moe ops only."""

from kernel_moe.layers.base import SwappedLayer
from kernel_moe.layers.experts import FusedExperts
from kernel_moe.layers.ffn import FusedFFN
from kernel_moe.layers.moe import FusedMoE
from kernel_moe.layers.spec import (
    ExpertsModuleSpec,
    ExpertsOnlySpec,
    ExpertsSpec,
    FFNSpec,
    LinearRouter,
    MoESpec,
    RouterSpec,
    SwapSpec,
)

__all__ = ["ExpertsModuleSpec", "ExpertsOnlySpec", "ExpertsSpec", "FFNSpec", "FusedExperts", "FusedFFN", "FusedMoE",
           "LinearRouter", "MoESpec", "RouterSpec", "SwapSpec", "SwappedLayer"]
