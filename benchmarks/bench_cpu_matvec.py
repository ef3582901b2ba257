"""CPU benchmark of the native grouped matrix-vector kernel against PyTorch's GEMMs.

    python benchmarks/bench_cpu_matvec.py [--min-time 1.0]

For the Mixtral-style layer's two projections (up [2I, H] = [2048, 512], down [H, I] =
[512, 1024], 8 experts) and a few rows per expert, prints the time of one GEMM per expert
(``torch.mm``, what the PyTorch path runs) divided by the time of one ``grouped_matvec`` call,
with the weights cold (a 64 MiB buffer is rewritten before every call, as other layers would
evict them in a model) and warm. Calls are interleaved in a shuffled order; medians
(``bench_cpu_layer.time_round_robin``).
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_cpu_layer import time_round_robin

from kernel_moe.kernels.cpu import cpu_extension

E = 8
SHAPES = {"up": (2048, 512), "down": (512, 1024)}
ROWS = {"decode (2 experts x 1 row)": [1, 0, 0, 0, 0, 1, 0, 0], "2 rows x 8": [2] * E, "4 rows x 8": [4] * E,
        "8 rows x 8": [8] * E}


def _mm_per_expert(x_SK: torch.Tensor, w_ENK: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append(torch.mm(x_SK[start : start + n], w_ENK[e].t()))
        start += n
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per case")
    args = ap.parse_args(argv)
    ext = cpu_extension()
    if ext is None:
        print("native CPU extension unavailable (see python -m kernel_moe env)")
        return 1
    flush = torch.empty(16 * 1024 * 1024)  # 64 MiB rewritten before each cold call
    print(f"grouped_matvec vs torch.mm per expert; CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'dtype':9} {'proj':5} {'rows':28} | {'mm/native cold':>14} {'mm/native warm':>14} | {'native GB/s cold':>16}")
    for dtype in (torch.float32, torch.bfloat16):
        for proj, (N, K) in SHAPES.items():
            w_ENK = torch.randn(E, N, K).to(dtype)
            for name, counts in ROWS.items():
                x_SK = torch.randn(sum(counts), K)
                x_low = x_SK.to(dtype)
                fns = {"mm": lambda: _mm_per_expert(x_low, w_ENK, counts),  # noqa: B023
                       "native": lambda: ext.grouped_matvec(x_SK, w_ENK, counts)}  # noqa: B023
                cold = time_round_robin(fns, args.min_time, before_each=lambda: flush.add_(1.0))
                warm = time_round_robin(fns, args.min_time)
                gbs = sum(1 for n in counts if n) * N * K * w_ENK.element_size() / cold["native"] / 1e9
                print(f"{str(dtype)[6:]:9} {proj:5} {name:28} | {cold['mm'] / cold['native']:14.2f} "
                      f"{warm['mm'] / warm['native']:14.2f} | {gbs:16.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
