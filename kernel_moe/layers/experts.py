"""FusedExperts: routed experts alone, called with precomputed routing.

Swapped in for a transformers ``*Experts`` module when its block's router is not one the
fused MoE layer reproduces: ``forward(hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K]) -> [T, H]``, the signature of transformers' experts interface.
"""

from __future__ import annotations

import torch
from torch import nn

from kernel_moe.config import KernelConfig
from kernel_moe.kernels.contract import StackedExperts
from kernel_moe.layers.base import SwappedLayer
from kernel_moe.layers.expert_parallel import parallel_experts
from kernel_moe.layers.quantized import stacked_quantized
from kernel_moe.layers.spec import ExpertsModuleSpec, ExpertsSpec
from kernel_moe.ops.experts import run_experts as run_op


def stacked_experts(layer: nn.Module, ex: ExpertsSpec, scale_inputs: bool = False) -> list[StackedExperts]:
    """The experts ``ex`` names on ``layer``, as the op's value types (views, no copies): one
    call's, or with quantized experts their buffers (two calls when hot experts stay in full
    precision, see layers/quantized.py); ``scale_inputs``: the routing weights scale each
    expert's input (Llama 4). An up weight holding more experts than ``ex`` (rows of weightless
    experts) is viewed as its first E."""
    calls = _stacked(layer, ex, scale_inputs)
    if ex.post_norm is None:
        return calls
    scale_H = ex.post_norm.scale(layer)
    return [c._replace(post_norm=scale_H, post_norm_eps=ex.post_norm.eps) for c in calls]


def _stacked(layer: nn.Module, ex: ExpertsSpec, scale_inputs: bool) -> list[StackedExperts]:
    """The calls of :func:`stacked_experts` before the post-expert norm is attached."""
    if getattr(layer, "quantized_experts", None) is not None:
        return stacked_quantized(layer, ex, scale_inputs)
    w_up = ex.up.get(layer)
    return [StackedExperts(
        w_up if w_up.shape[0] == ex.num_experts else w_up[: ex.num_experts],
        ex.down.get(layer),
        ex.up_bias.get(layer) if ex.up_bias is not None else None,
        ex.down_bias.get(layer) if ex.down_bias is not None else None,
        ex.activation,
        scale_inputs=scale_inputs,
    )]


def run_experts(layer: nn.Module, ex: ExpertsSpec, x_TH: torch.Tensor, weights_TK: torch.Tensor | None,
                ids_TK: torch.Tensor | None, backend: str, deterministic: bool = True,
                scale_inputs: bool = False) -> torch.Tensor:
    """The fused experts op on the weights ``ex`` names on ``layer``: [T, H] -> [T, H] (routing
    None: a dense call of a one-expert spec); the calls of several expert sets add up; from the slots when
    the layer's experts are offloaded."""
    if getattr(layer, "offloaded_experts", None) is not None:
        return layer.offloaded_experts(x_TH, weights_TK, ids_TK)
    first, *rest = stacked_experts(layer, ex, scale_inputs)
    out_TH = run_op(x_TH, weights_TK, ids_TK, first, backend, deterministic)
    for experts in rest:
        out_TH = out_TH + run_op(x_TH, weights_TK, ids_TK, experts, backend, deterministic)
    return out_TH


class FusedExperts(SwappedLayer):
    """Routed experts with routing given by the caller."""

    def __init__(self, original: nn.Module, spec: ExpertsModuleSpec, config: KernelConfig | None = None) -> None:
        super().__init__(original, spec, config)
        self.num_experts = spec.num_experts
        self.top_k = 0
        self._bind_weights()

    def _weight_sources(self) -> list:
        return self.experts_spec().sources()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.runs_original(hidden_states, top_k_weights):
            return self.original(hidden_states, top_k_index, top_k_weights)
        H = self.spec.experts.hidden
        x_TH = hidden_states.reshape(-1, H)
        ids_TK = top_k_index.reshape(x_TH.shape[0], -1)
        weights_TK = top_k_weights.reshape(ids_TK.shape)
        if self.expert_parallel is not None:
            out_TH = parallel_experts(self, x_TH, weights_TK, ids_TK)
        else:
            out_TH = run_experts(self, self.spec.experts, x_TH, weights_TK, ids_TK, self.backend, self.deterministic)
        return out_TH.reshape(hidden_states.shape)
