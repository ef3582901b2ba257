"""nn.Modules swapped into user models; their forward calls kernel_moe ops only."""

from kernel_moe.layers.moe import FusedMoE
from kernel_moe.layers.spec import ExpertsSpec, MoESpec, RouterSpec

__all__ = ["ExpertsSpec", "FusedMoE", "MoESpec", "RouterSpec"]
