"""Adapters: recognize model families by structure and propose specs for the fused layers.

The registry order is the order in which adapters are asked; register your own with
:func:`register_adapter`.
"""

from __future__ import annotations

from kernel_moe.adapters.base import Adapter, Skip
from kernel_moe.adapters.ffn import DenseFFNAdapter
from kernel_moe.adapters.handwritten import HandwrittenMoEAdapter
from kernel_moe.adapters.handwritten_attention import HandwrittenMoAAdapter
from kernel_moe.adapters.handwritten_switchhead import HandwrittenSwitchHeadAdapter
from kernel_moe.adapters.hf_attention import MoAAttentionAdapter
from kernel_moe.adapters.transformers import TransformersExpertsAdapter, TransformersMoEAdapter
from kernel_moe.adapters.unsupported import UnsupportedMoEAdapter

_REGISTRY: list[Adapter] = [
    MoAAttentionAdapter(),
    TransformersMoEAdapter(),
    HandwrittenMoEAdapter(),
    TransformersExpertsAdapter(),
    DenseFFNAdapter(),
    HandwrittenMoAAdapter(),
    HandwrittenSwitchHeadAdapter(),
    UnsupportedMoEAdapter(),
]


def registered_adapters() -> list[Adapter]:
    return list(_REGISTRY)


def register_adapter(adapter: Adapter, first: bool = True) -> None:
    """Add an adapter (asked before the built-in ones when ``first``)."""
    if first:
        _REGISTRY.insert(0, adapter)
    else:
        _REGISTRY.append(adapter)


__all__ = ["Adapter", "Skip", "register_adapter", "registered_adapters"]
