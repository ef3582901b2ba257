"""Peak resident memory of ``kernel_moe.optimize()`` on a real-size MoE layer, as a ratio to the
layer's expert bytes.

    python benchmarks/bench_optimize_memory.py [--experts 16] [--tokens 128] [--repo PATH] [--json OUT]

Each case runs in a fresh subprocess: a transformers Qwen3-MoE sparse block at real layer size
(H 2048, I 768, top-8; E from ``--experts``, 128 in the real model) built in bf16 with its
Parameters requiring grad as a loaded model's do (``--frozen`` cases: not requiring grad), then
``optimize()``, then one no-grad forward of ``--tokens`` tokens. Each phase's peak RSS is read
from VmHWM of /proc/self/status, reset between phases through /proc/self/clear_refs; the figure
reported is the phase's peak minus the RSS before the phase, divided by the expert bytes.
``--repo`` runs another checkout's kernel_moe (e.g. an export of the commit before a change) in
the subprocess, for a before/after comparison in one command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

H, I, K = 2048, 768, 8
CHILD_FLAG = "--child"


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _phase(name: str, fn, phases: dict):
    """Run ``fn()`` and record the phase's peak RSS above the RSS before it (bytes)."""
    import gc

    gc.collect()
    resettable = _reset_peak()
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    phases[name] = {"peak_above_start": (peak - before) * 1024, "rss_after": _status_kib("VmRSS") * 1024,
                    "peak_reset": resettable}
    return result


def child(experts: int, tokens: int, frozen: bool) -> dict:
    """One case in this process: build, optimize, forward; the phases' figures."""
    import torch
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    import kernel_moe

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=experts, num_experts_per_tok=K,
                         norm_topk_prob=True)
    phases: dict = {}

    def build():
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # allocated once, in its final dtype
        try:
            block = Qwen3MoeSparseMoeBlock(cfg).eval()
        finally:
            torch.set_default_dtype(default)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # every page written, as a loaded checkpoint's are (4M values at a time)
            for p in block.parameters():
                for chunk in p.view(-1).split(2**22):
                    chunk.copy_(torch.randn(chunk.numel(), generator=gen).mul_(0.02))
        return block.requires_grad_(not frozen)

    block = _phase("build", build, phases)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in block.named_parameters() if "experts" in n)
    own = {id(p) for p in block.parameters()}
    model = _phase("optimize", lambda: kernel_moe.optimize(block), phases)
    shared = {id(p) for p in model.parameters()} == own  # the swapped layer holds the very same Parameters
    x = torch.randn(1, tokens, H, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def forward():
        with torch.no_grad():
            return model(x)

    _phase("forward", forward, phases)
    swapped = type(model).__name__
    return {"experts": experts, "expert_bytes": expert_bytes, "frozen": frozen, "swapped_to": swapped,
            "params_shared": shared, "kernel_moe": str(Path(kernel_moe.__file__).parent), "phases": phases}


def run_case(repo: Path, experts: int, tokens: int, frozen: bool) -> dict:
    """One case in a fresh subprocess with ``repo`` first on sys.path."""
    cmd = [sys.executable, __file__, CHILD_FLAG, "--experts", str(experts), "--tokens", str(tokens)]
    if frozen:
        cmd.append("--frozen")
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repo", action="append", type=Path, help="checkout(s) to measure (default: this one)")
    ap.add_argument("--frozen", action="store_true", help="child only: parameters do not require grad")
    ap.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.experts < 1 or args.experts < K:
        ap.error(f"--experts must be >= top-k {K}, got {args.experts}")
    if args.child:
        print(json.dumps(child(args.experts, args.tokens, args.frozen)))
        return 0
    repos = args.repo or [Path(__file__).resolve().parent.parent]
    rows = []
    print(f"Qwen3-MoE block H {H} I {I} E {args.experts} top-{K} bf16; peak RSS above the phase's start, "
          "as a multiple of the expert bytes")
    print(f"{'checkout':<28} {'grad':<6} {'expert MB':>9} {'build':>7} {'optimize':>9} {'forward':>8}  swapped to")
    for repo in repos:
        for frozen in (False, True):
            r = run_case(repo.resolve(), args.experts, args.tokens, frozen)
            rows.append(r)
            ratio = {k: v["peak_above_start"] / r["expert_bytes"] for k, v in r["phases"].items()}
            print(f"{str(repo)[-28:]:<28} {'no' if frozen else 'yes':<6} {r['expert_bytes'] / 2**20:>9.1f} "
                  f"{ratio['build']:>7.2f} {ratio['optimize']:>9.2f} {ratio['forward']:>8.2f}  {r['swapped_to']}"
                  f"{'' if r['params_shared'] else ' (parameters not shared)'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
