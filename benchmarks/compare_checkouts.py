"""Before/after of a change on the CPU layer benchmark's shapes: two checkouts timed side by side.

    python benchmarks/compare_checkouts.py BEFORE_DIR AFTER_DIR [--pairs 15] [--window 0.3]
        [--restarts 4] [--tokens 1 16 128 1024 4096] [--dtypes float32 bfloat16] [--threads N]

Starts one worker process per checkout (each imports its own ``kernel_moe`` and builds the
optimized Mixtral-style layer of ``benchmarks/bench_cpu_layer.py``: H 512, I 1024, E 8, top-2),
then times the cases in short windows, alternating between the two workers (before, after,
after, before, ...), so that both see the same machine load; ``--restarts`` times over with fresh
workers, because one process's placement of the weights in memory alone moves a decode call by
10-40% (the same binary, measured). Prints per (dtype, T) the median over all adjacent window
pairs of after / before (per-call median time in each window), and the largest. A ratio above 1 means the after checkout is slower. Both checkouts must build their
native CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, statistics, sys, time
import torch
import kernel_moe
sys.path.insert(0, "benchmarks")
from bench_cpu_layer import K, H, _Holder, build_block

threads, tokens, dtypes = json.loads(sys.argv[1])
torch.set_num_threads(threads)
cases = []
for name in dtypes:
    dtype = getattr(torch, name)
    layer = _Holder(build_block("eager", dtype))
    kernel_moe.optimize(layer, kernel_moe.KernelConfig.for_moe(top_k=K))
    assert isinstance(layer.mlp, kernel_moe.FusedMoE)
    for T in tokens:
        x = torch.randn(1, T, H, dtype=dtype)
        with torch.no_grad():
            layer(x)
        cases.append((layer, x))
print("ready", flush=True)
for line in sys.stdin:
    index, window = json.loads(line)
    layer, x = cases[index]
    samples, start = [], time.perf_counter()
    with torch.no_grad():
        while len(samples) < 3 or time.perf_counter() - start < window:
            t0 = time.perf_counter()
            layer(x)
            samples.append(time.perf_counter() - t0)
    print(json.dumps(statistics.median(samples)), flush=True)
"""


class Worker:
    """A process running WORKER against one checkout; ``time(case, window)`` asks it to time."""

    def __init__(self, checkout: Path, config: list) -> None:
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(config)], cwd=checkout, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the worker of {checkout} did not start")

    def time(self, case: int, window: float) -> float:
        self.proc.stdin.write(json.dumps([case, window]) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--pairs", type=int, default=15, help="alternating window pairs per case")
    ap.add_argument("--window", type=float, default=0.3, help="seconds of one timing window")
    ap.add_argument("--restarts", type=int, default=4, help="fresh worker pairs")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    config = [args.threads, args.tokens, args.dtypes]
    labels = [(d, T) for d in args.dtypes for T in args.tokens]
    ratios: list[list[float]] = [[] for _ in labels]
    for _ in range(args.restarts):
        before, after = Worker(args.before.resolve(), config), Worker(args.after.resolve(), config)
        try:
            for p in range(args.pairs):
                for i in range(len(labels)):
                    first, second = (before, after) if (p + i) % 2 == 0 else (after, before)
                    t_first, t_second = first.time(i, args.window), second.time(i, args.window)
                    t_before, t_after = (t_first, t_second) if first is before else (t_second, t_first)
                    ratios[i].append(t_after / t_before)
        finally:
            before.close()
            after.close()
    print(f"after / before, median of {args.restarts} x {args.pairs} alternating window pairs, {args.threads} threads "
          f"({args.before} -> {args.after})")
    print(f"{'dtype':9} {'T':>5} | {'after/before':>12} {'quartiles':>15}")
    medians = []
    for (dtype, T), r in zip(labels, ratios):
        q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
        medians.append(statistics.median(r))
        print(f"{dtype:9} {T:>5} | {medians[-1]:12.3f} {q[0]:7.3f}-{q[2]:.3f}")
    print(f"largest after/before: {max(medians):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
