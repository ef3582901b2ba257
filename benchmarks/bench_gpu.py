"""Whole-MoE-layer benchmark on a CUDA GPU (bf16): kernel_moe's Triton kernels against
transformers' "grouped_mm" and eager experts, a plain torch._grouped_mm MoE and dense FFNs.

Every variant runs the full layer: router GEMM, routing (softmax, top-k, renormalise) and
the experts. Timings are medians of ``triton.testing.do_bench`` after warm-up, all in one
process. Next to each time: achieved TFLOP/s (router + routed experts FLOPs), GB/s counting
the bytes of the distinct experts the batch touches plus activations, and both as a % of
this GPU's own measured dense bf16 matmul rate and copy bandwidth (a figure above 100% is
flagged as a measurement error, never reported as is).

Legend: T tokens, H hidden, E experts, K experts per token, I expert intermediate size.

    python benchmarks/bench_gpu.py --out benchmarks/results/bench_gpu.json
    python benchmarks/bench_gpu.py --presets mixtral --tokens 1 512 --skip eager
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
import types
from pathlib import Path

PRESETS = {
    "mixtral": dict(H=4096, I=14336, E=8, K=2, tokens=[1, 16, 64, 512, 4096, 16384]),
    "fine_grained": dict(H=2048, I=768, E=128, K=8, tokens=[1, 64, 4096, 32768]),
}
DENSE_TOTAL_MAX_BYTES = 8e9
VARIANTS = ("kernel_moe", "hf_grouped_mm", "hf_eager", "torch_grouped_mm", "dense_active", "dense_total")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=list(PRESETS), help="shape presets to run")
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="override the token counts of every preset")
    p.add_argument("--skip", nargs="*", choices=VARIANTS[1:], default=[], help="baselines to leave out")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring window per variant, ms")
    p.add_argument("--warmup", type=int, default=50, help="do_bench warm-up window per variant, ms")
    p.add_argument("--atomic", action="store_true", help="run kernel_moe with deterministic=False (fp32 atomics)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_gpu.json"), help="JSON output path")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------
# device peaks
# --------------------------------------------------------------------------------------


def measure_peaks(torch, do_bench) -> dict:
    """This GPU's dense bf16 matmul rate (TFLOP/s) and device-to-device copy bandwidth (GB/s)."""
    best_tflops = 0.0
    for n in (4096, 8192):
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        ms = do_bench(functools.partial(torch.matmul, a, b), warmup=100, rep=300, return_mode="median")
        best_tflops = max(best_tflops, 2 * n**3 / ms / 1e9)
    src = torch.empty(2**29, device="cuda", dtype=torch.uint8)  # 512 MiB, far beyond L2
    dst = torch.empty_like(src)
    ms = do_bench(functools.partial(dst.copy_, src), warmup=100, rep=300, return_mode="median")
    copy_gbs = 2 * src.numel() / ms / 1e6
    return {"matmul_bf16_tflops": best_tflops, "copy_gbs": copy_gbs}


# --------------------------------------------------------------------------------------
# the variants
# --------------------------------------------------------------------------------------


def build_layer(torch, H, I, E, K, seed, device="cuda"):
    """Router weight [E, H] and expert weights w_up [E, 2I, H] (gate|up), w_down [E, H, I], bf16."""
    g = torch.Generator(device=device).manual_seed(seed)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    w_router = torch.randn(E, H, generator=g, **bf16) / math.sqrt(H)
    w_up = torch.randn(E, 2 * I, H, generator=g, **bf16) / math.sqrt(H)
    w_down = torch.randn(E, H, I, generator=g, **bf16) / math.sqrt(I)
    return w_router, w_up, w_down


def torch_router(torch, x, w_router, K):
    """Mixtral / Qwen-MoE routing in plain torch: softmax, top-k, renormalise."""
    logits = torch.nn.functional.linear(x, w_router)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = probs.topk(K, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype), ids


def hf_stand_in(torch, w_up, w_down):
    """The attributes transformers' experts forwards read from ``self`` (v5 layout)."""
    from transformers.activations import ACT2FN

    stub = types.SimpleNamespace(
        num_experts=w_up.shape[0],
        gate_up_proj=w_up,
        down_proj=w_down,
        has_gate=True,
        has_bias=False,
        is_transposed=False,
        is_concatenated=True,
        has_post_expert_norm=False,
        _is_expert_parallel=False,
        act_fn=ACT2FN["silu"],
    )

    def apply_gate(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return stub.act_fn(gate) * up

    stub._apply_gate = apply_gate
    return stub


def hf_eager_forward(torch, stub, x, ids, weights):
    """transformers' eager experts (the original MixtralExperts.forward), else the same loop."""
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        original = getattr(MixtralExperts.forward, "__wrapped__", None)
    except ImportError:
        original = None
    if original is not None:
        return original(stub, x, ids, weights)
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(ids, num_classes=stub.num_experts).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
        e = e[0]
        slot, tok = torch.where(mask[e])
        h = torch.nn.functional.linear(x[tok], stub.gate_up_proj[e])
        h = stub._apply_gate(h)
        y = torch.nn.functional.linear(h, stub.down_proj[e]) * weights[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def torch_grouped_mm_moe(torch, x, ids, weights, w_up, w_down):
    """A plain torch._grouped_mm MoE: sort slots by expert, two grouped GEMMs, weighted sum."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    T, K = ids.shape
    E = w_up.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=E), dim=0, dtype=torch.int32)
    xs = x[order // K]
    h = grouped_mm(xs, w_up.transpose(-2, -1), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    y = grouped_mm(h, w_down.transpose(-2, -1), offs=offs)
    y = y.float() * weights.reshape(-1)[order].float().unsqueeze(-1)
    out = torch.zeros(T, x.shape[1], device=x.device, dtype=torch.float32)
    out.index_add_(0, order // K, y)
    return out.to(x.dtype)


def dense_ffn(torch, x, w_up_NH, w_down_HI):
    h = torch.nn.functional.linear(x, w_up_NH)
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w_down_HI)


# --------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------


def sqnr_db(torch, out, ref) -> float:
    ref = ref.double()
    noise = (out.double() - ref).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def run_shape(torch, do_bench, kernels, preset, H, I, E, K, T, weights, args, peaks) -> list[dict]:
    w_router, w_up, w_down = weights
    x = torch.randn(T, H, device=w_up.device, dtype=torch.bfloat16)
    stub = hf_stand_in(torch, w_up, w_down)
    deterministic = not args.atomic

    experts = kernels.StackedExperts(w_up, w_down)

    def ours():
        logits = torch.nn.functional.linear(x, w_router)
        w, ids = kernels.topk_gating(logits, K, renormalize=True)
        return kernels.fused_experts_triton(x, w, ids, experts, deterministic=deterministic)

    def hf_grouped():
        w, ids = torch_router(torch, x, w_router, K)
        return _hf_grouped_mm(stub, x, ids, w)

    def hf_eager():
        w, ids = torch_router(torch, x, w_router, K)
        return hf_eager_forward(torch, stub, x, ids, w)

    def plain_grouped():
        w, ids = torch_router(torch, x, w_router, K)
        return torch_grouped_mm_moe(torch, x, ids, w, w_up, w_down)

    active_up = w_up[:K].reshape(K * 2 * I, H)  # same active parameters (timing only)
    active_down = w_down[:K].permute(1, 0, 2).reshape(H, K * I)
    total_up = w_up.reshape(E * 2 * I, H)  # same total parameters (timing only)
    total_down = w_down.permute(1, 0, 2).reshape(H, E * I)

    def dense_active():
        torch.nn.functional.linear(x, w_router)
        return dense_ffn(torch, x, active_up, active_down)

    def dense_total():
        torch.nn.functional.linear(x, w_router)
        return dense_ffn(torch, x, total_up, total_down)

    fns = {
        "kernel_moe": ours,
        "hf_grouped_mm": hf_grouped,
        "hf_eager": hf_eager,
        "torch_grouped_mm": plain_grouped,
        "dense_active": dense_active,
        "dense_total": dense_total,
    }
    _, ids = torch_router(torch, x, w_router, K)
    distinct = int(torch.unique(ids).numel())
    expert_bytes = (w_up[0].numel() + w_down[0].numel()) * 2
    act_bytes = 2 * T * H * 2 + E * H * 2  # x read, out written, router weight
    routed_flops = 2 * T * K * 3 * H * I + 2 * T * H * E
    ref = ours().float()
    rows = []
    for name, fn in fns.items():
        if name in args.skip:
            continue
        if name == "dense_total" and T * E * 2 * I * 2 > DENSE_TOTAL_MAX_BYTES:
            rows.append(dict(preset=preset, T=T, variant=name, error="skipped: its [T, 2*E*I] activation exceeds 8 GB"))
            continue
        try:
            out = fn()
            ms = do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
        except Exception as exc:  # a baseline missing on this stack must not stop the table
            rows.append(dict(preset=preset, T=T, variant=name, error=f"{type(exc).__name__}: {exc}"[:200]))
            continue
        if name == "dense_active":
            flops, nbytes = 2 * T * K * 3 * H * I + 2 * T * H * E, K * expert_bytes + act_bytes
        elif name == "dense_total":
            flops, nbytes = 2 * T * E * 3 * H * I + 2 * T * H * E, E * expert_bytes + act_bytes
        else:
            flops, nbytes = routed_flops, distinct * expert_bytes + act_bytes
        tflops = flops / ms / 1e9
        gbs = nbytes / ms / 1e6
        row = dict(
            preset=preset,
            T=T,
            variant=name,
            ms=ms,
            tflops=tflops,
            gbs=gbs,
            pct_matmul_peak=100 * tflops / peaks["matmul_bf16_tflops"],
            pct_copy_bw=100 * gbs / peaks["copy_gbs"],
            distinct_experts=distinct,
        )
        if name not in ("dense_active", "dense_total"):
            row["sqnr_db_vs_kernel_moe"] = sqnr_db(torch, out.float(), ref) if name != "kernel_moe" else math.inf
        if row["pct_matmul_peak"] > 100 or row["pct_copy_bw"] > 100:
            row["suspect"] = "above the measured peak: timing error, figure rejected"
        rows.append(row)
    base = {r["variant"]: r.get("ms") for r in rows if "ms" in r}
    for r in rows:
        if "ms" in r and base.get("kernel_moe"):
            r["speedup_of_kernel_moe"] = r["ms"] / base["kernel_moe"]
    return rows


def _hf_grouped_mm(stub, x, ids, w):
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(stub, x, ids, w)


def print_table(rows, peaks):
    print(
        f"\nmeasured peaks: dense bf16 matmul {peaks['matmul_bf16_tflops']:.0f} TFLOP/s, "
        f"copy {peaks['copy_gbs']:.0f} GB/s\n"
    )
    head = (
        f"{'preset':<13}{'T':>6}  {'variant':<17}{'ms':>9}{'TFLOP/s':>9}{'%mm':>6}"
        f"{'GB/s':>8}{'%bw':>6}{'x ours':>8}{'SQNR':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<13}{r['T']:>6}  {r['variant']:<17} failed: {r['error']}")
            continue
        flag = " !" if "suspect" in r else ""
        sq = r.get("sqnr_db_vs_kernel_moe")
        sq_s = "" if sq is None or math.isinf(sq) else f"{sq:.0f}"
        ratio = r.get("speedup_of_kernel_moe", float("nan"))
        print(
            f"{r['preset']:<13}{r['T']:>6}  {r['variant']:<17}{r['ms']:>9.3f}{r['tflops']:>9.1f}"
            f"{r['pct_matmul_peak']:>6.0f}{r['gbs']:>8.0f}{r['pct_copy_bw']:>6.0f}{ratio:>8.2f}{sq_s:>7}{flag}"
        )
    print("\n'x ours' = variant time / kernel_moe time (above 1: kernel_moe is faster). '!' = above measured peak.")


def _finite(obj):
    """JSON has no infinity: an infinite figure (identical outputs) becomes null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")
    from kernel_moe.kernels import triton_interpreter_enabled

    if triton_interpreter_enabled():
        sys.exit("bench_gpu.py measures compiled kernels: unset TRITON_INTERPRET")
    from triton.testing import do_bench

    from kernel_moe.kernels.contract import StackedExperts
    from kernel_moe.kernels.triton.forward import fused_experts_triton
    from kernel_moe.kernels.triton.routing import topk_gating

    kernels = types.SimpleNamespace(StackedExperts=StackedExperts, fused_experts_triton=fused_experts_triton,
                                    topk_gating=topk_gating)

    torch.manual_seed(args.seed)
    peaks = measure_peaks(torch, do_bench)
    rows = []
    started = time.time()
    for preset in args.presets:
        shape = PRESETS[preset]
        H, I, E, K = shape["H"], shape["I"], shape["E"], shape["K"]
        weights = build_layer(torch, H, I, E, K, args.seed)
        for T in args.tokens or shape["tokens"]:
            rows.extend(run_shape(torch, do_bench, kernels, preset, H, I, E, K, T, weights, args, peaks))
            torch.cuda.empty_cache()
        del weights
        torch.cuda.empty_cache()
    print_table(rows, peaks)
    import transformers
    import triton

    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        dtype="bfloat16",
        deterministic=not args.atomic,
        peaks=peaks,
        presets={k: PRESETS[k] for k in args.presets},
        rows=rows,
        wall_s=time.time() - started,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_finite(result), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
