"""Before/after of a change on the CPU layer benchmark: two checkouts measured side by side.

    python benchmarks/compare_checkouts.py BEFORE_DIR AFTER_DIR [--rounds 3] [--min-time 1.0]
        [--tokens 1 16 128 1024 4096] [--dtypes float32 bfloat16]

Runs ``benchmarks/bench_cpu_layer.py`` of each checkout (its own ``kernel_moe`` first on the
path) alternately, ``--rounds`` times each, and prints per (dtype, T) the median over rounds of
after / before for our layer's time relative to the dense FFN measured in the same process
(``ours_over_dense``: machine-wide load cancels out) and for its absolute time. A ratio above
1 means the after checkout is slower. Both checkouts must build their native CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(checkout: Path, args: argparse.Namespace) -> dict:
    """One run of the checkout's bench_cpu_layer.py: {(dtype, T): row}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        cmd = [sys.executable, str(checkout / "benchmarks" / "bench_cpu_layer.py"), "--json", str(out),
               "--min-time", str(args.min_time), "--tokens", *map(str, args.tokens), "--dtypes", *args.dtypes]
        subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads(out.read_text())["rows"]
    return {(r["dtype"], r["T"]): r for r in rows if "ours_s" in r}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
            runs[name].append(run_once(getattr(args, name), args))
    print(f"after / before, median of {args.rounds} alternating rounds "
          f"({args.before} -> {args.after})")
    print(f"{'dtype':9} {'T':>5} | {'ours/dense':>10} {'ours time':>10}")
    worst = 0.0
    for key in runs["before"][0]:
        rel = statistics.median(a[key]["ours_over_dense"] / b[key]["ours_over_dense"]
                                for a, b in zip(runs["after"], runs["before"]))
        raw = statistics.median(a[key]["ours_s"] / b[key]["ours_s"] for a, b in zip(runs["after"], runs["before"]))
        worst = max(worst, rel)
        print(f"{key[0]:9} {key[1]:>5} | {rel:10.3f} {raw:10.3f}")
    print(f"largest after/before (ours/dense): {worst:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
