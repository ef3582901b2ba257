"""CPU benchmark of behaviour under contention: our experts op against a dense FFN of the same
active parameters, on a quiet machine and beside one competing CPU-bound process, in one run.

    python benchmarks/bench_cpu_contention.py [--tokens 1 128 1024] [--threads 2] [--rounds 30]

Layer: H 512, I 1024, E 8, top-2, fp32 (the CPU table of docs/performance.md); the dense FFN is
one SwiGLU MLP of intermediate size 2 * I (the active parameters of a top-2 token). For each T
the two are timed in alternating rounds (median), first quiet, then with a competitor (a Python
busy loop in another process, started before and stopped after the loaded rounds). Prints each
median, ours / dense, and the loaded ratio over the quiet one: 1.0 means ours degrades exactly
like the dense layer.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import time

import torch
import torch.nn.functional as F

from kernel_moe.kernels.contract import StackedExperts
from kernel_moe.ops.experts import run_experts

H, I, E, K = 512, 1024, 8, 2


def _spin(stop) -> None:
    """A CPU-bound competitor: a busy loop until ``stop`` is set."""
    x = 0
    while not stop.is_set():
        for _ in range(10_000):
            x += 1


def _calls(T: int):
    """(ours, dense): zero-argument callables of one forward each on the same tokens."""
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g)
    w_up = torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)
    w_down = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    weights, ids = torch.softmax(torch.randn(T, E, generator=g), dim=-1).topk(K, dim=-1)
    experts = StackedExperts(w_up, w_down)
    d_up = torch.randn(2 * K * I, H, generator=g) / math.sqrt(H)  # gate and up of a K*I-wide SwiGLU
    d_down = torch.randn(H, K * I, generator=g) / math.sqrt(K * I)

    def ours():
        return run_experts(x, weights, ids, experts, "cpu")

    def dense():
        gate, up = F.linear(x, d_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, d_down)

    return ours, dense


def _medians(fns, rounds: int, warmup: float) -> list[float]:
    """Median seconds of each callable, timed in alternating rounds after ``warmup`` seconds of
    untimed ones (a fresh process's first calls run slower: page faults, thread start-up, clock
    ramp; the first 15 rounds of T = 1 took 1.6x the time of the fourth 15)."""
    times = [[] for _ in fns]
    with torch.no_grad():
        end = time.perf_counter() + warmup
        while True:
            for fn in fns:
                fn()
            if time.perf_counter() >= end:
                break
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 1024])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of untimed rounds before each timing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, torch {torch.__version__}; ms are medians of {args.rounds} alternating rounds")
    print(f"{'T':>6} | {'quiet ours':>10} {'dense':>8} {'ratio':>6} | {'loaded ours':>11} {'dense':>8} {'ratio':>6} | "
          f"{'loaded/quiet':>12}")
    ctx = mp.get_context("spawn")
    for T in args.tokens:
        fns = _calls(T)
        quiet = _medians(fns, args.rounds, args.warmup)
        stop = ctx.Event()
        competitor = ctx.Process(target=_spin, args=(stop,), daemon=True)
        competitor.start()
        try:
            time.sleep(0.5)
            loaded = _medians(fns, args.rounds, args.warmup)
        finally:
            stop.set()
            competitor.join(timeout=5)
        q, lo = quiet[0] / quiet[1], loaded[0] / loaded[1]
        print(f"{T:>6} | {quiet[0] * 1e3:>10.3f} {quiet[1] * 1e3:>8.3f} {q:>6.2f} | {loaded[0] * 1e3:>11.3f} "
              f"{loaded[1] * 1e3:>8.3f} {lo:>6.2f} | {lo / q:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
