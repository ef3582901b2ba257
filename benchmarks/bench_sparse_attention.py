"""Forward + backward time of SparseExpertAttention vs dense multi-head attention with the same
number of active heads, and vs a naive per-expert loop, side by side in one process.

    python benchmarks/bench_sparse_attention.py [--shapes small medium] [--threads 1] [--json OUT]

- **ours**: ``kernel_moe.SparseExpertAttention`` (MoA): routing, the query projection as the gather
  half of the experts op, ``scaled_dot_product_attention`` over all active heads (shared key/value
  heads read through GQA), the output projection and weighted sum as the combine half.
- **dense MHA**: causal attention with top_k * h heads of the same size (the heads a token runs in
  MoA) and q/k/v/o projections: the same attention FLOPs, more key/value projection work.
- **naive loop**: the same MoA with the same weights, written as a tutorial would: a Python loop
  over experts gathering each expert's slots for the query and the output projections (transformers'
  JetMoE groups by expert the same way, with a host read of the group sizes). Its output is checked
  against ours before timing.

Each case times a full training step of the layer (forward, backward of a fixed cotangent), the
variants sampled round-robin so that load from other processes hits them alike. Reported: median
ms and the ratio to ours (>1: ours is faster). CPU timings on a shared machine: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from kernel_moe import SparseExpertAttention
from kernel_moe.bench.models import DenseMHA
from kernel_moe.bench.settings import Timing
from kernel_moe.bench.timing import sample_interleaved

# name: (batch, seq, d_model, experts, heads per expert, top_k, head_dim)
SHAPES = {
    "small": (4, 128, 256, 8, 2, 2, 32),
    "medium": (2, 512, 512, 8, 4, 2, 64),
    "many-experts": (2, 256, 512, 32, 2, 2, 64),
}


class LoopMoA(nn.Module):
    """MoA with a Python loop over experts (shares ``layer``'s Parameters)."""

    def __init__(self, layer: SparseExpertAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        B, T, D = x.shape
        h, d, K = m.num_heads, m.head_dim, m.top_k
        x_ND = x.reshape(B * T, D)
        top, ids = m.router(x_ND).float().topk(K, dim=-1)
        gates = torch.softmax(top, dim=-1).to(x.dtype)
        q = x.new_zeros(B * T, K, h * d)
        for e in range(m.num_experts):
            tok, slot = torch.where(ids == e)
            q = q.index_put((tok, slot), F.linear(x_ND[tok], m.w_q[e]))
        k, v = m.kv_proj(x).chunk(2, dim=-1)
        q = q.view(B, T, K, h, d).permute(0, 3, 2, 1, 4).reshape(B, h * K, T, d)
        k, v = k.view(B, T, h, d).transpose(1, 2), v.view(B, T, h, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        o = o.view(B, h, K, T, d).permute(0, 3, 2, 1, 4).reshape(B * T, K, h * d)
        out = x.new_zeros(B * T, D)
        for e in range(m.num_experts):
            tok, slot = torch.where(ids == e)
            out = out.index_add(0, tok, F.linear(o[tok, slot], m.w_o[e]) * gates[tok, slot, None])
        return (out + m.bias).view(B, T, D)


def step(module: nn.Module, x: torch.Tensor, cot: torch.Tensor):
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(cot)
    return run


def bench(name: str, timing: Timing) -> dict:
    B, T, D, E, h, K, d = SHAPES[name]
    torch.manual_seed(0)
    ours = SparseExpertAttention(D, E, h, top_k=K, head_dim=d)
    loop, dense = LoopMoA(ours), DenseMHA(D, K * h, d)
    x = torch.randn(B, T, D, requires_grad=True)
    cot = torch.randn(B, T, D)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), loop(x), atol=1e-4, rtol=1e-4)
    calls = {"ours": step(ours, x, cot), "dense MHA": step(dense, x, cot), "naive loop": step(loop, x, cot)}
    for call in calls.values():
        for _ in range(timing.warmup):
            call()
    samples = sample_interleaved(list(calls.values()), torch.device("cpu"), timing)
    ms = {k: 1e3 * statistics.median(s) for k, s in zip(calls, samples)}
    return {"shape": name, "B": B, "T": T, "D": D, "E": E, "heads_per_expert": h, "top_k": K, "head_dim": d,
            "active_heads": K * h, "median_ms": ms, "ratio_to_ours": {k: v / ms["ours"] for k, v in ms.items()}}


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
    print(f"{'shape (B, T, D, E, h, k, d)':34s} {'ours ms':>9s} {'dense MHA':>16s} {'naive loop':>16s}")
    for r in rows:
        ms, ratio = r["median_ms"], r["ratio_to_ours"]
        dims = f"{r['shape']} {SHAPES[r['shape']]}"
        print(f"{dims:34s} {ms['ours']:9.2f} {ms['dense MHA']:8.2f} (x{ratio['dense MHA']:.2f}) "
              f"{ms['naive loop']:8.2f} (x{ratio['naive loop']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
