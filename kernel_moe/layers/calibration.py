"""Calibration: how many routing slots each swapped layer gives each of its experts over a few
model inputs (what ``KernelConfig.quantize_hot_experts`` chooses its full-precision experts by).

A fused MoE layer counts its own routing (``FusedMoE.track_routing``); a fused experts module,
whose routing its caller computes, is counted from the ids it is called with. The model runs in
eval mode without autograd; every module's mode and every layer's own counters are left as
they were.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def _call(model: nn.Module, inputs: object) -> None:
    """``model(inputs)``: a dict is keyword arguments, a tuple or list positional ones."""
    if isinstance(inputs, dict):
        model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        model(*inputs)
    else:
        model(inputs)


def count_routing(model: nn.Module, layers: list[nn.Module], calibration: Iterable) -> dict[nn.Module, torch.Tensor]:
    """{layer: [E] int64 slots routed to each expert} over the ``calibration`` inputs (see
    :func:`_call`). Raises ValueError when the inputs are empty."""
    counts = {layer: torch.zeros(layer.num_experts, dtype=torch.int64) for layer in layers}
    modes = [(m, m.training) for m in model.modules()]
    saved, handles = {}, []
    for layer in layers:
        if hasattr(layer, "routing_counts"):
            saved[layer] = (layer.routing_counts.clone(), getattr(layer, "_track_routing", False))
            layer.routing_counts.zero_()
            layer.track_routing(True)
        else:
            def hook(module, args, kwargs, layer=layer):
                ids = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
                kept = ids[(ids >= 0) & (ids < layer.num_experts)]
                counts[layer] += torch.bincount(kept.reshape(-1).cpu(), minlength=layer.num_experts)

            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for inputs in calibration:
                _call(model, inputs)
                seen += 1
        for layer, (before, tracking) in saved.items():
            counts[layer] += layer.routing_counts.cpu()
    finally:
        for handle in handles:
            handle.remove()
        for layer, (before, tracking) in saved.items():
            layer.routing_counts.copy_(before)
            layer.track_routing(tracking)
        for m, flag in modes:
            m.training = flag
    if seen == 0:
        raise ValueError("calibration gave no inputs; pass a list of model inputs (tensors, tuples or dicts)")
    return counts


__all__ = ["count_routing"]
