"""FusedFFN: a dense FFN (Linear -> act -> Linear, or SwiGLU gate/up/down) as one custom op.

Gate and up Linear weights are re-pointed into one stacked storage, so the up-projection is
a single GEMM; on CUDA the activation runs in the GEMM epilogue.
"""

from __future__ import annotations

import torch

from kernel_moe.config import KernelConfig
from kernel_moe.layers.base import SwappedLayer
from kernel_moe.layers.experts import run_experts
from kernel_moe.layers.spec import FFNSpec


class FusedFFN(SwappedLayer):
    """Dense FFN layer: the experts op with one expert ([1, N, H] weight sources) and no routing."""

    def __init__(self, original, spec: FFNSpec, config: KernelConfig | None = None) -> None:
        super().__init__(original, spec, config)
        self.num_experts = 1
        self.top_k = 1
        self._bind_weights()

    def _weight_sources(self) -> list:
        return self.spec.experts.sources()

    def forward(self, hidden_states: torch.Tensor):
        if self.runs_original(hidden_states):
            return self.original(hidden_states)
        x_TH = hidden_states.reshape(-1, self.spec.hidden)
        out_TH = run_experts(self, self.spec.experts, x_TH, None, None, self.backend)
        return out_TH.reshape(hidden_states.shape)
