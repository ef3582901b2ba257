"""Training helpers over every fused layer of a model: auxiliary losses, aux-loss-free bias
updates, dropped-token and random-routing counts, and routing health (collapse detection).

    loss = task_loss + kernel_moe.training.aux_loss(model)      # load_balancing="auxiliary_loss"
    loss.backward(); optimizer.step()
    kernel_moe.training.update_expert_biases(model)             # load_balancing="dynamic"
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from kernel_moe.layers.attention import SparseExpertAttention
from kernel_moe.layers.moe import FusedMoE
from kernel_moe.routing.balancing import update_expert_bias

logger = logging.getLogger("kernel_moe")


ROUTED_LAYERS = (FusedMoE, SparseExpertAttention)


def fused_layers(model: nn.Module) -> list[nn.Module]:
    """The routed layers of a model: fused MoE blocks and sparse expert attention."""
    return [m for m in model.modules() if isinstance(m, ROUTED_LAYERS)]


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


def randomly_routed(model: nn.Module) -> int:
    """Tokens sent to a random expert by ``random_routing`` in the last training forward, over all
    layers."""
    return int(sum(int(m.randomly_routed) for m in fused_layers(model) if m.randomly_routed is not None))


@dataclass(frozen=True)
class RoutingHealth:
    """One layer's routing over the monitor's window of steps.

    - ``tokens_per_expert``: slots routed to each expert over the window.
    - ``dead_experts``: experts that got no slot in the last ``dead_after`` steps.
    - ``largest_share`` / ``largest_expert``: the busiest expert's share of all slots.
    - ``collapsed``: the largest share is above the monitor's threshold, or an expert is dead.
    """

    layer: str
    steps: int
    tokens_per_expert: tuple[int, ...]
    dead_experts: tuple[int, ...]
    largest_share: float
    largest_expert: int
    collapsed: bool


class RoutingMonitor:
    """Watches the routing of every fused MoE layer of a model for expert collapse.

    ``step()`` (once per training step) reads each layer's slot counts since the last step (one
    host read per layer), keeps the last ``window`` steps, and logs a warning when a layer
    collapses: one expert above ``collapse_share`` of the slots, or experts with no slot for
    ``dead_after`` steps (warned once per episode, again after it recovers and collapses anew).
    It switches on ``track_routing`` of the layers it watches.

        monitor = kernel_moe.training.RoutingMonitor(model, window=100)
        for batch in data:
            ...; optimizer.step()
            health = monitor.step()      # list of RoutingHealth, one per layer
    """

    def __init__(self, model: nn.Module, window: int = 100, collapse_share: float = 0.5,
                 dead_after: int = 100) -> None:
        for name, value, low in (("window", window, 1), ("dead_after", dead_after, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"RoutingMonitor.{name}={value!r}; allowed: an int >= {low}")
        if isinstance(collapse_share, bool) or not isinstance(collapse_share, (int, float)) or \
                not 0 < collapse_share <= 1:
            raise ValueError(f"RoutingMonitor.collapse_share={collapse_share!r}; allowed: a number in (0, 1]")
        self.window, self.collapse_share, self.dead_after = window, float(collapse_share), dead_after
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, ROUTED_LAYERS)]
        self._history: dict[str, deque] = {name: deque(maxlen=window) for name, _ in self.layers}
        self._idle: dict[str, torch.Tensor] = {name: torch.zeros(m.routing_counts.numel(), dtype=torch.int64)
                                               for name, m in self.layers}
        self._warned: set[str] = set()
        for _, layer in self.layers:
            layer.reset_routing_counts()
            layer.track_routing(True)

    def step(self) -> list[RoutingHealth]:
        """Take this step's counts, update the window, warn on collapse; the health of each layer."""
        for name, layer in self.layers:
            counts = layer.routing_counts.detach().to("cpu", copy=True)
            layer.reset_routing_counts()
            self._history[name].append(counts)
            self._idle[name] = torch.where(counts > 0, torch.zeros_like(counts), self._idle[name] + 1)
        health = self.health()
        for h in health:
            if h.collapsed and h.layer not in self._warned:
                self._warned.add(h.layer)
                logger.warning("kernel_moe: routing of %s is collapsing: expert %d has %.0f%% of the slots over %d "
                               "steps; experts without a slot for %d steps: %s", h.layer or "<root>",
                               h.largest_expert, 100 * h.largest_share, h.steps, self.dead_after,
                               list(h.dead_experts) or "none")
            elif not h.collapsed:
                self._warned.discard(h.layer)
        return health

    def health(self) -> list[RoutingHealth]:
        """The routing health of each watched layer over the current window."""
        out = []
        for name, _ in self.layers:
            history = self._history[name]
            if not history:
                continue
            total = torch.stack(list(history)).sum(dim=0)
            slots = int(total.sum())
            largest = int(total.argmax())
            share = float(total[largest]) / slots if slots else 0.0
            dead = tuple(int(e) for e in (self._idle[name] >= self.dead_after).nonzero().flatten())
            out.append(RoutingHealth(name, len(history), tuple(int(c) for c in total), dead, share, largest,
                                     share > self.collapse_share or bool(dead)))
        return out
