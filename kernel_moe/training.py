"""Training helpers over every fused layer of a model: auxiliary losses, aux-loss-free bias
updates and dropped-token counts.

    loss = task_loss + kernel_moe.training.aux_loss(model)      # load_balancing="auxiliary_loss"
    loss.backward(); optimizer.step()
    kernel_moe.training.update_expert_biases(model)             # load_balancing="dynamic"
"""

from __future__ import annotations

import torch
from torch import nn

from kernel_moe.layers.moe import FusedMoE
from kernel_moe.routing.balancing import update_expert_bias


def fused_layers(model: nn.Module) -> list[FusedMoE]:
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the load-balancing (+ z) losses the fused layers computed in their last training
    forward; a 0-dim zero when there are none."""
    losses = [m.aux_loss for m in fused_layers(model) if m.aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()


def update_expert_biases(model: nn.Module, process_group: object | None = None) -> int:
    """One aux-loss-free balancing step per "dynamic" layer from the load counted since the
    last call (all-reduced when distributed); resets the counts. Returns the layers updated."""
    updated = 0
    for m in fused_layers(model):
        if m.kernel_config.load_balancing != "dynamic":
            continue
        update_expert_bias(m.expert_bias, m.load_counts, m.kernel_config.bias_update_rate, process_group)
        m.load_counts.zero_()
        updated += 1
    return updated


def dropped_tokens(model: nn.Module) -> int:
    """Token-expert slots dropped by capacity limits in the last forward, over all layers."""
    return int(sum(int(m.dropped_tokens) for m in fused_layers(model) if m.dropped_tokens is not None))
