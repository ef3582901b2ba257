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
from kernel_moe.layers.spec import SwapSpec


@dataclass(frozen=True)
class Skip:
    """A candidate module that will not be swapped, and why."""

    reason: str


class Adapter(Protocol):
    name: str

    def candidates(self, module: nn.Module, config: KernelConfig) -> list[SwapSpec] | Skip | None: ...
