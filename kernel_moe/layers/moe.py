"""FusedMoE: the module swapped in for a recognized MoE block.

It adopts the original block's children under the same names (so ``state_dict`` keys and
Parameter objects are unchanged), and its forward is router -> ``route`` ->
``kernel_moe::fused_experts`` (+ shared expert): no host syncs and no Python loop over
experts, so ``torch.compile(fullgraph=True)`` captures it whole.

Legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernel_moe.layers.spec import MoESpec
from kernel_moe.layers.weights import ExpertListWeight, get_attr_path
from kernel_moe.ops import experts as _experts_op  # noqa: F401  (registers kernel_moe::fused_experts)
from kernel_moe.routing.topk import route


def adopt_children(layer: nn.Module, original: nn.Module) -> None:
    """Register the original module's children, parameters and buffers on ``layer`` under
    the same names, so that state_dict keys and tensors are identical."""
    for name, child in original.named_children():
        layer.add_module(name, child)
    for name, param in original.named_parameters(recurse=False):
        layer.register_parameter(name, param)
    persistent = set(original.state_dict(keep_vars=True).keys())
    for name, buf in original.named_buffers(recurse=False):
        layer.register_buffer(name, buf, persistent=name in persistent)


class FusedMoE(nn.Module):
    """A routed-experts block running kernel_moe's fused op.

    ``original`` is kept (unregistered) for :func:`kernel_moe.restore` and for training
    steps the fused path does not reproduce (``spec.training_fallback``).
    """

    def __init__(self, original: nn.Module, spec: MoESpec, backend: str = "auto") -> None:
        super().__init__()
        adopt_children(self, original)
        self.__dict__["_original"] = original
        self.spec = spec
        self.backend = backend
        self.num_experts = spec.num_experts
        self.top_k = spec.top_k
        self.hidden_size = spec.experts.hidden
        self._stacked_weights: dict[str, torch.Tensor] = {}
        self._track_routing = False
        device = get_attr_path(self, spec.router.weight).device
        self.register_buffer("routing_counts", torch.zeros(self.num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        self._bind_weights()

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_original"]

    def _weight_sources(self):
        ex = self.spec.experts
        return [s for s in (ex.up, ex.down, ex.up_bias, ex.down_bias) if s is not None]

    def _bind_weights(self) -> None:
        for source in self._weight_sources():
            source.bind(self)

    def _apply(self, fn, recurse: bool = True):
        """After .to()/.half()/..., re-point per-expert weights into fresh stacked storage."""
        result = super()._apply(fn, recurse)
        if any(isinstance(s, ExpertListWeight) for s in self._weight_sources()):
            self._bind_weights()
        return result

    def track_routing(self, enabled: bool = True) -> None:
        """Accumulate per-expert slot counts into ``routing_counts`` on every forward."""
        self._track_routing = enabled

    def reset_routing_counts(self) -> None:
        self.routing_counts.zero_()

    def router_logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, E]."""
        r = self.spec.router
        w_EH = get_attr_path(self, r.weight)
        b_E = get_attr_path(self, r.bias) if r.bias is not None else None
        if r.fp32_logits:
            return F.linear(x_TH.float(), w_EH.float(), None if b_E is None else b_E.float())
        return F.linear(x_TH, w_EH, b_E)

    def forward(self, hidden_states: torch.Tensor):
        if self.training and self.spec.training_fallback is not None:
            return self.original(hidden_states)
        spec = self.spec
        H = self.hidden_size
        x_TH = hidden_states.reshape(-1, H)
        if self.training and spec.input_jitter > 0:
            noise = torch.empty_like(x_TH).uniform_(1.0 - spec.input_jitter, 1.0 + spec.input_jitter)
            x_TH = x_TH * noise
        logits_TE = self.router_logits(x_TH)
        sel_bias = get_attr_path(self, spec.router.selection_bias) if spec.router.selection_bias else None
        weights_TK, ids_TK = route(logits_TE, spec.router.routing, sel_bias)
        if self._track_routing:
            self.routing_counts.index_add_(0, ids_TK.reshape(-1), torch.ones_like(ids_TK.reshape(-1)))
        ex = spec.experts
        out_TH = torch.ops.kernel_moe.fused_experts(
            x_TH,
            weights_TK,
            ids_TK,
            ex.up.get(self),
            ex.down.get(self),
            ex.up_bias.get(self) if ex.up_bias is not None else None,
            ex.down_bias.get(self) if ex.down_bias is not None else None,
            ex.activation,
            ex.glu,
            ex.alpha,
            ex.limit,
            self.backend,
        )
        if spec.shared_expert is not None:
            shared_TH = get_attr_path(self, spec.shared_expert)(x_TH)
            if spec.shared_gate is not None:
                shared_TH = torch.sigmoid(get_attr_path(self, spec.shared_gate)(x_TH)) * shared_TH
            out_TH = out_TH + shared_TH
        out = out_TH.reshape(hidden_states.shape)
        if spec.returns == "tensor_logits":
            return out, logits_TE
        return out

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, backend={self.backend}"
