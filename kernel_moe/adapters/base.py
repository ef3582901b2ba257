"""What an adapter is: it recognizes a module by structure and proposes candidate specs.

``candidates(module, config)`` returns None when the module is not the adapter's concern,
a :class:`Skip` with the reason when it looks like an MoE/FFN that cannot be swapped, or a
list of candidate specs, most likely first. The manager proves a candidate by computation
(:mod:`kernel_moe.adapters.probe`) before swapping anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn

from kernel_moe.config import KernelConfig
from kernel_moe.layers.spec import MoESpec


@dataclass(frozen=True)
class Skip:
    """A candidate module that will not be swapped, and why."""

    reason: str


class Adapter(Protocol):
    name: str

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[MoESpec] | Skip | None: ...


def check_expected_shape(num_experts: int, top_k: int, config: KernelConfig) -> Skip | None:
    """A Skip when the module's experts/top-k differ from what the config says to expect."""
    if config.num_experts is not None and config.num_experts != num_experts:
        return Skip(f"module has num_experts={num_experts}, config expects num_experts={config.num_experts}")
    if config.top_k is not None and config.top_k != top_k:
        return Skip(f"module routes top_k={top_k}, config expects top_k={config.top_k}")
    return None
