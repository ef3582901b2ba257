"""Weight tiles of the Triton kernels in every weight format of the experts contract: full
precision loaded as is, quantized weights (int8, fp8 e4m3, int4 two per byte; see
:mod:`kernel_moe.kernels.quantization`) dequantized in registers inside the K-loop, so that no
full-precision copy of the weights is ever made and the bytes read are the quantized ones.

A kernel describes a tile by the storage coordinates of its elements: ``r`` the weight row
(output feature) and ``k`` the input feature (the axis the format packs and groups along, unit
stride). A scale tensor is [E, R] (one per row: its group stride is 0) or [E, R, G] (groups of
``group`` input features); the dequantized value is ``q * scale[r, k // group]`` in fp32, then
cast to the GEMM's operand dtype (the activations' dtype) by :func:`~.common.mma`.

fp8 bytes are decoded from their bits (sign, 4-bit exponent with bias 7, 3-bit mantissa; the
subnormals too) rather than through a float8 pointer type, so the same code runs under the
interpreter and on GPUs without native fp8.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernel_moe.kernels.contract import StackedExperts

FORMAT_CODES = {"full": 0, "int8": 1, "fp8": 2, "int4": 3}


@triton.jit
def fp8_e4m3_to_f32(b):
    """fp32 values of e4m3fn bytes (an integer tile of the raw bits)."""
    bits = b.to(tl.int32) & 0xFF
    e = (bits >> 3) & 15
    m = bits & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # exponent bias 7 -> 127
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2^-9
    return tl.where(bits >= 128, -v, v)


@triton.jit
def dequantized(w_ptr, s_ptr, r, k, mask, stride_wr, stride_sr, stride_sg, group, FORMAT: tl.constexpr):
    """fp32 W[r, k] of one expert's quantized weight (``w_ptr``, ``s_ptr`` at that expert; ``r``
    and ``k`` broadcastable integer tiles; 0 where not ``mask``)."""
    if FORMAT == 3:
        b = tl.load(w_ptr + r * stride_wr + k // 2, mask=mask, other=0).to(tl.int32)
        v = (tl.where(k % 2 == 0, b & 15, (b >> 4) & 15) - 8).to(tl.float32)
    elif FORMAT == 2:
        v = fp8_e4m3_to_f32(tl.load(w_ptr + r * stride_wr + k, mask=mask, other=0))
    else:
        v = tl.load(w_ptr + r * stride_wr + k, mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + r * stride_sr + (k // group) * stride_sg, mask=mask, other=0.0)
    return v * s


@triton.jit
def weight_tile(ptrs, w_ptr, s_ptr, r, k, mask, stride_wr, stride_sr, stride_sg, group, FORMAT: tl.constexpr):
    """A weight tile: loaded through ``ptrs`` as stored (FORMAT 0, full precision), else
    :func:`dequantized` from its storage coordinates (``ptrs`` unused)."""
    if FORMAT == 0:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return dequantized(w_ptr, s_ptr, r, k, mask, stride_wr, stride_sr, stride_sg, group, FORMAT)


class WeightOperand(NamedTuple):
    """One stacked weight as a launch passes it: the tensor the kernel reads (full weights as
    given, any strides; quantized bytes, fp8 as uint8), its scale (the weight itself, never read,
    when full) with strides (expert, row, group; group 0 for one scale per row), the group size,
    the format's code (the kernel's W_FORMAT), the logical shape [E, rows, input features] of the
    stored weight, and whether a GEMM reads it transposed (:meth:`t`)."""

    data: torch.Tensor
    scale: torch.Tensor
    stride_se: int
    stride_sr: int
    stride_sg: int
    group: int
    code: int
    shape: tuple[int, int, int]
    transposed: bool = False

    def t(self) -> WeightOperand:
        """The same weight read as its transpose [E, input features, rows]."""
        return self._replace(transposed=not self.transposed)

    def scale_args(self) -> tuple:
        """The scale's launch arguments in the kernels' order: pointer, strides, group."""
        return self.scale, self.stride_se, self.stride_sr, self.stride_sg, self.group


def weight_operand(w: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> WeightOperand:
    """The operand of a stacked weight [E, R, K] of format ``fmt`` (int4: [E, R, K / 2] bytes)."""
    code = FORMAT_CODES[fmt]
    E, R, stored = w.shape
    K = stored * 2 if fmt == "int4" else stored
    if code == 0:
        return WeightOperand(w, w, 0, 0, 0, 1, 0, (E, R, K))
    data = w.view(torch.uint8) if fmt == "fp8" else w
    grouped = scale.dim() == 3
    group = K // scale.shape[2] if grouped else 1
    return WeightOperand(data, scale, scale.stride(0), scale.stride(1), scale.stride(2) if grouped else 0, group, code,
                         (E, R, K))


def up_operand(experts: StackedExperts) -> WeightOperand:
    """w_up [E, N, H] of a call."""
    return weight_operand(experts.w_up, experts.w_up_scale, experts.weight_format)


def down_operand(experts: StackedExperts) -> WeightOperand:
    """w_down [E, H, I] of a call."""
    return weight_operand(experts.w_down, experts.w_down_scale, experts.weight_format)


__all__ = ["FORMAT_CODES", "WeightOperand", "dequantized", "down_operand", "fp8_e4m3_to_f32", "up_operand",
           "weight_operand", "weight_tile"]
