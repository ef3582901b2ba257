"""Accuracy of quantized experts on random normal weights: output SQNR of one projection and of a
whole SwiGLU experts layer, per format, next to what an ideal 4-bit scalar quantizer gives.

    python benchmarks/bench_quantized_accuracy.py [--hidden 512] [--intermediate 256] [--experts 8]
        [--tokens 64] [--seed 0]

Weights ``randn / sqrt(fan_in)``, inputs ``randn``, top-2 of softmax routing weights (the layer of
``tests/ops/test_quantized_experts.py``'s accuracy floors). SQNR = 10 log10(|ref|^2 / |out - ref|^2)
against the full-precision result. "projection" is x @ W_up[0]^T alone; "layer" is the experts
layer's output, where the gate's and the up projection's errors multiply and the down projection
adds its own.

The last row quantizes every group of 128 weights to the 16 Lloyd-Max levels of a Gaussian
(the 4-bit scalar quantizer of least squared error on normal weights, levels fitted by Lloyd's
iteration on 2M samples) with the group's exact standard deviation as its scale: no 4-bit scalar
format with one scale per group of 128 does better on these weights, so its layer SQNR bounds
what int4 (group 128) can reach.
"""

from __future__ import annotations

import argparse
import math

import torch

from kernel_moe.kernels.quantization import dequantize, quantize
from kernel_moe.reference.moe import naive_moe_experts

FORMATS = [("int8", None), ("int8", 128), ("fp8", None), ("int4", 128), ("int4", 32)]


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    return 10 * math.log10(ref.double().pow(2).sum().item() / (out - ref).double().pow(2).sum().item())


def lloyd_max_levels(levels: int = 16, samples: int = 2_000_000, iterations: int = 100) -> torch.Tensor:
    """The ``levels`` reconstruction points of least squared error for a unit Gaussian (Lloyd's
    iteration: each point moves to the mean of the samples nearest to it)."""
    g = torch.randn(samples, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    points = torch.linspace(-2.7, 2.7, levels, dtype=torch.float64)
    for _ in range(iterations):
        cell = torch.bucketize(g, (points[1:] + points[:-1]) / 2)
        points = torch.bincount(cell, weights=g, minlength=levels) / torch.bincount(cell, minlength=levels)
    return points


def lloyd_max_groups(w: torch.Tensor, points: torch.Tensor, group: int) -> torch.Tensor:
    """w [..., K] with every group of ``group`` weights on the Lloyd-Max points times the group's std."""
    g = w.double().reshape(*w.shape[:-1], -1, group)
    std = g.pow(2).mean(-1, keepdim=True).sqrt()
    cell = torch.bucketize(g / std, (points[1:] + points[:-1]) / 2)
    return (points[cell] * std).reshape(w.shape).float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    E, h, i, T = args.experts, args.hidden, args.intermediate, args.tokens
    w_up, w_down = torch.randn(E, 2 * i, h) / math.sqrt(h), torch.randn(E, h, i) / math.sqrt(i)
    x = torch.randn(T, h)
    weights, ids = torch.softmax(torch.randn(T, E), dim=-1).topk(2, dim=-1)
    full = naive_moe_experts(x, weights, ids, w_up, w_down)
    print(f"random normal SwiGLU experts layer: H {h}, I {i}, E {E}, top-2, {T} tokens; SQNR against full precision")
    print(f"{'format':28} | {'projection dB':>13} {'layer dB':>9}")
    for fmt, group in FORMATS:
        up, down = quantize(w_up, fmt, group), quantize(w_down, fmt, group)
        du, dd = dequantize(up.data, up.scale, fmt), dequantize(down.data, down.scale, fmt)
        name = f"{fmt}, " + (f"groups of {group}" if group else "row scales")
        print(f"{name:28} | {sqnr_db(x @ du[0].T, x @ w_up[0].T):13.1f} "
              f"{sqnr_db(naive_moe_experts(x, weights, ids, du, dd), full):9.1f}")
    points = lloyd_max_levels()
    du, dd = lloyd_max_groups(w_up, points, 128), lloyd_max_groups(w_down, points, 128)
    print(f"{'4-bit Lloyd-Max, groups 128':28} | {sqnr_db(x @ du[0].T, x @ w_up[0].T):13.1f} "
          f"{sqnr_db(naive_moe_experts(x, weights, ids, du, dd), full):9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
