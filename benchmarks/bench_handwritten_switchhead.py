"""A hand-written SwitchHead module before and after ``optimize()``: forward + backward time, with
and without a padding mask, side by side in one process; and how long the proof takes.

    python benchmarks/bench_handwritten_switchhead.py [--threads 1] [--min-time 2] [--json OUT]

The module is SwitchHead as a tutorial would write it (per-expert value and output Linears in
ModuleLists per head, sigmoid top-k gates on the source and destination tokens, a loop over heads
and experts that gathers each expert's tokens, a boolean padding mask [B, T]). ``optimize()``
swaps it for FusedHandwrittenSwitchHead (the two halves of the experts op and
``scaled_dot_product_attention``). Outputs are checked equal before timing. Reported: median ms of
a training step (forward, backward of a fixed cotangent) and the ratio original / swapped (>1: the
swapped layer is faster). CPU timings on a shared machine: compare ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time

import torch
from torch import nn

import kernel_moe
from kernel_moe.layers.switchhead_attention import FusedHandwrittenSwitchHead
from kernel_moe.bench.settings import Timing
from kernel_moe.bench.timing import sample_interleaved

# name: (batch, seq, d_model, heads, experts per head, top_k, head_dim)
SHAPES = {"small": (4, 128, 256, 4, 8, 2, 64), "long": (2, 512, 256, 4, 8, 2, 64)}


class LoopSwitchHead(nn.Module):
    """SwitchHead with per-expert Linears and loops over heads and experts."""

    def __init__(self, d_model: int, heads: int, experts: int, top_k: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.experts, self.top_k, self.head_dim = heads, experts, top_k, head_dim
        self.q_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.src_gate = nn.Linear(d_model, heads * experts, bias=False)
        self.dst_gate = nn.Linear(d_model, heads * experts, bias=False)
        self.values = nn.ModuleList(nn.ModuleList(nn.Linear(d_model, head_dim, bias=False) for _ in range(experts))
                                    for _ in range(heads))
        self.outputs = nn.ModuleList(nn.ModuleList(nn.Linear(head_dim, d_model, bias=False) for _ in range(experts))
                                     for _ in range(heads))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        h, E, d = self.heads, self.experts, self.head_dim
        q = self.q_proj(x).view(B, T, h, d)
        k = self.k_proj(x).view(B, T, h, d)
        src = torch.sigmoid(self.src_gate(x)).view(B, T, h, E).topk(self.top_k, dim=-1)
        dst = torch.sigmoid(self.dst_gate(x)).view(B, T, h, E).topk(self.top_k, dim=-1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        out = torch.zeros_like(x)
        for j in range(h):
            v = torch.zeros(B, T, d)
            for e in range(E):
                b, t, slot = torch.where(src.indices[:, :, j] == e)
                v = v.index_put((b, t), self.values[j][e](x[b, t]) * src.values[b, t, j, slot, None], accumulate=True)
            s = torch.einsum("btd,bsd->bts", q[:, :, j], k[:, :, j]) / math.sqrt(d)
            allowed = causal if mask is None else causal & mask[:, None, :]
            a = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
            for e in range(E):
                b, t, slot = torch.where(dst.indices[:, :, j] == e)
                y = self.outputs[j][e](a[b, t]) * dst.values[b, t, j, slot, None]
                out = out.index_put((b, t), y, accumulate=True)
        return out


def step(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, cot: torch.Tensor):
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x, mask).backward(cot)
    return run


def bench(name: str, timing: Timing) -> dict:
    B, T, D, h, E, K, d = SHAPES[name]
    torch.manual_seed(0)
    original = LoopSwitchHead(D, h, E, K, d)
    swapped = copy.deepcopy(original)
    start = time.perf_counter()
    swapped, report = kernel_moe.optimize(swapped, return_report=True)
    proof_s = time.perf_counter() - start
    if not isinstance(swapped, FusedHandwrittenSwitchHead):
        raise RuntimeError(f"not swapped: {report}")
    x = torch.randn(B, T, D, requires_grad=True)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, T - T // 4:] = False  # right padding in the first sequence
    cot = torch.randn(B, T, D)
    calls = {}
    for label, mask in (("no mask", None), ("padding mask", keep)):
        with torch.no_grad():
            torch.testing.assert_close(swapped(x, mask), original(x, mask), atol=1e-4, rtol=1e-4)
        calls[f"original, {label}"] = step(original, x, mask, cot)
        calls[f"swapped, {label}"] = step(swapped, x, mask, cot)
    for call in calls.values():
        for _ in range(timing.warmup):
            call()
    samples = sample_interleaved(list(calls.values()), torch.device("cpu"), timing)
    ms = {k: 1e3 * statistics.median(s) for k, s in zip(calls, samples)}
    ratio = {label: ms[f"original, {label}"] / ms[f"swapped, {label}"] for label in ("no mask", "padding mask")}
    return {"shape": name, "dims": dict(zip(("B", "T", "D", "heads", "experts", "top_k", "head_dim"), SHAPES[name])),
            "optimize_s": proof_s, "median_ms": ms, "speedup": ratio}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of sampling per variant")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    timing = Timing(warmup=2, min_time_s=args.min_time, min_samples=5)
    rows = [bench(name, timing) for name in args.shapes]
    print(f"CPU {platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{'shape (B, T, D, h, E, k, d)':34s} {'optimize s':>10s} {'mask':>13s} {'original ms':>12s} "
          f"{'swapped ms':>11s} {'speedup':>8s}")
    for r in rows:
        for label in ("no mask", "padding mask"):
            ms = r["median_ms"]
            print(f"{r['shape'] + ' ' + str(SHAPES[r['shape']]):34s} {r['optimize_s']:10.2f} {label:>13s} "
                  f"{ms['original, ' + label]:12.1f} {ms['swapped, ' + label]:11.1f} {r['speedup'][label]:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
