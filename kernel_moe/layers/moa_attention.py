"""FusedMoAAttention: the layer swapped in for a transformers attention layer whose queries come
from a mixture of attention heads (JetMoE's ``JetMoeAttention`` holding a ``JetMoeMoA``).

The original routes each token to its top-k attention experts, projects one query per expert
(``experts.map``), attends over shared rotary keys and values with the model's attention function,
and projects and sums the expert outputs (``experts.reduce``); its grouping step reads expert
sizes on the host (``.tolist()``), which breaks ``torch.compile`` graphs. This layer computes the
same with the two halves of the experts op (``kernel_moe::expert_projection``: the query
projection is the gather half, the output projection and weighted sum the combine half) and the
very same attention function (the model's ``_attn_implementation``, looked up per call), so the
cache, the masks and the attention weights behave as in the original. It adopts the original's
children (``experts``, ``kv_proj``): state_dict keys and Parameters are unchanged.

Legend: B batch, T sequence, N = B*T tokens, D hidden, E experts, K top-k, h key/value heads,
d head dim, F = h*d.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernel_moe.config import KernelConfig
from kernel_moe.layers.attention import apply_rotary, moa_attend
from kernel_moe.layers.attention_masks import describe_masks, fused_mask
from kernel_moe.layers.base import SwappedLayer
from kernel_moe.layers.spec import SwapSpec
from kernel_moe.layers.weights import WeightSource, get_attr_path, weight_rows
from kernel_moe.ops.projection import run_projection
from kernel_moe.routing.topk import TopKRouting, route

ROUTER, W_Q, W_O, BIAS, KV = ("experts.router.layer.weight", "experts.input_linear.weight",
                              "experts.output_linear.weight", "experts.bias", "kv_proj")
COPIED = ("config", "layer_idx", "is_causal", "num_key_value_groups", "top_k", "attention_dropout",
          "kv_projection_size", "num_key_value_heads", "num_heads", "head_dim", "scaling")


@dataclass(frozen=True)
class MoAAttentionSpec(SwapSpec):
    """An attention layer with MoA queries: E experts, top-k per token (softmax over the top-k
    logits), h shared key/value heads of size d, and ``attention(module)`` -> the attention
    function the original calls (resolved per call)."""

    hidden: int
    head_dim: int
    num_kv_heads: int
    attention: Callable[[nn.Module], Callable]
    num_experts: int = 1  # (after the fields without a default: SwapSpec gives these class defaults)
    top_k: int = 1
    training_fallback: str | None = None
    gradient_fallback: str | None = None
    quantizable = False  # the expert projections are not in the experts contract's up/down form

    def layer_class(self) -> type[nn.Module]:
        return FusedMoAAttention

    def describe(self) -> str:
        F_ = self.num_kv_heads * self.head_dim
        return (f"mixture of attention heads: softmax top-{self.top_k} of {self.num_experts} experts, "
                f"queries/outputs {self.num_experts}x[{self.hidden}<->{F_}], {self.num_kv_heads} shared kv heads")


class FusedMoAAttention(SwappedLayer):
    """The swapped-in MoA attention layer (see the module docstring). Returns what the original
    returns: (output [B, T, D], attention weights or None, router logits [N, E] fp32)."""

    def __init__(self, original: nn.Module, spec: MoAAttentionSpec, config: KernelConfig | None = None) -> None:
        super().__init__(original, spec, config)
        for name in COPIED:
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))
        self.num_experts, self.top_k = spec.num_experts, spec.top_k
        self.routing = TopKRouting(spec.num_experts, spec.top_k, "softmax", order="topk_then_score")

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, cache=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if self.runs_original(hidden_states):
            return self.original(hidden_states, attention_mask, position_embeddings, cache, **kwargs)
        spec = self.spec
        B, T, D = hidden_states.shape
        K, d = spec.top_k, spec.head_dim
        x_ND = hidden_states.reshape(B * T, D)
        logits_NE = F.linear(x_ND, self.get_parameter(ROUTER)).float()
        weights_NK, ids_NK = route(logits_NE, self.routing)
        q_NKF = run_projection(x_ND, None, ids_NK, self.get_parameter(W_Q), backend=self.backend)
        k_BTF, v_BTF = self.get_submodule(KV)(hidden_states).chunk(2, dim=-1)
        # heads ordered (slot k, kv head j): query head k*h + j reads kv head j (the original's repeat)
        q = q_NKF.view(B, T, -1, d).transpose(1, 2)
        k = k_BTF.view(B, T, -1, d).transpose(1, 2)
        v = v_BTF.view(B, T, -1, d).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        k, v = k.repeat(1, K, 1, 1), v.repeat(1, K, 1, 1)
        o, attn_weights = self.spec.attention(self)(
            self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling, **kwargs)
        o_NKF = o.reshape(B * T, K, -1)
        out_ND = run_projection(o_NKF, weights_NK.to(hidden_states.dtype), ids_NK, self.get_parameter(W_O),
                                backend=self.backend)
        out_ND = out_ND + self.get_parameter(BIAS)
        return out_ND.view(B, T, D), attn_weights, logits_NE




@dataclass(frozen=True)
class HandwrittenMoASpec(SwapSpec):
    """A hand-written MoA module (one forward(x [B, T, D]) call): paths of the router weight [E, D],
    the expert query [E, F, D] and output [E, D, F] projections (stacked or per-expert Linears),
    the key and value weights ((path, part): part 0 / 1 takes the first / second half of the rows of
    a fused key-value weight, None the whole), the output bias (or None); h heads per expert,
    causal or not, and whether the top-k softmax weights are renormalized over the k."""

    router: str
    w_q: WeightSource
    w_o: WeightSource
    key: tuple[str, int | None]
    value: tuple[str, int | None]
    bias: str | None
    num_heads: int
    causal: bool
    renormalize: bool
    num_experts: int = 1  # (after the fields without a default: SwapSpec gives these class defaults)
    top_k: int = 1
    training_fallback: str | None = None
    gradient_fallback: str | None = None
    mask_arg: str | None = None  # the forward's argument after x (a mask), if it has one
    masks: tuple[tuple[str, str], ...] = ()  # proven (mask kind, reading), see layers/attention_masks.py
    mask_note: str = ""  # what the report says about masks that were not proven
    quantizable = False

    def layer_class(self) -> type[nn.Module]:
        return FusedHandwrittenMoA

    def describe(self) -> str:
        order = "top-k softmax" if self.renormalize else "softmax, top-k"
        text = (f"mixture of attention heads: {order} {self.top_k} of {self.num_experts} experts of "
                f"{self.num_heads} heads, {'causal' if self.causal else 'bidirectional'}, shared kv")
        return "; ".join(t for t in (text, describe_masks(self.masks), self.mask_note) if t)


class FusedHandwrittenMoA(SwappedLayer):
    """The swapped-in layer for a hand-written MoA module: routing, the query projection (gather
    half of the experts op), ``scaled_dot_product_attention`` over the shared keys and values, the
    output projection and weighted sum (combine half). Proven for ``forward(x)`` and for
    ``forward(x, mask)`` with a mask of a proven kind (see layers/attention_masks.py): any other
    call runs the original module."""

    def __init__(self, original: nn.Module, spec: HandwrittenMoASpec, config: KernelConfig | None = None) -> None:
        super().__init__(original, spec, config)
        self.num_experts, self.top_k = spec.num_experts, spec.top_k
        self.routing = (TopKRouting(spec.num_experts, spec.top_k, "softmax", order="topk_then_score")
                        if spec.renormalize else TopKRouting(spec.num_experts, spec.top_k, "softmax"))
        self._bind_weights()

    def _weight_sources(self) -> list:
        return [self.spec.w_q, self.spec.w_o]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        fused, mask = fused_mask(self.spec, x, args, kwargs)
        if not fused or self.runs_original(x):
            return self.original(x, *args, **kwargs)
        spec = self.spec
        B, T, D = x.shape
        x_ND = x.reshape(B * T, D)
        weights_NK, ids_NK = route(F.linear(x_ND, get_attr_path(self, spec.router)), self.routing)
        q_NKF = run_projection(x_ND, None, ids_NK, spec.w_q.get(self), backend=self.backend)
        k_BTF = F.linear(x, weight_rows(self, spec.key[0], spec.key[1]))
        v_BTF = F.linear(x, weight_rows(self, spec.value[0], spec.value[1]))
        o_NKF = moa_attend(q_NKF, k_BTF, v_BTF, spec.num_heads, (spec.causal, mask, None))
        out_ND = run_projection(o_NKF, weights_NK.to(x.dtype), ids_NK, spec.w_o.get(self), backend=self.backend)
        if spec.bias is not None:
            out_ND = out_ND + get_attr_path(self, spec.bias)
        return out_ND.view(B, T, D)


__all__ = ["FusedHandwrittenMoA", "FusedMoAAttention", "HandwrittenMoASpec", "MoAAttentionSpec"]
