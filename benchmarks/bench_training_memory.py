"""Activation memory of one training step (forward + backward) of a Mixtral-style MoE layer:
ours vs transformers' "grouped_mm" and "eager" experts, measured side by side.

    python benchmarks/bench_training_memory.py [--tokens 4096] [--dtype float32] [--json OUT]

The figure is the transient peak of tensor allocations during the step (CPU: the PyTorch
profiler's allocation events; CUDA: max_memory_allocated minus what was live before), i.e.
activations, saved tensors and gradients, on top of the weights and the input already held.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import kernel_moe
from kernel_moe.bench.memory import measure_peak_memory

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu_layer import E, H, I, K, build_block  # noqa: E402


def build(impl: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The benchmark's Mixtral-style block with transformers' ``impl`` experts, in training mode."""
    return torch.nn.Sequential(build_block(impl, dtype)).to(device=device).train()


def step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).float().square().mean().backward()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    models = {"ours": build("eager", dtype, args.device), "grouped_mm": build("grouped_mm", dtype, args.device),
              "eager": build("eager", dtype, args.device)}
    report = kernel_moe.optimize(models["ours"], return_report=True)[1]
    assert report.num_swapped == 1, report
    x = torch.randn(1, args.tokens, H, dtype=dtype, device=args.device, requires_grad=True)
    rows = {}
    for name, model in models.items():
        step(model, x)  # warm-up: optimizer-free, grads allocated once
        reading = measure_peak_memory(lambda: step(model, x), args.device)
        rows[name] = reading.transient_peak_bytes
    budget = (2 * args.tokens * H + args.tokens * K * I) * x.element_size()
    print(f"training step, Mixtral-style layer H={H} I={I} E={E} k={K}, T={args.tokens}, {args.dtype}, {args.device}")
    for name, b in rows.items():
        print(f"  {name:11} transient peak {b / 2**20:8.1f} MiB   ({b / rows['grouped_mm']:.2f}x grouped_mm)")
    print(f"  reference: inputs + outputs + one [T*k, I] intermediate = {budget / 2**20:.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "dtype": args.dtype, "device": args.device, "bytes": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
