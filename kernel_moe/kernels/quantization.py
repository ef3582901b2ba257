"""Weight-only quantized expert weights: the formats the experts contract knows, how full-precision
weights become them, and how a backend's PyTorch path reads one expert back.

Legend: E experts, N output features (rows), K input features (the reduction), G = K / group.

| format | stored weight                   | scale (fp32)                    | value                        |
| ------ | ------------------------------- | ------------------------------- | ---------------------------- |
| int8   | int8 [E, N, K]                  | [E, N] per row, or [E, N, G]    | q * scale                    |
| fp8    | float8_e4m3fn [E, N, K]         | [E, N] per row, or [E, N, G]    | float(q) * scale             |
| int4   | uint8 [E, N, K/2], two per byte | [E, N, G]                       | (nibble - 8) * scale         |

Symmetric everywhere (no zero points): on weights centred at zero, zero points bought nothing
measurable and cost a second tensor and an add per element in every kernel. int4 keeps element
``2j`` in the low nibble and ``2j + 1`` in the high one. A scale is chosen among a few clipping
ratios of its row's (or group's) absolute maximum by the least squared error (int4 groups of
normal weights lose about 1 dB less than with the plain maximum; int8 and fp8 rows, nothing).
Activations are never quantized: the kernels convert weights in registers (or, in PyTorch paths,
one expert at a time) and multiply in the model's dtype with fp32 accumulation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kernel_moe.config import INT4_GROUP_SIZES, QUANTIZED_FORMATS

FP8_MAX = 448.0
_CLIPS = {"int8": (1.0, 0.98, 0.96), "fp8": (1.0,), "int4": (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)}


class QuantizedTensor(NamedTuple):
    """A stack of quantized weight matrices: ``data`` and ``scale`` as the table above."""

    data: Tensor
    scale: Tensor
    format: str

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def check_format(fmt: str, group_size: int | None = None) -> None:
    """Raise ValueError for an unknown format or a group size it does not take (int4 needs one of
    :data:`INT4_GROUP_SIZES`; int8 and fp8 take None, per row, or one of those)."""
    if fmt not in QUANTIZED_FORMATS:
        raise ValueError(f"weight format {fmt!r} is not a quantized format; allowed: {', '.join(QUANTIZED_FORMATS)}")
    allowed = INT4_GROUP_SIZES if fmt == "int4" else (None, *INT4_GROUP_SIZES)
    if group_size not in allowed:
        raise ValueError(f"{fmt} group_size={group_size!r}; allowed: {', '.join(map(str, allowed))}")


def quantize(w: Tensor, fmt: str, group_size: int | None = None) -> QuantizedTensor:
    """Quantize weights [..., N, K] (any float dtype, any strides) to ``fmt`` with one scale per row
    (``group_size`` None; int8 and fp8) or per ``group_size`` consecutive input features (int4 always:
    default 128); the result is contiguous with K innermost. K must be a multiple of the group."""
    if fmt == "int4" and group_size is None:
        group_size = 128
    check_format(fmt, group_size)
    w32 = w.detach().float()
    *lead, N, K = w32.shape
    group = group_size or K
    if K % group != 0:
        raise ValueError(f"{fmt} needs the input features K={K} to be a multiple of group_size={group}")
    g = w32.reshape(*lead, N, K // group, group)
    amax = g.abs().amax(dim=-1)
    top = {"int8": 127.0, "fp8": FP8_MAX, "int4": 7.0}[fmt]
    best_err = best_scale = None
    for clip in _CLIPS[fmt]:
        scale = torch.where(amax > 0, amax * clip / top, torch.ones_like(amax))
        err = (_round(g / scale.unsqueeze(-1), fmt) * scale.unsqueeze(-1) - g).square().sum(dim=-1)
        better = None if best_err is None else err < best_err
        best_err = err if better is None else torch.where(better, err, best_err)
        best_scale = scale if better is None else torch.where(better, scale, best_scale)
    q = _round(g / best_scale.unsqueeze(-1), fmt).reshape(*lead, N, K)
    scale = best_scale if group_size is not None else best_scale.squeeze(-1)
    if fmt == "int4":
        q = (q + 8).to(torch.uint8)
        data = q[..., 0::2] | (q[..., 1::2] << 4)
    else:
        data = q.to(torch.int8 if fmt == "int8" else torch.float8_e4m3fn)
    return QuantizedTensor(data.contiguous(), scale.contiguous(), fmt)


def _round(v: Tensor, fmt: str) -> Tensor:
    """Values on the format's grid, still as fp32."""
    if fmt == "int8":
        return torch.round(v).clamp_(-127, 127)
    if fmt == "int4":
        return torch.round(v).clamp_(-8, 7)
    return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def dequantize(data: Tensor, scale: Tensor, fmt: str) -> Tensor:
    """The fp32 weights [..., N, K] a quantized stack stands for (a PyTorch path's one expert, a
    test's reference); ``scale`` per row [..., N] or per group [..., N, G]."""
    if fmt == "int4":
        low = (data & 0xF).to(torch.int16) - 8
        high = (data >> 4).to(torch.int16) - 8
        q = torch.stack([low, high], dim=-1).flatten(-2).float()
    else:
        q = data.float()
    if scale.dim() == q.dim() - 1:  # one scale per row
        return q * scale.unsqueeze(-1)
    G = scale.shape[-1]
    return (q.unflatten(-1, (G, q.shape[-1] // G)) * scale.unsqueeze(-1)).flatten(-2)


def input_features(data: Tensor, fmt: str) -> int:
    """K of a stored quantized weight (int4 holds two per byte)."""
    return data.shape[-1] * 2 if fmt == "int4" else data.shape[-1]


__all__ = ["FP8_MAX", "INT4_GROUP_SIZES", "QUANTIZED_FORMATS", "QuantizedTensor", "check_format", "dequantize",
           "input_features", "quantize"]
