"""CPU benchmark of one Mixtral-style MoE layer: ours vs transformers' experts implementations
vs dense SwiGLU FFNs with the same active and the same total parameters, measured side by
side in one process.

    python benchmarks/bench_cpu_layer.py [--tokens 1 16 128 1024 4096] [--dtypes float32 bfloat16] [--json OUT]

Prints, per (dtype, T), each implementation's median time as a ratio to (c) the dense FFN
with the active parameters (intermediate k*I), ours / (a) eager, ours / (b) grouped_mm and
ours / (d) the dense FFN with the total parameters (intermediate E*I) and ours / ours with the
native CPU kernels switched off (the PyTorch path alone). Also the peak memory
of our layer at the largest T relative to inputs + outputs + one [T*k, I] intermediate.
Timings are interleaved, in a freshly shuffled order every round, so that machine noise and
the cache state one implementation leaves for the next hit every implementation alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import kernel_moe
from kernel_moe.bench.memory import measure_peak_memory
from kernel_moe.kernels.cpu import ENV as NATIVE_ENV

H, I, E, K = 512, 1024, 8, 2


class DenseSwiGLU(nn.Module):
    """Dense FFN with the MoE's active parameters: intermediate = k * I."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


def build_block(impl: str, dtype: torch.dtype):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.05)
    return block.to(dtype).eval()


class _Holder(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.mlp = block

    def forward(self, x):
        return self.mlp(x)


def without_native_kernels(fn):
    """``fn`` run with the native CPU kernels switched off: our PyTorch path alone."""
    def run():
        previous = os.environ.get(NATIVE_ENV)
        os.environ[NATIVE_ENV] = "off"
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ[NATIVE_ENV]
            else:
                os.environ[NATIVE_ENV] = previous
    return run


def time_round_robin(fns: dict, min_time: float, min_reps: int = 5, before_each=None) -> dict:
    """Median seconds per call of each fn, calls interleaved in a shuffled order each round;
    ``before_each()`` (untimed) runs before every timed call, e.g. to evict the caches."""
    for fn in fns.values():
        fn()
    samples = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    start = time.perf_counter()
    while min(len(s) for s in samples.values()) < min_reps or time.perf_counter() - start < min_time:
        rng.shuffle(order)
        for k in order:
            fn = fns[k]
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per case")
    ap.add_argument("--json", help="write the figures to this path")
    args = ap.parse_args(argv)
    rows = []
    print(f"Mixtral-style layer H={H} I={I} E={E} k={K}; CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'dtype':9} {'T':>5} | {'ours/c':>7} {'eager/c':>8} {'gmm/c':>7} | {'ours/eager':>10} {'ours/gmm':>9}"
          f" | {'ours/d':>7} {'ours/torch':>10} | {'dense ms':>9}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        eager = build_block("eager", dtype)
        gmm = build_block("grouped_mm", dtype)
        ours = _Holder(build_block("eager", dtype))
        kernel_moe.optimize(ours, kernel_moe.KernelConfig.for_moe(top_k=K))
        assert isinstance(ours.mlp, kernel_moe.FusedMoE)
        torch.manual_seed(1)
        dense = DenseSwiGLU(H, K * I).to(dtype).eval()
        dense_total = DenseSwiGLU(H, E * I).to(dtype).eval()
        for T in args.tokens:
            x = torch.randn(1, T, H, dtype=dtype)
            with torch.no_grad():
                t = time_round_robin({"ours": lambda: ours(x), "eager": lambda: eager(x),  # noqa: B023
                                      "gmm": lambda: gmm(x), "dense": lambda: dense(x),  # noqa: B023
                                      "dense_total": lambda: dense_total(x),  # noqa: B023
                                      "ours_torch": without_native_kernels(lambda: ours(x))},  # noqa: B023
                                     args.min_time)
            row = {"dtype": dtype_name, "T": T, **{f"{k}_s": v for k, v in t.items()},
                   "ours_over_dense": t["ours"] / t["dense"], "eager_over_dense": t["eager"] / t["dense"],
                   "gmm_over_dense": t["gmm"] / t["dense"], "ours_over_eager": t["ours"] / t["eager"],
                   "ours_over_gmm": t["ours"] / t["gmm"], "ours_over_dense_total": t["ours"] / t["dense_total"],
                   "ours_over_torch_path": t["ours"] / t["ours_torch"]}
            rows.append(row)
            print(f"{dtype_name:9} {T:>5} | {row['ours_over_dense']:7.2f} {row['eager_over_dense']:8.2f} "
                  f"{row['gmm_over_dense']:7.2f} | {row['ours_over_eager']:10.2f} {row['ours_over_gmm']:9.2f}"
                  f" | {row['ours_over_dense_total']:7.2f} {row['ours_over_torch_path']:10.2f}"
                  f" | {t['dense'] * 1e3:9.3f}")
        T = max(args.tokens)
        x = torch.randn(1, T, H, dtype=dtype)
        with torch.no_grad():
            mem = measure_peak_memory(lambda: ours(x), "cpu", resident_bytes=x.numel() * x.element_size())
        budget = (2 * T * H + T * K * I) * x.element_size()
        if mem.peak_bytes is not None:
            print(f"{dtype_name:9} peak memory at T={T}: {mem.peak_bytes / 2**20:.1f} MiB = "
                  f"{mem.peak_bytes / budget:.2f}x of inputs+outputs+[T*k, I] ({budget / 2**20:.1f} MiB)")
            rows.append({"dtype": dtype_name, "T": T, "peak_bytes": mem.peak_bytes, "budget_bytes": budget,
                         "peak_over_budget": mem.peak_bytes / budget})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "cpu", "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
