"""Expert activations in PyTorch, forward and analytic backward.

What the CPU backend computes between the projections, and what adapters evaluate to identify a
module's activation. The backward is analytic because it runs inside custom-op kernels, where
autograd is not recording. (The tests' truth, ``kernel_moe.reference.activations``, is written
independently from the formulas.)

Legend: S rows, N up features (2*I gated, else I), I intermediate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernel_moe.kernels.contract import Activation

POINTWISE_KINDS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")


def pointwise(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The scalar activation ``kind`` elementwise (not defined for gpt_oss, which is gated only)."""
    if kind == "silu":
        return F.silu(x)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "relu":
        return F.relu(x)
    if kind == "relu2":
        return F.relu(x).square()
    raise ValueError(f"activation {kind!r} has no pointwise form; allowed: {', '.join(POINTWISE_KINDS)}")


def pointwise_derivative(x: torch.Tensor, kind: str) -> torch.Tensor:
    """d act(x) / dx elementwise, for the scalar activations."""
    if kind == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if kind == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
        return cdf + x * pdf
    if kind == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    if kind == "relu":
        return (x > 0).to(x.dtype)
    if kind == "relu2":
        return 2 * F.relu(x)
    raise ValueError(f"activation {kind!r} has no pointwise form; allowed: {', '.join(POINTWISE_KINDS)}")


def split_gate_up(h_SN: torch.Tensor, glu: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated features [S, 2I] -> gate [S, I], up [S, I] (views)."""
    if glu == "concat":
        gate, up = h_SN.chunk(2, dim=-1)
        return gate, up
    if glu == "interleaved":
        return h_SN[..., 0::2], h_SN[..., 1::2]
    raise ValueError(f"glu={glu!r} is not a gated layout; allowed: concat, interleaved")


def _softcap(v: torch.Tensor, cap: float) -> torch.Tensor:
    return v if cap == math.inf else torch.tanh(v / cap) * cap


def _softcap_derivative(v: torch.Tensor, cap: float) -> torch.Tensor:
    if cap == math.inf:
        return torch.ones_like(v)
    t = torch.tanh(v / cap)
    return 1 - t * t


def _clamped(h_SN: torch.Tensor, act: Activation) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up halves with the activation's clamp applied (views when there is none)."""
    gate, up = split_gate_up(h_SN, act.glu)
    if act.limit != math.inf:
        gate = gate.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
    return gate, up


def apply_activation(h_SN: torch.Tensor, act: Activation) -> torch.Tensor:
    """Up-projection features [S, N] -> activations [S, I]."""
    if not act.gated:
        return pointwise(h_SN, act.kind)
    gate, up = _clamped(h_SN, act)
    if act.kind == "gpt_oss":
        return (up + 1) * (gate * torch.sigmoid(gate * act.alpha))
    if act.softcapped:
        return _softcap(gate, act.gate_softcap) * torch.sigmoid(gate) * _softcap(up, act.up_softcap)
    return pointwise(gate, act.kind) * up


def activation_backward(h_SN: torch.Tensor, grad_SI: torch.Tensor, act: Activation) -> torch.Tensor:
    """Gradient with respect to the up-projection features: ([S, N], d/d out [S, I]) -> [S, N].
    Clamp gradients follow PyTorch's convention (1 inside the closed interval, else 0)."""
    if not act.gated:
        return grad_SI * pointwise_derivative(h_SN, act.kind)
    gate, up = _clamped(h_SN, act)
    if act.kind == "gpt_oss":
        s = torch.sigmoid(gate * act.alpha)
        d_gate = grad_SI * (up + 1) * (s + gate * act.alpha * s * (1 - s))
        d_up = grad_SI * gate * s
    elif act.softcapped:
        s = torch.sigmoid(gate)
        cap_g, cap_u = _softcap(gate, act.gate_softcap), _softcap(up, act.up_softcap)
        d_gate = grad_SI * cap_u * (_softcap_derivative(gate, act.gate_softcap) * s + cap_g * s * (1 - s))
        d_up = grad_SI * cap_g * s * _softcap_derivative(up, act.up_softcap)
    else:
        d_gate = grad_SI * up * pointwise_derivative(gate, act.kind)
        d_up = grad_SI * pointwise(gate, act.kind)
    if act.limit != math.inf:
        raw_gate, raw_up = split_gate_up(h_SN, act.glu)
        d_gate = d_gate * (raw_gate <= act.limit).to(h_SN.dtype)
        d_up = d_up * ((raw_up >= -act.limit) & (raw_up <= act.limit)).to(h_SN.dtype)
    if act.glu == "concat":
        return torch.cat([d_gate, d_up], dim=-1)
    return torch.stack([d_gate, d_up], dim=-1).flatten(-2)


__all__ = ["POINTWISE_KINDS", "activation_backward", "apply_activation", "pointwise", "pointwise_derivative",
           "split_gate_up"]
