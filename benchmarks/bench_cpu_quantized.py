"""CPU benchmark of quantized experts on real-size MoE layers: int8 / fp8 / int4 against our bf16
layer, in one process, with the machine's read bandwidth measured in the same run.

    python benchmarks/bench_cpu_quantized.py [--layers mixtral qwen3] [--tokens 1 4 1024]
        [--formats int8 fp8 int4] [--min-time 2.0] [--json OUT]

Layers (random weights): Mixtral-8x7B size (H 4096, I 14336, E 8, top-2) and Qwen3-30B-A3B size
(H 2048, I 768, E 128, top-8). Each call routes a fresh random top-k (cycled from 16 prepared
routings, so that successive calls do not find their experts in the cache). Prints per (layer, T)
each format's median time, time / bf16 time, and the distinct active expert bytes read per second
as a fraction of the read bandwidth (a 1 GiB fp32 ``sum()``, best of 5, measured in the run:
``kernel_moe.bench.cpu_real_size.read_rates``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from kernel_moe.bench.cpu_real_size import REAL_SIZE_LAYERS, read_rates
from kernel_moe.kernels.contract import StackedExperts
from kernel_moe.kernels.quantization import quantize
from kernel_moe.ops.experts import run_experts

LAYERS = {name: (s.hidden, s.intermediate, s.experts, s.top_k) for name, s in REAL_SIZE_LAYERS.items()
          if name in ("mixtral", "qwen3")}
GROUPS = {"int8": None, "fp8": None, "int4": 128}


def _experts(H: int, I: int, E: int, fmt: str) -> StackedExperts:
    torch.manual_seed(0)
    w_up = (torch.randn(E, 2 * I, H) / math.sqrt(H)).to(torch.bfloat16)
    w_down = (torch.randn(E, H, I) / math.sqrt(I)).to(torch.bfloat16)
    if fmt == "bf16":
        return StackedExperts(w_up, w_down)
    up, down = quantize(w_up, fmt, GROUPS[fmt]), quantize(w_down, fmt, GROUPS[fmt])
    del w_up, w_down
    return StackedExperts(up.data, down.data, weight_format=fmt, w_up_scale=up.scale, w_down_scale=down.scale)


def _expert_bytes(experts: StackedExperts) -> float:
    """Bytes of one expert's weights and scales."""
    tensors = [t for t in (experts.w_up, experts.w_down, experts.w_up_scale, experts.w_down_scale) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors) / experts.num_experts


def time_call(experts: StackedExperts, T: int, K: int, min_time: float) -> tuple[float, float]:
    """(median seconds per call, mean distinct active experts per call)."""
    E, H = experts.num_experts, experts.w_up.shape[2] * (2 if experts.weight_format == "int4" else 1)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    routings = [torch.softmax(torch.randn(T, E, generator=g), -1).topk(K, -1) for _ in range(16)]
    active = statistics.mean(len(torch.unique(ids)) for _, ids in routings)
    samples, i = [], 0
    with torch.no_grad():
        run_experts(x, routings[0][0], routings[0][1], experts, "cpu")
        start = time.perf_counter()
        while len(samples) < 5 or time.perf_counter() - start < min_time:
            w, ids = routings[i % len(routings)]
            t0 = time.perf_counter()
            run_experts(x, w, ids, experts, "cpu")
            samples.append(time.perf_counter() - t0)
            i += 1
    return statistics.median(samples), active


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 1024])
    ap.add_argument("--formats", nargs="+", default=["int8", "fp8", "int4"], choices=list(GROUPS))
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    bw = read_rates()["fp32_sum"]
    print(f"read bandwidth {bw / 1e9:.1f} GB/s; {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'layer':8} {'T':>5} {'format':6} | {'ms':>9} {'/bf16':>6} {'GB/s':>7} {'of bw':>6}")
    rows = []
    for name in args.layers:
        H, I, E, K = LAYERS[name]
        for fmt in ["bf16", *args.formats]:
            experts = _experts(H, I, E, fmt)
            per_expert = _expert_bytes(experts)
            for T in args.tokens:
                seconds, active = time_call(experts, T, K, args.min_time)
                rate = active * per_expert / seconds
                row = {"layer": name, "T": T, "format": fmt, "seconds": seconds, "bytes_per_s": rate,
                       "fraction_of_bandwidth": rate / bw, "read_bandwidth": bw}
                base = next((r for r in rows if (r["layer"], r["T"], r["format"]) == (name, T, "bf16")), None)
                row["over_bf16"] = seconds / base["seconds"] if base else 1.0
                rows.append(row)
                print(f"{name:8} {T:>5} {fmt:6} | {seconds * 1e3:9.2f} {row['over_bf16']:6.2f} {rate / 1e9:7.1f} "
                      f"{rate / bw:6.2f}")
            del experts
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
