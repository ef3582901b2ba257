"""Expert activations in plain PyTorch: the definition every kernel and op is checked against.

An expert's up-projection produces ``N`` features per token. With ``glu="none"`` the
activation is applied to all of them (``N == I``). With a gated layout (``N == 2 * I``) the
features are split into a gate half and an up half, either as two contiguous halves
(``glu="concat"``: ``[gate | up]``) or interleaved (``glu="interleaved"``:
``g0, u0, g1, u1, ...``), and the result is ``act(gate) * up``.

``activation="gpt_oss"`` is the clamped, scaled SwiGLU of GPT-OSS:
``gate = min(gate, limit)``, ``up = clamp(up, -limit, limit)``,
``out = (up + 1) * gate * sigmoid(alpha * gate)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "gpt_oss")
GLU_LAYOUTS = ("none", "concat", "interleaved")


def check_activation(activation: str, glu: str) -> None:
    """Raise ValueError for an unknown activation or GLU layout, or an invalid pairing."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; allowed: {', '.join(ACTIVATIONS)}")
    if glu not in GLU_LAYOUTS:
        raise ValueError(f"glu={glu!r} is not supported; allowed: {', '.join(GLU_LAYOUTS)}")
    if activation == "gpt_oss" and glu == "none":
        raise ValueError("activation='gpt_oss' needs a gated layout (glu='concat' or 'interleaved'), got glu='none'")


def apply_pointwise(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The scalar activation function by name (not defined for 'gpt_oss', which is gated only)."""
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"activation={activation!r} has no pointwise form; allowed: silu, gelu, gelu_tanh, relu")


def split_gate_up(h_SN: torch.Tensor, glu: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split gated up-projection features [S, 2I] into gate [S, I] and up [S, I]."""
    if glu == "concat":
        gate, up = h_SN.chunk(2, dim=-1)
        return gate, up
    if glu == "interleaved":
        return h_SN[..., 0::2], h_SN[..., 1::2]
    raise ValueError(f"glu={glu!r} is not a gated layout; allowed: concat, interleaved")


def apply_activation(
    h_SN: torch.Tensor,
    activation: str,
    glu: str,
    alpha: float = 1.702,
    limit: float = math.inf,
) -> torch.Tensor:
    """Activation of up-projection features: [S, N] -> [S, I]."""
    if glu == "none":
        return apply_pointwise(h_SN, activation)
    gate, up = split_gate_up(h_SN, glu)
    if activation == "gpt_oss":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return apply_pointwise(gate, activation) * up


def pointwise_derivative(x: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(x) / dx, elementwise, for the scalar activations."""
    if activation == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
        return cdf + x * pdf
    if activation == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    if activation == "relu":
        return (x > 0).to(x.dtype)
    raise ValueError(f"activation={activation!r} has no pointwise form; allowed: silu, gelu, gelu_tanh, relu")


def activation_backward(
    h_SN: torch.Tensor,
    grad_SI: torch.Tensor,
    activation: str,
    glu: str,
    alpha: float = 1.702,
    limit: float = math.inf,
) -> torch.Tensor:
    """Gradient with respect to the up-projection features: ([S, N], d/d out [S, I]) -> [S, N].

    Analytic, because it runs inside custom-op kernels where autograd is not available.
    Clamp gradients follow PyTorch's convention (1 inside the closed interval, else 0).
    """
    if glu == "none":
        return grad_SI * pointwise_derivative(h_SN, activation)
    gate, up = split_gate_up(h_SN, glu)
    if activation == "gpt_oss":
        gate_c = gate.clamp(max=limit)
        up_c = up.clamp(min=-limit, max=limit)
        s = torch.sigmoid(gate_c * alpha)
        glu_val = gate_c * s
        d_glu = s + gate_c * alpha * s * (1 - s)
        d_gate = grad_SI * (up_c + 1) * d_glu * (gate <= limit).to(h_SN.dtype)
        d_up = grad_SI * glu_val * ((up >= -limit) & (up <= limit)).to(h_SN.dtype)
    else:
        d_gate = grad_SI * up * pointwise_derivative(gate, activation)
        d_up = grad_SI * apply_pointwise(gate, activation)
    if glu == "concat":
        return torch.cat([d_gate, d_up], dim=-1)
    return torch.stack([d_gate, d_up], dim=-1).flatten(-2)
