"""What the stage ranges (kernel_moe/kernels/annotate.py) cost when no profiler runs: one process,
the optimized layer's call three ways, in short windows, in random order per round.

    PYTHONPATH=. python benchmarks/bench_annotation_overhead.py [--hidden 64] [--tokens 1 4] [--rounds 200]

- ``annotated``: the code as shipped;
- ``stripped``: the same functions with every ``with stage(...)`` removed (their code objects
  compiled from the source without those statements and swapped in place);
- ``floor``: as shipped, with ``stage`` replaced by a function returning one shared no-op context
  (the cost of the ``with`` statements alone).

Prints per token count the min and median of the per-window median call time of each, and the
median over rounds of annotated / stripped and floor / stripped. One torch thread.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import random
import statistics
import time
import types

import torch

import kernel_moe
import kernel_moe.kernels.cpu.forward as cpu_forward
import kernel_moe.kernels.cpu.mlp as cpu_mlp
import kernel_moe.layers.moe as layers_moe
from kernel_moe.bench.models import NaiveMoE
from kernel_moe.kernels import annotate

MODULES = (cpu_forward, cpu_mlp, layers_moe)
WAYS = ("annotated", "stripped", "floor")
_SHARED = contextlib.nullcontext()


class _Strip(ast.NodeTransformer):
    """Replaces ``with stage(...): body`` by ``body``."""

    def visit_With(self, node: ast.With):
        self.generic_visit(node)
        expr = node.items[0].context_expr
        if len(node.items) == 1 and isinstance(expr, ast.Call) and getattr(expr.func, "id", "") == "stage":
            return node.body
        return node


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _swaps() -> list[tuple[types.FunctionType, types.CodeType, types.CodeType]]:
    """(function, its code, its code without stage ranges) for every function that opens one."""
    swaps = []
    for module in MODULES:
        tree = ast.fix_missing_locations(_Strip().visit(ast.parse(inspect.getsource(module))))
        stripped = {c.co_qualname: c for c in _codes(compile(tree, module.__file__, "exec"))}
        owned = [v for v in vars(module).values() if getattr(v, "__module__", None) == module.__name__]
        funcs = [v for v in owned if isinstance(v, types.FunctionType)]
        funcs += [f for v in owned if isinstance(v, type)
                  for f in vars(v).values() if isinstance(f, types.FunctionType)]
        swaps += [(f, f.__code__, stripped[f.__code__.co_qualname]) for f in funcs if "stage(" in inspect.getsource(f)]
    return swaps


def _use(way: str, swaps) -> None:
    for func, annotated, stripped in swaps:
        func.__code__ = stripped if way == "stripped" else annotated
    for module in MODULES:
        module.stage = (lambda name: _SHARED) if way == "floor" else annotate.stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64, help="H; experts of I = 2H, 8 experts, top-2")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--calls", type=int, default=20, help="calls per window")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    holder = torch.nn.Sequential(NaiveMoE(args.hidden, 2 * args.hidden, 8, 2)).eval()
    kernel_moe.optimize(holder)
    layer, swaps = holder[0], _swaps()
    order = list(WAYS)
    with torch.no_grad():
        for T in args.tokens:
            x_1TH = torch.randn(1, T, args.hidden)
            for way in WAYS:
                _use(way, swaps)
                layer(x_1TH)
            windows: dict[str, list[float]] = {w: [] for w in WAYS}
            for rnd in range(args.rounds):
                random.Random(rnd).shuffle(order)
                for way in order:
                    _use(way, swaps)
                    times = []
                    for _ in range(args.calls):
                        t0 = time.perf_counter()
                        layer(x_1TH)
                        times.append(time.perf_counter() - t0)
                    windows[way].append(statistics.median(times) * 1e6)
            _use("annotated", swaps)
            cells = ", ".join(f"{w} min {min(v):.1f} / median {statistics.median(v):.1f} us"
                              for w, v in windows.items())
            ratios = {w: statistics.median(a / s for a, s in zip(windows[w], windows["stripped"], strict=True))
                      for w in ("annotated", "floor")}
            print(f"H{args.hidden} T={T}: {cells}; per round vs stripped: annotated {ratios['annotated']:.4f}, "
                  f"floor {ratios['floor']:.4f}")


if __name__ == "__main__":
    main()
