"""000: energy and speed of a baseline MLP vs a loop MoE vs the same MoE optimized by kernel_moe,
and the break-even formula ``(k/n) + routing_overhead < 1`` against a measured crossover.

    python examples/000_energy_mlp_vs_moe.py            # full: 91 s
    python examples/000_energy_mlp_vs_moe.py --smoke    # tiny sizes: 26 s
    (times measured on a shared 2-core CPU at load average 8-12; an idle one is faster)

The user's experiment compares a baseline MLP, an "original" MoE (a gate picks the top-k experts
of each input, then the forward iterates over all experts and finds each one's inputs with a
mask) and an optimized MoE (tokens sorted by expert, only the selected experts run,
``torch.compile``), by inference speed and, where it can be measured, energy. It then argues that
an MoE beats a dense model with the same parameter count when ``(k/n) + routing_overhead < 1``,
with a routing overhead of 5-10% for a well-implemented MoE, and recommends 8-16 experts of
500K-1M parameters. Here:

1. the user's modules (experts and ``BaselineMLP``: fc1 -> ReLU -> fc2; the loop ``MoE``), all
   mapping [N, d] -> [N, d], at the scale the guide recommends (8 experts of about 525K parameters,
   top-2, 4.2M parameters in all; smoke mode is far smaller);
2. ``kernel_moe.UnifiedManager(config).optimize(moe)`` returns the fused layer (the MoE is the
   whole model), then ``torch.compile(..., fullgraph=True)``; ``kernel_moe.bench.MoEBenchmark``
   times the loop MoE, the fused layer, fused + compiled and two baseline MLPs (the same TOTAL
   parameters: the guide's comparison; the same ACTIVE parameters) side by side in one process,
   interleaved, and measures energy with the machine's counter (NVML on a GPU, RAPL powercap on
   a CPU) or prints "not available";
3. the break-even sweep: n experts from 2 to 16 at k=2, the fused + compiled MoE against the MLP
   with the same parameters; measured ratio t_moe / t_mlp (the MoE wins below 1) next to the
   formula's k/n + 5-10%, the overhead that the measurement implies, and both crossovers.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

import kernel_moe
from kernel_moe.bench import BenchSettings, Inputs, Measurements, MoEBenchmark, Timing, detect_energy_meter

from _common import MLP, Clock, GateAndExperts, parser, print_table, section, setup

GUIDE_OVERHEAD = (0.05, 0.10)  # "routing_overhead ≈ 5-10% of computation for a well-implemented MoE"


# ---------------------------------------------------------------- the user's modules
class BaselineMLP(MLP):
    """The non-MoE baseline: one MLP (fc1 -> ReLU -> fc2), as wide as asked."""


class MoE(GateAndExperts):
    """The original MoE: the gate (``self.gate``, a Linear) picks the top-k experts of each input;
    the forward visits every expert (``self.experts``: MLPs, fc1 -> ReLU -> fc2) and finds the inputs
    that selected it with a mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, indices = torch.topk(probs, self.k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            mask = indices == i  # [N, k]
            rows = mask.any(dim=-1)
            if rows.any():
                weight = (weights * mask).sum(dim=-1, keepdim=True)
                out[rows] += weight[rows] * expert(x[rows])
        return out


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- measuring
def measure(moe: MoE, dim: int, tokens: int, variants: tuple[str, ...], mlps: dict[str, int],
            min_time_s: float, energy: bool, seed: int) -> dict:
    """MoEBenchmark of ``moe`` (its ``variants``) and of baseline MLPs of the given hidden sizes,
    side by side at one shape; the cases by variant name."""

    def mlp(width: int):
        def factory() -> nn.Module:
            torch.manual_seed(seed)
            return BaselineMLP(dim, width)
        return factory

    settings = BenchSettings(
        timing=Timing(warmup=2, min_time_s=min_time_s, num_threads=torch.get_num_threads()),
        measurements=Measurements(memory=False, energy=energy, routing=False),
        inputs=Inputs(kind="hidden", hidden_size=dim, seed=seed),
        optimize_config=kernel_moe.KernelConfig.for_moe(top_k=moe.k),
        compile_kwargs={"fullgraph": True},
        name=f"n={len(moe.experts)}",
        progress=False,
    )
    results = MoEBenchmark(model=moe, batch_sizes=[tokens], sequence_lengths=[1], variants=variants,
                           baselines=[(name, mlp(width)) for name, width in mlps.items()], settings=settings).run()
    for note in results.notes:
        print(f"note: {note}")
    return {c.variant: c for c in results.cases}


def energy_text(case) -> str:
    if case.energy is None:
        return "-"
    per_token = case.energy_j_per_token
    return "not available" if per_token is None else f"{per_token * 1e6:.2f} uJ"


def main(argv=None) -> int:
    ap = parser(__doc__)
    args = ap.parse_args(argv)
    setup(args, "000_energy_mlp_vs_moe", writes_files=False)
    clock = Clock()
    smoke = args.smoke
    dim, hidden, n, k = (64, 64, 8, 2) if smoke else (512, 512, 8, 2)
    tokens = 64 if smoke else 512
    min_time = 0.05 if smoke else 0.4

    meter = detect_energy_meter("cuda" if torch.cuda.is_available() else "cpu")
    section("1. baseline MLP vs original MoE vs kernel_moe, one process, interleaved")
    torch.manual_seed(args.seed)
    moe = MoE(dim, hidden, n, k).eval()
    manager = kernel_moe.UnifiedManager(kernel_moe.KernelConfig.for_moe(top_k=k))
    fused = manager.optimize(copy.deepcopy(moe))  # the MoE is the whole model: optimize returns its fused layer
    print(f"UnifiedManager(config).optimize(MoE) -> {type(fused).__name__}; manager.report:")
    print(manager.report)
    print(f"MoE: {n} experts of {params(moe.experts[0]):,} parameters, top-{k}: {params(moe):,} parameters, "
          f"{params(moe.gate) + k * params(moe.experts[0]):,} active per input; {tokens} inputs per call")
    reason = getattr(meter, "reason", "")
    print(f"energy counter: {meter.method if meter.available else f'not available ({reason})'}")
    cases = measure(moe, dim, tokens, ("original", "optimized", "optimized+compiled"),
                    {"mlp same total params": n * hidden, "mlp same active params": k * hidden},
                    min_time, True, args.seed)
    labels = {"original": "MoE, loop over all experts", "optimized": "MoE, kernel_moe",
              "optimized+compiled": "MoE, kernel_moe + torch.compile"}
    rows = []
    for variant, c in cases.items():
        if not c.ok:
            rows.append([labels.get(variant, variant), "-", "error", c.error[:40], "-", "-"])
            continue
        rows.append([labels.get(variant, variant), f"{c.params.total:,}", f"{c.latency.median_s * 1e3:.2f}",
                     f"{c.speedup_vs_original:.2f}x", f"{c.tokens_per_s:,.0f}", energy_text(c)])
    print_table(["model", "parameters", "median ms", "vs loop MoE", "inputs/s", "energy per input"], rows)

    section(f"2. break-even: n experts at k={k}, MoE (kernel_moe + torch.compile) vs MLP with the same parameters")
    sweep = (2, 4, 8) if smoke else (2, 3, 4, 6, 8, 16)
    rows, measured_cross, predicted_cross = [], None, None
    for n_sweep in sweep:
        torch.manual_seed(args.seed)
        moe_n = MoE(dim, hidden, n_sweep, k).eval()
        got = measure(moe_n, dim, tokens, ("optimized+compiled",), {"mlp": n_sweep * hidden},
                      min_time, False, args.seed)
        moe_case, mlp_case = got["optimized+compiled"], got["mlp"]
        if not (moe_case.ok and mlp_case.ok):
            print(f"n={n_sweep}: a case failed: {moe_case.error or mlp_case.error}")
            return 1
        ratio = moe_case.latency.median_s / mlp_case.latency.median_s
        low, high = k / n_sweep + GUIDE_OVERHEAD[0], k / n_sweep + GUIDE_OVERHEAD[1]
        if measured_cross is None and ratio < 1:
            measured_cross = n_sweep
        if predicted_cross is None and high < 1:
            predicted_cross = n_sweep
        rows.append([n_sweep, f"{params(moe_n):,}", f"{k / n_sweep:.3f}", f"{low:.2f}-{high:.2f}", f"{ratio:.2f}",
                     f"{ratio - k / n_sweep:+.2f}", "yes" if ratio < 1 else "no"])
    print_table(["n", "parameters", "k/n", "formula k/n + 5-10%", "measured t_moe/t_mlp", "implied overhead",
                 "MoE faster"], rows)
    print("implied overhead = measured ratio - k/n: the routing overhead, as a fraction of the dense MLP's time, "
          "that the formula would need")

    section("summary")
    on = lambda c: f"{c.latency.median_s * 1e3:.2f} ms" if c.ok else "failed"  # noqa: E731
    print(f"at n={n}, k={k}: loop MoE {on(cases['original'])}, kernel_moe {on(cases['optimized'])}, "
          f"+ torch.compile {on(cases['optimized+compiled'])}, MLP with the same parameters "
          f"{on(cases['mlp same total params'])}")
    energies = [energy_text(c) for c in cases.values()]
    print(f"energy per input: {', '.join(energies) if meter.available else 'not available on this machine'}")
    fmt = lambda v: "none in the sweep" if v is None else f"n = {v}"  # noqa: E731
    print(f"break-even crossover (smallest n where the MoE is faster than the MLP with the same parameters): "
          f"measured {fmt(measured_cross)}, predicted by (k/n) + 10% < 1: {fmt(predicted_cross)}")
    clock.done()
    ok = all(c.ok for c in cases.values()) and all(math.isfinite(float(r[4])) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
