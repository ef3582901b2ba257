"""CPU benchmark behind the experts op's choice between its two native kernels for small batches.

    python benchmarks/bench_cpu_path_choice.py [--cases 24] [--min-time 0.6]

For the Mixtral-style layer's experts (H 512, I 1024, E 8, k 2) and routings from uniform to
skewed (random logits plus a random per-expert bias of growing size) at T from 6 to 24, prints
the time of the fused forward divided by the time of the grouped matrix-vector path, each
forced through ``kernel_moe.kernels.cpu.forward.NATIVE_MAX_MEAN_ROWS``, with the mean and the largest number of
rows per active expert. The op takes the matrix-vector path up to a mean of
``NATIVE_MAX_MEAN_ROWS[dtype]`` rows; this shows where the crossover lies and that it follows
the mean rather than the busiest expert. Calls are interleaved in a shuffled order; medians.
"""

from __future__ import annotations

import argparse
import math
import random

import torch
from bench_cpu_layer import E, H, I, K, time_round_robin

from kernel_moe.kernels.cpu import cpu_extension
from kernel_moe.kernels.contract import StackedExperts
from kernel_moe.kernels.cpu import forward as cpu_forward


def _forced(path: str, run):
    """``run`` with the op's matrix-vector threshold set so that ``path`` is taken."""
    threshold = 0 if path == "fused" else 10**9

    def call():
        saved = dict(cpu_forward.NATIVE_MAX_MEAN_ROWS)
        cpu_forward.NATIVE_MAX_MEAN_ROWS.update(dict.fromkeys(saved, threshold))
        try:
            return run()
        finally:
            cpu_forward.NATIVE_MAX_MEAN_ROWS.update(saved)
    return call


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=24, help="routings per dtype")
    ap.add_argument("--min-time", type=float, default=0.6, help="seconds of timing per case")
    args = ap.parse_args(argv)
    if cpu_extension() is None:
        print("native CPU extension unavailable (see python -m kernel_moe env)")
        return 1
    print(f"fused forward / grouped matrix-vector path; experts H={H} I={I} E={E} k={K}, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'dtype':9} {'T':>3} {'mean':>5} {'max':>4} {'active':>6}  {'rows per active expert':<32} fused/matvec")
    rng = random.Random(0)
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        w_up_ENH = (torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)).to(dtype)
        w_down_EHI = (torch.randn(E, H, I, generator=g) / math.sqrt(I)).to(dtype)
        experts = StackedExperts(w_up_ENH, w_down_EHI)
        rows = []
        for _ in range(args.cases):
            T, skew = rng.choice([6, 8, 12, 16, 20, 24]), rng.choice([0.5, 1.0, 2.0, 3.0, 4.0])
            x_TH = torch.randn(T, H, generator=g).to(dtype)
            logits_TE = torch.randn(T, E, generator=g) + skew * 3 * torch.rand(E, generator=g)
            weights_TK, ids_TK = torch.softmax(logits_TE, dim=-1).topk(K, dim=-1)
            counts = sorted((n for n in torch.bincount(ids_TK.reshape(-1), minlength=E).tolist() if n), reverse=True)

            def run(x_TH=x_TH, weights_TK=weights_TK, ids_TK=ids_TK):
                return cpu_forward.experts_forward(x_TH, weights_TK, ids_TK, experts)
            with torch.no_grad():
                t = time_round_robin({"fused": _forced("fused", run), "matvec": _forced("matvec", run)}, args.min_time)
            rows.append((T * K / len(counts), T, counts, t["fused"] / t["matvec"]))
        for mean, T, counts, ratio in sorted(rows):
            print(f"{str(dtype).removeprefix('torch.'):9} {T:3} {mean:5.1f} {counts[0]:4} {len(counts):6}  "
                  f"{str(counts):<32} {ratio:12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
