"""The plan's MoE building blocks, written for users who build their own MoE (004's
``kernel_pytorch.moe``): a top-k gating module and an MoE layer over a list of expert MLPs, both
running kernel_moe's routing and fused experts.

    gating = OptimizedTopKGating(num_experts=8, top_k=2, capacity_factor=1.25, jitter_noise=0.1)
    expert_indices, expert_weights = gating(hidden_states)
    moe_layer = AuxLossFreeMoE(experts=experts, gating=gating, load_balancing="dynamic")
    out = moe_layer(hidden_states)

Legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kernel_moe.adapters.base import Skip
from kernel_moe.adapters.handwritten import form_experts_spec, prove_expert_form
from kernel_moe.adapters.probe import outputs_mismatch, probe_input, run_module
from kernel_moe.config import KernelConfig
from kernel_moe.layers.moe import FusedMoE
from kernel_moe.layers.spec import LinearRouter, MoESpec
from kernel_moe.routing.capacity import apply_capacity, expert_capacity
from kernel_moe.routing.jitter import jitter_input
from kernel_moe.routing.topk import SCORINGS, TopKRouting, route

PROBE_TOKENS = 16


def _check(owner: str, name: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r} is invalid; allowed: {allowed}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class OptimizedTopKGating(nn.Module):
    """Top-k gating: a router Linear(H -> E) (bias-free; created on the first call when
    ``hidden_size`` is None), scores (softmax or sigmoid), the top-k experts per token and their
    weights (renormalized over the k by default), an optional expert capacity and router jitter.

    ``forward(hidden_states [..., H]) -> (expert_indices [..., K] int64, expert_weights [..., K])``.
    With ``capacity_factor`` each expert takes at most ``ceil(capacity_factor * T * K / E)`` slots
    (highest weight first); a dropped slot has index -1 and weight 0, the experts op's rule for a
    slot nobody computes. ``jitter_noise`` multiplies the router input by U(1 - eps, 1 + eps) noise
    in training.
    """

    def __init__(self, num_experts: int, top_k: int = 2, capacity_factor: float | None = None,
                 jitter_noise: float = 0.0, hidden_size: int | None = None, renormalize: bool = True,
                 scoring: str = "softmax") -> None:
        super().__init__()
        name = "OptimizedTopKGating"
        _check(name, "num_experts", num_experts, _is_int(num_experts) and num_experts >= 1, "an int >= 1")
        _check(name, "top_k", top_k, _is_int(top_k) and 1 <= top_k <= num_experts,
               f"an int in [1, num_experts={num_experts}]")
        _check(name, "capacity_factor", capacity_factor,
               capacity_factor is None or (_is_number(capacity_factor) and capacity_factor > 0), "None or a number > 0")
        _check(name, "jitter_noise", jitter_noise, _is_number(jitter_noise) and 0 <= jitter_noise < 1,
               "a number in [0, 1)")
        _check(name, "hidden_size", hidden_size, hidden_size is None or (_is_int(hidden_size) and hidden_size >= 1),
               "None or an int >= 1")
        _check(name, "scoring", scoring, scoring in SCORINGS, ", ".join(SCORINGS))
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.jitter_noise = capacity_factor, float(jitter_noise)
        self.routing = TopKRouting(num_experts, top_k, scoring, renormalize=bool(renormalize))
        self.router = (nn.Linear(hidden_size, num_experts, bias=False) if hidden_size is not None
                       else nn.LazyLinear(num_experts, bias=False))

    def materialize(self, hidden_size: int, like: torch.Tensor) -> None:
        """Create a lazy router's weight now, for ``hidden_size`` inputs on ``like``'s device/dtype."""
        if isinstance(self.router, nn.LazyLinear) and self.router.has_uninitialized_params():
            self.router.to(device=like.device, dtype=like.dtype)
            self.router.initialize_parameters(like.new_zeros(1, hidden_size))
        if self.router.in_features != hidden_size:
            raise ValueError(f"OptimizedTopKGating router takes {self.router.in_features} features, the experts "
                             f"{hidden_size}")

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_in = jitter_input(x_TH, self.jitter_noise, self.training) if self.jitter_noise > 0 else x_TH
        weights_TK, ids_TK = route(self.router(router_in), self.routing)
        if self.capacity_factor is not None:
            T, K = ids_TK.shape
            capacity = expert_capacity(T, K, self.num_experts, self.capacity_factor)
            weights_TK, ids_TK, dropped_TK, _ = apply_capacity(weights_TK, ids_TK, self.num_experts, capacity)
            ids_TK = ids_TK.masked_fill(dropped_TK, -1)
        lead = hidden_states.shape[:-1]
        return ids_TK.reshape(*lead, self.top_k), weights_TK.reshape(*lead, self.top_k)


class _LoopMoE(nn.Module):
    """The definition of an AuxLossFreeMoE's computation, one expert at a time: what it is proven
    against, what ``kernel_moe.restore`` gives back."""

    def __init__(self, gating: OptimizedTopKGating, experts: nn.ModuleList) -> None:
        super().__init__()
        self.gating, self.experts = gating, experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        ids_TK, weights_TK = self.gating(x_TH)
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids_TK == e)
            if tok.numel():
                out_TH = out_TH.index_add(0, tok, expert(x_TH[tok]) * weights_TK[tok, slot, None].to(x_TH.dtype))
        return out_TH.reshape(hidden_states.shape)


def _hidden_size(expert: nn.Module) -> int:
    linears = [m for m in expert.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"AuxLossFreeMoE.experts: an expert ({type(expert).__name__}) holds no nn.Linear; allowed: "
                         "MLPs of 2 Linear layers (up, down) or 3 (gate, up, down)")
    return linears[0].in_features


class AuxLossFreeMoE(FusedMoE):
    """An MoE layer from a list of expert MLPs and an :class:`OptimizedTopKGating`, running the
    fused experts op (trainable: experts and router get their gradients).

    - ``experts``: an ``nn.ModuleList`` (or a list) of identical expert MLPs: 2 Linear layers with
      an activation between them, or 3 (gate, up, down: SwiGLU-style), with or without biases.
      Their wiring and activation are identified by computation, never by name.
    - ``gating``: its number of experts and top-k, capacity factor and jitter apply.
    - ``load_balancing``: "dynamic" (DeepSeek's auxiliary-loss-free balancing: a per-expert
      selection bias ``expert_bias`` moved against the load by
      ``kernel_moe.training.update_expert_biases(model)`` after each step), "auxiliary_loss"
      (Switch load-balancing loss in ``aux_loss``, see ``kernel_moe.training.aux_loss``) or "none".
    - ``config``: further :class:`KernelConfig` settings (backend, random routing, ...); the
      gating's values and ``load_balancing`` override its routing fields.

    It is a :class:`~kernel_moe.layers.moe.FusedMoE`: the training helpers, reports,
    ``torch.compile(fullgraph=True)`` and ``kernel_moe.restore`` (which gives the one-expert-at-a-
    time definition back) treat it like any swapped block. The fused layer is checked against that
    definition on a probe input when it is built.
    """

    def __init__(self, experts: nn.ModuleList | Sequence[nn.Module], gating: OptimizedTopKGating,
                 load_balancing: str = "dynamic", config: KernelConfig | None = None) -> None:
        if not isinstance(gating, OptimizedTopKGating):
            raise ValueError(f"AuxLossFreeMoE.gating={type(gating).__name__}; allowed: an OptimizedTopKGating")
        experts = experts if isinstance(experts, nn.ModuleList) else nn.ModuleList(experts)
        if len(experts) != gating.num_experts:
            raise ValueError(f"AuxLossFreeMoE.experts has {len(experts)} experts but the gating routes to "
                             f"num_experts={gating.num_experts}")
        if len({tuple(tuple(p.shape) for p in e.parameters()) for e in experts}) != 1:
            raise ValueError("AuxLossFreeMoE.experts differ in parameter shapes; allowed: identical expert MLPs")
        hidden = _hidden_size(experts[0])
        like = next(experts[0].parameters())
        gating.materialize(hidden, like)
        form = prove_expert_form(experts[0], hidden, PROBE_TOKENS)
        if isinstance(form, Skip):
            raise ValueError(f"AuxLossFreeMoE.experts: {form.reason}")
        intermediate = experts[0].get_submodule(form.up[0]).out_features
        spec = MoESpec(
            router=LinearRouter("gating.router.weight", gating.routing),
            experts=form_experts_spec(form, [f"experts.{e}." for e in range(len(experts))], hidden, intermediate),
        )
        config = (config or KernelConfig.for_moe()).replace(
            num_experts=gating.num_experts, top_k=gating.top_k, capacity_factor=gating.capacity_factor,
            router_jitter=gating.jitter_noise, load_balancing=load_balancing)
        original = _LoopMoE(gating, experts)
        super().__init__(original, spec, config)
        self._prove(original, like)

    def _prove(self, original: nn.Module, like: torch.Tensor) -> None:
        """The fused layer must compute the definition (eval mode, fresh balancing bias)."""
        x = probe_input((PROBE_TOKENS, self.hidden_size), like)
        why = outputs_mismatch(run_module(self, x), run_module(original, x))
        if why is not None:
            raise ValueError(f"AuxLossFreeMoE: the fused layer does not reproduce its experts and gating ({why})")


__all__ = ["AuxLossFreeMoE", "OptimizedTopKGating"]
