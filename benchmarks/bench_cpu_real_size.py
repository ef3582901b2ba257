"""CPU benchmark of real-size MoE layers (random weights): our optimized experts against
transformers' own experts (eager and grouped_mm) and dense SwiGLU FFNs, side by side in one
process, with the machine's read bandwidth measured in the same run.

    python benchmarks/bench_cpu_real_size.py [--layers mixtral qwen3 deepseek] [--dtypes bfloat16 float32]
        [--tokens 1 2 4 8 32 128 1024] [--min-time 2.0] [--min-reps 5] [--skip eager dense_total]
        [--experts E] [--memory-gb GB] [--no-verify] [--json OUT] [--smoke]

Layers (``kernel_moe.bench.cpu_real_size.REAL_SIZE_LAYERS``):
- ``mixtral``: Mixtral-8x7B size, H 4096, I 14336, E 8, top-2 (transformers ``MixtralExperts``);
- ``qwen3``: Qwen3-30B-A3B size, H 2048, I 768, E 128, top-8 (``Qwen3MoeExperts``);
- ``deepseek``: a DeepSeek-style fine-grained layer holding 64 of DeepSeek-V3's 256 routed
  experts, each of DeepSeek-V3 size: H 7168, I 2048, top-8 (``DeepseekV3Experts``).

One experts module per (layer, dtype) holds the only copy of the expert weights: transformers
runs it with ``config._experts_implementation`` set to "eager" or "grouped_mm" (the experts
forward reads that field on every call), and ours is the same module after
``kernel_moe.optimize`` (the swapped layer owns the very same Parameters). Dense FFNs (SwiGLU,
``kernel_moe.bench.DenseFFN``): ``dense_active`` with intermediate K*I (the parameters one
token uses), ``dense_total`` with intermediate E*I (all the experts' parameters: a second copy
of that size, skipped with a printed reason where it does not fit in ``--memory-gb``).

Timing: each implementation's median over interleaved calls (shuffled order each round, at
least ``--min-reps`` calls and ``--min-time`` seconds per T); every routed call takes the next
of 16 prepared random top-k routings, so that experts are not warm in the cache from the call
before. ``GB/s`` is the mean number of distinct experts a call reads times one expert's bytes,
over our median time; ``of bw`` divides that by the read bandwidth measured just before the
layer was built: the best of three kernels that each read 1 GiB (fp32 ``sum()``, bf16
``sum()``, a bf16 GEMV), all printed. ``dense bw`` is the same fraction for the dense FFN of
the active parameters (what PyTorch's dense kernels reach on those bytes). ``of read`` is our rate
over that of ``read``, a reference in the same rotation: PyTorch's fp32 ``sum()`` of as many bytes
as ours reads, each call a window of a 1 GiB buffer not read the call before, so it meets the same
load and the same OpenMP threads as the layer (the 1 GiB probe runs once, seconds earlier, on a
machine whose bandwidth moves between runs). Ratios are ours / each reference (below 1: ours is
faster).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform

import torch
from torch import nn

import kernel_moe
from kernel_moe.bench.cpu_real_size import (
    REAL_SIZE_LAYERS,
    ROUTINGS,
    LayerShape,
    available_memory_bytes,
    materialize,
    mean_distinct_experts,
    prepared_routings,
    read_rates,
    time_cycled,
)
from kernel_moe.bench.models import DenseFFN

REFERENCES = ["eager", "grouped_mm", "dense_active", "dense_total", "read"]
SMOKE_LAYERS = {"mixtral": LayerShape("mixtral", 64, 96, 8, 2, "smoke"),
                "qwen3": LayerShape("qwen3", 64, 32, 16, 4, "smoke"),
                "deepseek": LayerShape("deepseek", 96, 32, 16, 4, "smoke")}


class _Holder(nn.Module):
    """A model whose only child is the experts module, so that optimize() can swap it."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x_TH, ids_TK, w_TK):
        return self.experts(x_TH, ids_TK, w_TK)


def _transformers_experts(shape: LayerShape, dtype: torch.dtype) -> nn.Module:
    """The transformers experts module of ``shape``'s family, random weights, on the CPU."""
    if shape.name == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls
        cfg = MixtralConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                            num_local_experts=shape.experts, num_experts_per_tok=shape.top_k)
    elif shape.name == "qwen3":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls
        cfg = Qwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate,
                             num_experts=shape.experts, num_experts_per_tok=shape.top_k)
    else:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts as cls
        cfg = DeepseekV3Config(hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate,
                               n_routed_experts=shape.experts, num_experts_per_tok=shape.top_k)
    cfg._experts_implementation = "eager"
    return materialize(lambda: cls(cfg), dtype, seed=0)


def _memory_plan(shape: LayerShape, dtype: torch.dtype, args, limit: float) -> tuple[bool, str | None]:
    """(whether the layer fits, why dense_total is skipped or None). Counted: one copy of the
    experts, plus, while optimize() proves the swap, what its probes hold beside the model (counted
    as a quarter copy: the Parameters do not require grad, so no weight gradient is made; 0.08-0.2
    copies measured in bf16 by benchmarks/bench_optimize_memory.py; none with --no-verify), the dense FFN of the active parameters, and the largest T's intermediate
    activations plus 256 MiB; dense_total (built after the proof) adds a second copy of the
    experts and its own activations."""
    elt = torch.empty((), dtype=dtype).element_size()
    copy = shape.experts * shape.expert_bytes(dtype)
    T = max(args.tokens)
    proof = 0 if args.no_verify else copy // 4
    need = copy + proof + 2**28 + T * 4 * shape.top_k * shape.intermediate * 4
    if "dense_active" not in args.skip:
        need += shape.top_k * shape.expert_bytes(dtype)
    if "read" not in args.skip:
        need += _read_buffer_bytes(args)
    if need > limit:
        return False, None
    need_total = need + max(copy - proof, 0) + T * 4 * shape.experts * shape.intermediate * elt
    if "dense_total" not in args.skip and need_total > limit:
        return True, (f"dense_total skipped: a second {copy / 1e9:.2f} GB copy of the experts and its activations "
                      f"need {need_total / 1e9:.1f} GB of the {limit / 1e9:.1f} GB allowed (--memory-gb)")
    return True, None


def _read_buffer_bytes(args) -> int:
    """Bytes of the buffer the interleaved ``read`` reference sums windows of (1 GiB: far beyond
    the caches, so each window is read from memory)."""
    return 2**24 if args.smoke else 2**30


def _read_call(buffer: torch.Tensor, nbytes: float):
    """(call(i), bytes it reads): ``sum()`` of the i-th window of ``buffer`` (fp32) of ``nbytes``
    (at most the whole buffer), windows in turn through the buffer, so none is in the cache from
    the call before."""
    n = max(1, min(int(nbytes) // 4, buffer.numel()))
    windows = buffer.numel() // n
    return (lambda i: buffer[(i % windows) * n:(i % windows + 1) * n].sum()), 4 * n


def _calls(layer: dict, T: int, dtype: torch.dtype, shape: LayerShape) -> dict:
    """name -> call(i) of one forward on the same T tokens; routed calls use routing i % 16; ``read``
    sums as many bytes of memory as ours reads (the distinct experts' weights) by PyTorch's fp32
    ``sum()``, interleaved with the rest: the read bandwidth under the same load, call for call."""
    g = torch.Generator().manual_seed(T)
    x_TH = torch.randn(T, shape.hidden, generator=g).to(dtype)
    routings = prepared_routings(T, shape, dtype)
    distinct = mean_distinct_experts(routings)
    hf, ours = layer["hf"], layer["ours"]

    def hf_call(impl):
        def call(i):
            hf.config._experts_implementation = impl
            w_TK, ids_TK = routings[i % ROUTINGS]
            return hf(x_TH, ids_TK, w_TK)
        return call

    def ours_call(i):
        w_TK, ids_TK = routings[i % ROUTINGS]
        return ours(x_TH, ids_TK, w_TK)

    calls = {"ours": ours_call, "eager": hf_call("eager"), "grouped_mm": hf_call("grouped_mm")}
    for name in ("dense_active", "dense_total"):
        if layer.get(name) is not None:
            calls[name] = lambda i, m=layer[name]: m(x_TH)
    read_bytes = 0
    if layer.get("read_buffer") is not None:
        calls["read"], read_bytes = _read_call(layer["read_buffer"], distinct * shape.expert_bytes(dtype))
    calls = {k: v for k, v in calls.items() if k not in layer["skip"]}
    return {"calls": calls, "routings": routings, "distinct_experts": distinct, "read_bytes": read_bytes}


def _check(layer: dict, T: int, dtype: torch.dtype, shape: LayerShape) -> tuple[float, float]:
    """(max |ours - transformers eager|, max |eager|) on one routing: a sanity check that ours
    computes the layer."""
    g = torch.Generator().manual_seed(T)
    x_TH = torch.randn(T, shape.hidden, generator=g).to(dtype)
    w_TK, ids_TK = prepared_routings(T, shape, dtype)[0]
    layer["hf"].config._experts_implementation = "eager"
    with torch.no_grad():
        ref_TH = layer["hf"](x_TH, ids_TK, w_TK)
        return (layer["ours"](x_TH, ids_TK, w_TK) - ref_TH).abs().max().item(), ref_TH.abs().max().item()


def _build(shape: LayerShape, dtype: torch.dtype, dense_total: bool, args) -> dict:
    """The experts module (transformers), ours swapped over the same Parameters, and the dense FFNs."""
    hf = _transformers_experts(shape, dtype)
    holder = _Holder(hf)
    kernel_moe.optimize(holder, kernel_moe.KernelConfig.for_moe(top_k=shape.top_k, verify=not args.no_verify))
    skip = set(args.skip)
    if not isinstance(holder.experts, kernel_moe.FusedExperts):
        raise RuntimeError(f"optimize() did not swap the {type(hf).__name__} of layer {shape.name!r}")
    layer = {"hf": hf, "ours": holder.experts, "skip": skip}
    if "dense_active" not in skip:
        layer["dense_active"] = materialize(lambda: DenseFFN(shape.hidden, shape.top_k * shape.intermediate),
                                            dtype, seed=1)
    if dense_total and "dense_total" not in skip:
        layer["dense_total"] = materialize(lambda: DenseFFN(shape.hidden, shape.experts * shape.intermediate),
                                           dtype, seed=2)
    if "read" not in skip:
        layer["read_buffer"] = torch.ones(_read_buffer_bytes(args) // 4)
    return layer


def _row(shape: LayerShape, dtype_name: str, T: int, times: dict, extra: dict) -> dict:
    """One result row: medians, rates and ours / each reference."""
    dtype = getattr(torch, dtype_name)
    rate = extra["distinct_experts"] * shape.expert_bytes(dtype) / times["ours"]
    row = {"layer": shape.name, "dtype": dtype_name, "T": T, "H": shape.hidden, "I": shape.intermediate,
           "E": shape.experts, "K": shape.top_k, **{f"{k}_s": v for k, v in times.items()},
           "bytes_per_s": rate, "fraction_of_bandwidth": rate / extra["bw"]["best"], **extra}
    for name in REFERENCES:
        if name in times and name != "read":
            row[f"ours_over_{name}"] = times["ours"] / times[name]
    if "read" in times:
        row["read_bytes_per_s"] = extra["read_bytes"] / times["read"]
        row["fraction_of_read"] = rate / row["read_bytes_per_s"]
    if "dense_active" in times:
        dense_bytes = shape.top_k * shape.expert_bytes(dtype)
        row["dense_active_fraction_of_bandwidth"] = dense_bytes / times["dense_active"] / extra["bw"]["best"]
    return row


def _fmt(row: dict, key: str, spec: str = "6.2f") -> str:
    width = int(spec.split(".")[0])
    return format(row[key], spec) if key in row else "-".rjust(width)


def _print_row(row: dict) -> None:
    print(f"{row['layer']:8} {row['dtype']:8} {row['T']:>5} | {row['ours_s'] * 1e3:9.2f} "
          f"{row['bytes_per_s'] / 1e9:6.1f} {row['fraction_of_bandwidth']:6.2f} "
          f"{_fmt(row, 'dense_active_fraction_of_bandwidth', '8.2f')} {_fmt(row, 'fraction_of_read', '7.2f')} "
          f"| {_fmt(row, 'ours_over_eager', '7.2f')} "
          f"{_fmt(row, 'ours_over_grouped_mm', '7.2f')} {_fmt(row, 'ours_over_dense_active', '8.2f')} "
          f"{_fmt(row, 'ours_over_dense_total', '8.2f')}")


def run_layer(shape: LayerShape, dtype_name: str, args, limit: float) -> list[dict]:
    """Every T of one (layer, dtype); the layer's memory is freed before returning."""
    dtype = getattr(torch, dtype_name)
    fits, why = _memory_plan(shape, dtype, args, limit)
    copy_gb = shape.experts * shape.expert_bytes(dtype) / 1e9
    if not fits:
        print(f"{shape.name} {dtype_name}: skipped, one {copy_gb:.2f} GB copy of the experts, the dense FFN and "
              f"the activations do not fit in {limit / 1e9:.1f} GB (--memory-gb; --experts holds fewer)")
        return []
    bw = read_rates(2**24 if args.smoke else 2**30)
    print(f"{shape.name} {dtype_name} ({shape.note}; H {shape.hidden}, I {shape.intermediate}, E {shape.experts}, "
          f"top-{shape.top_k}; experts {copy_gb:.2f} GB): read GB/s fp32 sum {bw['fp32_sum'] / 1e9:.1f}, "
          f"bf16 sum {bw['bf16_sum'] / 1e9:.1f}, bf16 GEMV {bw['bf16_gemv'] / 1e9:.1f}")
    if why:
        print(f"  {why}")
    layer = _build(shape, dtype, why is None, args)
    check, scale = _check(layer, min(args.tokens), dtype, shape)
    print(f"  max |ours - eager| at T={min(args.tokens)}: {check:.3g} (max |eager| {scale:.3g})")
    rows = []
    for T in args.tokens:
        made = _calls(layer, T, dtype, shape)
        times = time_cycled(made["calls"], args.min_time, args.min_reps)
        extra = {"distinct_experts": made["distinct_experts"], "read_bytes": made["read_bytes"], "bw": bw,
                 "max_abs_diff_vs_eager": check}
        if why:
            extra["dense_total_skipped"] = why
        rows.append(_row(shape, dtype_name, T, times, extra))
        _print_row(rows[-1])
    del layer
    gc.collect()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", nargs="+", default=list(REAL_SIZE_LAYERS), choices=list(REAL_SIZE_LAYERS))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 32, 128, 1024])
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per (layer, dtype, T)")
    ap.add_argument("--min-reps", type=int, default=5, help="timed calls per implementation at least")
    ap.add_argument("--skip", nargs="*", default=[], choices=REFERENCES, help="references not to run")
    ap.add_argument("--no-verify", action="store_true",
                    help="optimize() without its proof by computation (which briefly holds up to a quarter copy of the experts)")
    ap.add_argument("--experts", type=int, help="hold this many experts instead of the layer's own E")
    ap.add_argument("--memory-gb", type=float, help="memory the weights may take (default: MemAvailable - 2 GB)")
    ap.add_argument("--smoke", action="store_true", help="tiny layers of the same families (tests)")
    ap.add_argument("--json", help="write the rows to this path")
    args = ap.parse_args(argv)
    if min(args.tokens) < 1:
        raise SystemExit(f"--tokens {args.tokens}: allowed: ints >= 1")
    shapes = SMOKE_LAYERS if args.smoke else REAL_SIZE_LAYERS
    available = available_memory_bytes()
    limit = args.memory_gb * 1e9 if args.memory_gb else (available - 2e9 if available else 8e9)
    print(f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; memory for weights {limit / 1e9:.1f} GB")
    print(f"{'layer':8} {'dtype':8} {'T':>5} | {'ours ms':>9} {'GB/s':>6} {'of bw':>6} {'dense bw':>8} {'of read':>7} | "
          f"{'/eager':>7} {'/gmm':>7} {'/dense_a':>8} {'/dense_t':>8}")
    rows = []
    for name in args.layers:
        shape = shapes[name] if args.experts is None else shapes[name].with_experts(args.experts)
        for dtype_name in args.dtypes:
            rows += run_layer(shape, dtype_name, args, limit)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
