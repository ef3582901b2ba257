"""``kernel_moe::fused_ffn``: the dense FFN, a deprecated alias of ``kernel_moe::fused_experts`` with
one expert and no routing (the alias has no implementation, fake or autograd of its own).

x [T, H], w_up [N, H] (N = 2*I gated, else I), w_down [H, I], optional biases [N] and [H].
Layers call :func:`kernel_moe.ops.experts.run_experts` with routing None instead.
"""

from __future__ import annotations

import math

import torch

_lib = torch.library.Library("kernel_moe", "FRAGMENT")
_lib.define(
    "fused_ffn(Tensor x, Tensor w_up, Tensor w_down, Tensor? b_up, Tensor? b_down, str activation, str glu, "
    "float alpha, float limit, str backend) -> Tensor"
)


@torch.library.impl(_lib, "fused_ffn", "CompositeImplicitAutograd")
def _fused_ffn(x, w_up, w_down, b_up, b_down, activation, glu, alpha, limit, backend):
    def one(t):
        return None if t is None else t.unsqueeze(0)

    return torch.ops.kernel_moe.fused_experts(x, None, None, one(w_up), one(w_down), one(b_up), one(b_down), None, None,
                                              None, activation, glu, alpha, limit, math.inf, math.inf, False, "full",
                                              backend)

