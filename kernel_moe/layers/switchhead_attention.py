"""FusedHandwrittenSwitchHead: the layer swapped in for a hand-written SwitchHead module
(Csordás et al. 2024: experts on the value and output projections, sigmoid top-k gates, dense
queries and keys), computed like ``SparseExpertAttention(variant="switchhead")``.

Per head j of h, with E experts per head (stacked ids j*E + e, head-major):
``v_j(s) = sum_k gs_k(s) * x_s @ w_v[j*E + es_k(s)]^T`` (sigmoid top-k of the source router on the
source token), ``o_j(t) = attn(q_j(t), k_j, v_j)`` with dense ``q``, ``k`` and the scale 1/sqrt(d),
and ``out(t) = sum_j sum_k gd_k(t) * o_j(t) @ w_o[j*E + ed_k(t)]^T (+ bias)`` (the destination
router on the destination token). The value experts run as the gather half of the experts op
(``kernel_moe::expert_projection``, one row per (head, slot)), the output experts as its combine
half; attention is ``scaled_dot_product_attention`` over all heads at once. It adopts the original's
children and Parameters (state_dict unchanged); per-expert Linear weights are re-pointed into one
stacked storage.

Legend: B batch, T sequence, N = B*T tokens, D model width, h heads, E experts per head, K top-k,
d head dim, F = h*d, S = h*K slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernel_moe.config import KernelConfig
from kernel_moe.layers.attention import attend
from kernel_moe.layers.attention_masks import describe_masks, fused_mask
from kernel_moe.layers.base import SwappedLayer
from kernel_moe.layers.spec import SwapSpec
from kernel_moe.layers.weights import WeightSource, get_attr_path, weight_rows
from kernel_moe.ops.projection import run_projection
from kernel_moe.routing.topk import TopKRouting, route


@dataclass(frozen=True)
class HandwrittenSwitchHeadSpec(SwapSpec):
    """A hand-written SwitchHead module: paths of the source and destination router weights
    [h*E, D], the query and key weights ((path, part): part 0 / 1 takes the first / second half of
    the rows of a fused weight, None the whole) [F, D], the value experts [h*E, d, D] and output
    experts [h*E, D, d] (stacked or per-expert Linears), the output bias (or None); h heads,
    causal or not, and the masks proven for the forward's mask argument."""

    source: str
    destination: str
    query: tuple[str, int | None]
    key: tuple[str, int | None]
    w_v: WeightSource
    w_o: WeightSource
    bias: str | None
    num_heads: int
    causal: bool
    num_experts: int = 1  # experts per head (after the fields without a default: SwapSpec's class defaults)
    top_k: int = 1
    training_fallback: str | None = None
    gradient_fallback: str | None = None
    mask_arg: str | None = None  # the forward's argument after x (a mask), if it has one
    masks: tuple[tuple[str, str], ...] = ()  # proven (mask kind, reading), see layers/attention_masks.py
    mask_note: str = ""  # what the report says about masks that were not proven
    quantizable = False  # the expert projections are not in the experts contract's up/down form

    def layer_class(self) -> type[nn.Module]:
        return FusedHandwrittenSwitchHead

    def describe(self) -> str:
        text = (f"SwitchHead attention: {self.num_heads} heads, sigmoid top-{self.top_k} of {self.num_experts} "
                f"value and output experts per head, {'causal' if self.causal else 'bidirectional'}")
        return "; ".join(t for t in (text, describe_masks(self.masks), self.mask_note) if t)


class FusedHandwrittenSwitchHead(SwappedLayer):
    """The swapped-in layer for a hand-written SwitchHead module (see the module docstring).
    Proven for ``forward(x)`` and ``forward(x, mask)`` with a mask of a proven kind; any other
    call runs the original module."""

    def __init__(self, original: nn.Module, spec: HandwrittenSwitchHeadSpec, config: KernelConfig | None = None):
        super().__init__(original, spec, config)
        self.num_experts, self.top_k = spec.num_experts, spec.top_k
        self.routing = TopKRouting(spec.num_experts, spec.top_k, "sigmoid")
        self._bind_weights()

    def _weight_sources(self) -> list:
        return [self.spec.w_v, self.spec.w_o]

    def _route(self, x_ND: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Router ``path`` on x [N, D] -> (sigmoid gates [N, h*K], stacked ids j*E + e [N, h*K])."""
        spec = self.spec
        N, h, E = x_ND.shape[0], spec.num_heads, spec.num_experts
        logits = F.linear(x_ND, get_attr_path(self, path)).view(N * h, E)
        weights_RK, ids_RK = route(logits, self.routing)
        heads_R1 = torch.arange(h, device=x_ND.device).repeat(N).unsqueeze(1)
        return weights_RK.reshape(N, h * spec.top_k), (ids_RK + heads_R1 * E).reshape(N, h * spec.top_k)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        fused, mask = fused_mask(self.spec, x, args, kwargs)
        if not fused or self.runs_original(x):
            return self.original(x, *args, **kwargs)
        spec = self.spec
        B, T, D = x.shape
        N, h, K = B * T, spec.num_heads, spec.top_k
        x_ND = x.reshape(N, D)
        ws_NS, ids_s_NS = self._route(x_ND, spec.source)
        v_NSd = run_projection(x_ND, None, ids_s_NS, spec.w_v.get(self), backend=self.backend)  # [N, h*K, d]
        d = v_NSd.shape[-1]
        v_Nhd = (v_NSd.view(N, h, K, d) * ws_NS.view(N, h, K, 1).to(x.dtype)).sum(2)
        q_BHTd = F.linear(x, weight_rows(self, spec.query[0], spec.query[1])).view(B, T, h, d).transpose(1, 2)
        k_BHTd = F.linear(x, weight_rows(self, spec.key[0], spec.key[1])).view(B, T, h, d).transpose(1, 2)
        o_BHTd = attend(q_BHTd, k_BHTd, v_Nhd.view(B, T, h, d).transpose(1, 2), (spec.causal, mask, None))
        wd_NS, ids_d_NS = self._route(x_ND, spec.destination)
        o_NSd = o_BHTd.transpose(1, 2).reshape(N, h, 1, d).expand(N, h, K, d).reshape(N, h * K, d)
        out_ND = run_projection(o_NSd, wd_NS.to(x.dtype), ids_d_NS, spec.w_o.get(self), backend=self.backend)
        if spec.bias is not None:
            out_ND = out_ND + get_attr_path(self, spec.bias)
        return out_ND.view(B, T, D)


__all__ = ["FusedHandwrittenSwitchHead", "HandwrittenSwitchHeadSpec"]
