"""FusedFFN: a dense FFN (Linear -> act -> Linear, or SwiGLU gate/up/down) as one custom op.

Gate and up Linear weights are re-pointed into one stacked storage, so the up-projection is
a single GEMM; on CUDA the activation runs in the GEMM epilogue.
"""

from __future__ import annotations

import torch

from kernel_moe.config import KernelConfig
from kernel_moe.layers.base import SwappedLayer
from kernel_moe.layers.spec import FFNSpec
from kernel_moe.ops.ffn import call_fused_ffn


class FusedFFN(SwappedLayer):
    """Dense FFN layer; its weight sources hold one "expert" ([1, N, H]), indexed [0]."""

    def __init__(self, original, spec: FFNSpec, config: KernelConfig | None = None) -> None:
        super().__init__(original, spec, config)
        self.num_experts = 1
        self.top_k = 1
        self._bind_weights()

    def _weight_sources(self) -> list:
        s = self.spec
        return [w for w in (s.up, s.down, s.up_bias, s.down_bias) if w is not None]

    def forward(self, hidden_states: torch.Tensor):
        s = self.spec
        if self.runs_original(hidden_states):
            return self.original(hidden_states)
        x_TH = hidden_states.reshape(-1, s.hidden)
        out_TH = call_fused_ffn(
            x_TH, s.up.get(self)[0], s.down.get(self)[0],
            s.up_bias.get(self)[0] if s.up_bias is not None else None,
            s.down_bias.get(self)[0] if s.down_bias is not None else None,
            s.activation, s.glu, s.alpha, s.limit, self.backend,
        )
        return out_TH.reshape(hidden_states.shape)
