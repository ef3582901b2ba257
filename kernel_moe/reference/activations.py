"""Expert activations written from their formulas: the tests' truth (production code computes
them in ``kernel_moe.kernels.activations`` and in the kernels; nothing here is on a hot path).

An expert's up-projection produces ``N`` features per token. With ``glu="none"`` the
activation applies to all of them (``N == I``). With a gated layout (``N == 2 * I``) the
features split into a gate half and an up half, as two contiguous halves (``glu="concat"``:
``[gate | up]``) or interleaved (``glu="interleaved"``: ``g0, u0, g1, u1, ...``), and the
result is ``act(gate) * up``.

``activation="gpt_oss"`` is the clamped, scaled SwiGLU of GPT-OSS:
``gate = min(gate, limit)``, ``up = clamp(up, -limit, limit)``,
``out = (up + 1) * gate * sigmoid(alpha * gate)``.
"""

from __future__ import annotations

import math

import torch


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


def _scalar(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return x * _sigmoid(x)
    if activation == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if activation == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if activation == "relu":
        return torch.where(x > 0, x, x * 0)  # x * 0 keeps NaN
    if activation == "relu2":
        return torch.where(x > 0, x * x, x * 0)
    raise ValueError(f"activation={activation!r} has no scalar form in the reference")


def apply_activation(
    h_SN: torch.Tensor,
    activation: str,
    glu: str,
    alpha: float = 1.702,
    limit: float = math.inf,
    softcaps: tuple[float, float] = (math.inf, math.inf),
) -> torch.Tensor:
    """Activation of up-projection features: [S, N] -> [S, I]. With a gated layout, ``limit``
    clamps gate (above) and up (both sides) first; ``softcaps`` = (gate cap, up cap) of the
    softcapped SwiGLU ``cap(gate) * sigmoid(gate) * cap(up)``, ``cap(v) = c * tanh(v / c)``."""
    if glu == "none":
        return _scalar(h_SN, activation)
    I = h_SN.shape[-1] // 2
    if glu == "concat":
        gate, up = h_SN[..., :I], h_SN[..., I:]
    elif glu == "interleaved":
        gate, up = h_SN[..., 0::2], h_SN[..., 1::2]
    else:
        raise ValueError(f"glu={glu!r} is not a layout of the reference")
    gate = torch.minimum(gate, torch.full_like(gate, limit))
    up = torch.maximum(torch.minimum(up, torch.full_like(up, limit)), torch.full_like(up, -limit))
    if activation == "gpt_oss":
        return (up + 1) * gate * _sigmoid(alpha * gate)
    gate_cap, up_cap = softcaps
    if gate_cap != math.inf or up_cap != math.inf:
        def cap(v: torch.Tensor, c: float) -> torch.Tensor:
            return v if c == math.inf else c * torch.tanh(v / c)

        return cap(gate, gate_cap) * _sigmoid(gate) * cap(up, up_cap)
    return _scalar(gate, activation) * up
