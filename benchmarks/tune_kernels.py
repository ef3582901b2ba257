"""Tune the block sizes of kernel_moe's fused MoE kernels on a CUDA GPU and write the JSON
table that ``kernel_moe.kernels.triton.tile_configs.get_tile_config`` reads.

For every token count T: for every BLOCK_M candidate, the expert alignment is built once,
then the up-projection (gather + GEMM + activation) and the down-projection (GEMM + routing
weight + reduction over K) are timed separately over their candidate tiles with
``triton.testing.do_bench`` (medians, after warm-up); the BLOCK_M with the smallest
align + up + down time wins. Candidates that do not compile or run out of resources are
skipped. Results are merged into ``E=..,N=..,K=..,dtype=..,device=...json``.

Legend: T tokens, H hidden, E experts, K experts per token, I expert intermediate size,
N up-projection features (2*I when gated).

    python benchmarks/tune_kernels.py --preset mixtral
    python benchmarks/tune_kernels.py -E 64 --hidden 2048 --intermediate 1408 --top-k 6 --tokens 1 128 4096
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import time
from pathlib import Path

PRESETS = {
    "mixtral": dict(experts=8, hidden=4096, intermediate=14336, top_k=2),
    "fine_grained": dict(experts=128, hidden=2048, intermediate=768, top_k=8),
}
DEFAULT_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="shape preset (explicit flags override it)")
    p.add_argument("-E", "--experts", type=int, help="number of experts E")
    p.add_argument("--hidden", type=int, help="hidden size H")
    p.add_argument("--intermediate", type=int, help="expert intermediate size I")
    p.add_argument("--top-k", type=int, help="experts per token K")
    p.add_argument("--glu", choices=["concat", "interleaved", "none"], default="concat")
    p.add_argument("--activation", default="silu", choices=["silu", "gelu", "gelu_tanh", "relu", "gpt_oss"])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--tokens", nargs="+", type=int, default=DEFAULT_TOKENS, help="token counts T to tune")
    p.add_argument("--quick", action="store_true", help="a smaller search space (about 4x fewer candidates)")
    p.add_argument("--rep", type=int, default=50, help="do_bench measuring window per candidate, ms")
    p.add_argument("--warmup", type=int, default=10, help="do_bench warm-up window per candidate, ms")
    p.add_argument(
        "--out-dir", type=Path, default=None, help="where to write the JSON (default: kernel_moe/kernels/triton/configs)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    for field in ("experts", "hidden", "intermediate", "top_k"):
        if getattr(args, field) is None:
            if field not in preset:
                p.error(f"--{field.replace('_', '-')} is required without --preset")
            setattr(args, field, preset[field])
    if args.activation == "gpt_oss" and args.glu == "none":
        p.error("--activation gpt_oss needs --glu concat or interleaved")
    return args


def block_m_candidates(T: int, K: int, E: int) -> list[int]:
    """BLOCK_M values worth trying: none much larger than the average slots per expert."""
    per_expert = max(1.0, T * K / E)
    cap = max(16, 1 << math.ceil(math.log2(per_expert)) + 1)
    return [m for m in (16, 32, 64, 128) if m <= cap]


def up_candidates(block_m: int, decode: bool, fp32: bool, quick: bool) -> list[dict]:
    block_n = [16, 32, 64] if decode else [64, 128] + ([] if quick else [32, 256])
    block_k = ([32, 64] if fp32 else [64, 128]) if not quick else ([32] if fp32 else [64])
    warps = [4] if decode or block_m <= 32 else [4, 8]
    stages = [3, 4] if quick else [2, 3, 4, 5]
    groups = [1] if decode else [1, 8] if not quick else [8]
    return [
        dict(BLOCK_N=n, BLOCK_K=k, GROUP_M=g, num_warps=w, num_stages=s)
        for n, k, g, w, s in itertools.product(block_n, block_k, groups, warps, stages)
    ]


def down_candidates(block_m: int, decode: bool, fp32: bool, quick: bool) -> list[dict]:
    splits = ([1, 2, 4, 8] if not quick else [1, 4]) if decode else [1]
    return [dict(cfg, SPLIT_K=s) for cfg in up_candidates(block_m, decode, fp32, quick) for s in splits]


def tune(args, device: str, do_bench, device_name: str) -> Path:
    """Run the sweep for ``args`` on ``device``; returns the path of the JSON written."""
    import torch

    from kernel_moe.kernels.contract import Activation
    from kernel_moe.kernels.triton.forward import moe_down_projection, moe_up_projection
    from kernel_moe.kernels.triton.routing import align_by_expert, topk_gating
    from kernel_moe.kernels.triton.tile_configs import TILE_CONFIG_DIR, tile_config_file_name, validate_tile_config

    dtype = getattr(torch, args.dtype)
    E, H, I, K = args.experts, args.hidden, args.intermediate, args.top_k
    gated = args.glu != "none"
    N = 2 * I if gated else I
    g = torch.Generator(device=device).manual_seed(args.seed)
    w_up = torch.randn(E, N, H, device=device, dtype=dtype, generator=g) / math.sqrt(H)
    w_down = torch.randn(E, H, I, device=device, dtype=dtype, generator=g) / math.sqrt(I)
    fp32 = dtype == torch.float32
    out_dir = args.out_dir or TILE_CONFIG_DIR
    path = out_dir / tile_config_file_name(E, N, H, dtype, device_name)
    table = json.loads(path.read_text()) if path.is_file() else {}

    failures: list[str] = []

    def bench(fn):
        try:
            fn()
            return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
        except Exception as exc:  # a candidate that does not compile or exceeds resources
            failures.append(f"{type(exc).__name__}: {str(exc)[:160]}")
            return math.inf

    activation = Activation(args.activation, args.glu)

    def up(x, routing, cfg):
        return moe_up_projection(x, routing, w_up, None, activation, cfg)

    print(f"tuning E={E} H={H} I={I} K={K} {args.dtype} glu={args.glu} on {device_name} -> {path}")
    for T in args.tokens:
        started = time.time()
        x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
        logits = torch.randn(T, E, device=device, generator=g)
        weights, ids = topk_gating(logits, K, renormalize=True)
        decode = T * K <= 2 * E
        best = None
        for block_m in block_m_candidates(T, K, E):
            align_ms = bench(functools.partial(align_by_expert, ids, E, block_m))
            routing = align_by_expert(ids, E, block_m)
            up_best = (math.inf, None)
            for cand in up_candidates(block_m, decode, fp32, args.quick):
                ms = bench(functools.partial(up, x, routing, {"BLOCK_M": block_m, "up": cand}))
                if ms < up_best[0]:
                    up_best = (ms, cand)
            if up_best[1] is None:
                continue
            inter = up(x, routing, {"BLOCK_M": block_m, "up": up_best[1]})
            down_best = (math.inf, None)
            for cand in down_candidates(block_m, decode, fp32, args.quick):
                cfg = {"BLOCK_M": block_m, "down": cand}
                ms = bench(
                    functools.partial(moe_down_projection, inter, routing, w_down, None, weights, dtype, True, cfg)
                )
                if ms < down_best[0]:
                    down_best = (ms, cand)
            if down_best[1] is None:
                continue
            total = align_ms + up_best[0] + down_best[0]
            print(
                f"  T={T:<6} BLOCK_M={block_m:<4} align {align_ms:.4f} up {up_best[0]:.4f} down {down_best[0]:.4f} ms"
            )
            if best is None or total < best[0]:
                best = (total, {"BLOCK_M": block_m, "up": up_best[1], "down": down_best[1]})
        if failures:
            print(f"  T={T}: {len(failures)} candidates failed, last: {failures[-1]}")
            failures.clear()
        if best is None:
            print(f"  T={T}: no candidate ran; keeping the previous entry")
            continue
        table[str(T)] = validate_tile_config(best[1])
        print(f"T={T}: {best[0]:.4f} ms with {json.dumps(best[1])} ({time.time() - started:.0f}s)")
        out_dir.mkdir(parents=True, exist_ok=True)
        ordered = {k: table[k] for k in sorted(table, key=int)}
        path.write_text(json.dumps(ordered, indent=1) + "\n")  # after every T: a crash keeps what was tuned
    print(f"wrote {path}")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("tune_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was tuned.")
    from kernel_moe.kernels import triton_interpreter_enabled

    if triton_interpreter_enabled():
        sys.exit("tune_kernels.py times compiled kernels: unset TRITON_INTERPRET")
    from triton.testing import do_bench

    tune(args, "cuda", do_bench, torch.cuda.get_device_name())
    return 0


if __name__ == "__main__":
    sys.exit(main())
